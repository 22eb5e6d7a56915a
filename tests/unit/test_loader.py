"""The batch loader reports a worker that a signal ended as one clear line, whichever part of Paddle sees
the dead worker first (its SIGCHLD handler or its reader thread)."""
import os
import signal

import numpy as np
import pytest

from util.cli import run_command
from util.datasets.loader import BatchLoader, _killed_worker


class _KillsItsWorker:
    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return np.zeros((3, 4, 4), np.float32), np.int64(0)


@pytest.mark.parametrize("repeat", range(3))
def test_a_worker_killed_by_a_signal_is_one_clear_line(capsys, repeat):
    loader = BatchLoader(_KillsItsWorker(), [[0, 1], [2, 3], [4, 5], [6, 7]], num_workers=1, name="train split")
    assert run_command(lambda: [b for b in loader]) == 2
    err = capsys.readouterr().err
    assert "was killed by signal SIGKILL" in err, err
    assert "SystemError" not in err and "Traceback" not in err, err


class _Proc:
    def __init__(self, pid, exitcode):
        self.pid, self.exitcode = pid, exitcode


class _Iter:
    def __init__(self, *workers):
        self._workers = list(workers)


def test_killed_worker_names_the_worker_a_signal_ended():
    assert _killed_worker(_Iter(_Proc(11, None), _Proc(12, -9))) == (12, "SIGKILL")
    assert _killed_worker(_Iter(_Proc(11, 0), _Proc(12, 1))) is None  # normal exit or an error: not a signal
    assert _killed_worker(object()) is None
