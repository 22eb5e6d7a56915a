"""util.threads: the math threads and the default data loader workers follow the cores this process may use."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT
from util import threads


def _fake_cores(monkeypatch, affinity=None, cpu_count=64):
    """Pretend the machine has ``cpu_count`` cores and this process may use ``affinity`` of them (``None``: no
    ``os.sched_getaffinity``, as off Linux)."""
    monkeypatch.setattr(os, "cpu_count", lambda: cpu_count)
    if affinity is None:
        monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    else:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)


@pytest.mark.parametrize("cores,math,workers", [(1, 1, 0), (2, 2, 1), (3, 3, 2), (4, 4, 3), (9, 8, 8), (16, 8, 8),
                                                (128, 8, 8)])
def test_defaults_follow_the_cores(monkeypatch, cores, math, workers):
    _fake_cores(monkeypatch, affinity=cores)
    assert threads.available_cores() == cores
    assert threads.math_threads(environ={}) == math
    assert threads.default_num_workers(environ={}) == workers
    assert threads.resolve_num_workers(None, environ={}) == workers


def test_the_cpu_set_wins_over_the_machine(monkeypatch):
    # a container or taskset limited to 2 of 64 cores: 2 math threads and 1 worker, not 8 and 8
    _fake_cores(monkeypatch, affinity=2, cpu_count=64)
    assert (threads.math_threads(environ={}), threads.default_num_workers(environ={})) == (2, 1)


def test_without_affinity_the_cpu_count_decides(monkeypatch):
    _fake_cores(monkeypatch, affinity=None, cpu_count=4)
    assert threads.available_cores() == 4 and threads.math_threads(environ={}) == 4
    _fake_cores(monkeypatch, affinity=None, cpu_count=None)  # os.cpu_count() may return None
    assert threads.available_cores() == 1
    assert (threads.math_threads(environ={}), threads.default_num_workers(environ={})) == (1, 0)


@pytest.mark.parametrize("value,expected", [("3", 3), ("12", 12), (" 2 ", 2), ("1", 1)])
def test_omp_num_threads_set_by_the_user_wins(monkeypatch, value, expected):
    _fake_cores(monkeypatch, affinity=4)
    assert threads.math_threads(environ={"OMP_NUM_THREADS": value}) == expected  # even above the cap of 8
    assert threads.default_num_workers(environ={"OMP_NUM_THREADS": value}) == 3  # workers follow the cores


@pytest.mark.parametrize("value", ["", "0", "-2", "four", "1.5"])
def test_unusable_omp_num_threads_counts_as_unset(monkeypatch, value):
    _fake_cores(monkeypatch, affinity=4)
    assert threads.user_math_threads({"OMP_NUM_THREADS": value}) is None
    assert threads.math_threads(environ={"OMP_NUM_THREADS": value}) == 4


def test_launched_processes_share_the_cores(monkeypatch):
    _fake_cores(monkeypatch, affinity=2)
    two = {"PADDLE_LOCAL_SIZE": "2"}  # paddle.distributed.launch --nproc_per_node 2
    assert (threads.math_threads(environ=two), threads.default_num_workers(environ=two)) == (1, 0)
    _fake_cores(monkeypatch, affinity=16)
    assert (threads.math_threads(environ=two), threads.default_num_workers(environ=two)) == (8, 7)
    four = {"PADDLE_LOCAL_SIZE": "4"}
    assert (threads.math_threads(environ=four), threads.default_num_workers(environ=four)) == (4, 3)
    assert threads.local_processes({"PADDLE_LOCAL_SIZE": "x"}) == 1
    assert threads.local_processes({"PADDLE_LOCAL_SIZE": "0"}) == 1


def test_the_process_environment_is_read_by_default(monkeypatch):
    _fake_cores(monkeypatch, affinity=16)
    monkeypatch.setenv("PADDLE_LOCAL_SIZE", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert (threads.math_threads(), threads.default_num_workers(), threads.cores_per_process()) == (2, 3, 4)


def test_an_explicit_num_workers_is_kept(monkeypatch):
    _fake_cores(monkeypatch, affinity=16)
    assert threads.resolve_num_workers(0, environ={}) == 0
    assert threads.resolve_num_workers(12, environ={}) == 12


def test_the_module_does_not_import_paddle():
    # main_finetune.py calls math_threads() before Paddle is imported: importing this module must not import it
    code = "import sys, util.threads; print(sorted(m for m in sys.modules if m.split('.')[0] == 'paddle'))"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
