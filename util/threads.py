"""How many CPU threads a process computes with, and how many data loader workers it starts.

One place decides both, from the cores this process may run on (``os.sched_getaffinity``: the CPU set of a
container, a batch job or ``taskset``; ``os.cpu_count`` where that call does not exist), shared among the
training processes of this machine (``PADDLE_LOCAL_SIZE``, set by ``paddle.distributed.launch``):

* **Math threads** (the threads of Paddle's CPU kernels: MKL and OpenMP): ``OMP_NUM_THREADS`` when it is set
  (a positive integer), else the process's share of the cores, at most ``MAX_MATH_THREADS`` (8; beyond that
  the CPU kernels gain little at fine-tuning batch sizes, and a large machine keeps its other cores for data
  loading). Under ``paddle.distributed.launch`` the processes inherit ``OMP_NUM_THREADS=1`` from the
  launcher (Paddle writes it at import when it is unset), so each computes with one thread unless the user
  sets ``OMP_NUM_THREADS``.
* **Data loader workers** (``--num_workers`` left out): one less than the process's share of the cores, at
  most ``MAX_WORKERS`` (8); 0 on a single core (the batches are then read in the main process). A worker
  decodes and augments images with one math thread (it inherits ``OMP_NUM_THREADS=1``) while the main
  process runs the model step; the share minus one keeps a core for the main process, whose math threads
  share the workers' cores only while both are busy (on a GPU they are mostly idle). 2 cores: 1 worker and
  2 math threads; 16 cores: 8 and 8; 2 processes on 2 cores: no worker and 1 thread each.

Why the count is not put into ``OMP_NUM_THREADS``: Paddle prints a warning at import whenever
``OMP_NUM_THREADS`` is above 1 (about OpenBLAS builds and its old data-parallel executor; the CPU wheels are
MKL builds), and sets it to 1 when it is unset. The entry point therefore calls ``math_threads()``
*before* importing Paddle (this module never imports it) and hands the number to Paddle afterwards with
``paddle.base.core.set_num_threads``, which sets MKL's and OpenMP's thread counts directly (what Paddle
Inference does with ``Config.set_cpu_math_library_num_threads``); in forked data loader workers OpenMP
starts again from ``OMP_NUM_THREADS=1``.

References: PaddlePaddle ``python/paddle/base/__init__.py`` (``__bootstrap__``: the OMP_NUM_THREADS check) and
``paddle/phi/core/platform/cpu_helper.cc`` (``SetNumThreads``); PyTorch's DataLoader documentation
(worker processes and their per-process threads).
"""
from __future__ import annotations

import os
from typing import Mapping

MAX_MATH_THREADS = 8
MAX_WORKERS = 8


def available_cores() -> int:
    """The CPU cores this process may run on (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux: no affinity call
        return max(1, os.cpu_count() or 1)


def local_processes(environ: Mapping[str, str] | None = None) -> int:
    """Training processes on this machine: ``PADDLE_LOCAL_SIZE`` (``paddle.distributed.launch``), else 1."""
    env = os.environ if environ is None else environ
    try:
        return max(1, int(env.get("PADDLE_LOCAL_SIZE", "1")))
    except ValueError:
        return 1


def cores_per_process(environ: Mapping[str, str] | None = None) -> int:
    """This process's share of the cores: ``available_cores() // local_processes()``, at least 1."""
    return max(1, available_cores() // local_processes(environ))


def user_math_threads(environ: Mapping[str, str] | None = None) -> int | None:
    """``OMP_NUM_THREADS`` when it holds a positive integer, else ``None`` (unset, empty or not a number,
    which Paddle also ignores)."""
    env = os.environ if environ is None else environ
    try:
        value = int(str(env.get("OMP_NUM_THREADS", "")).strip())
    except ValueError:
        return None
    return value if value > 0 else None


def math_threads(environ: Mapping[str, str] | None = None) -> int:
    """The math threads of this process (see the module docstring). Call it before Paddle is imported:
    the import sets an unset ``OMP_NUM_THREADS`` to 1."""
    user = user_math_threads(environ)
    return user if user is not None else min(MAX_MATH_THREADS, cores_per_process(environ))


def default_num_workers(environ: Mapping[str, str] | None = None) -> int:
    """Data loader workers when ``--num_workers`` is left out: ``min(cores_per_process() - 1, 8)``, >= 0."""
    return max(0, min(MAX_WORKERS, cores_per_process(environ) - 1))


def resolve_num_workers(num_workers: int | None, environ: Mapping[str, str] | None = None) -> int:
    """``--num_workers`` as given, or ``default_num_workers()`` for ``None`` (the flag left out)."""
    return default_num_workers(environ) if num_workers is None else int(num_workers)
