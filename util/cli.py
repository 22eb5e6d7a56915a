"""How a command ends: the user-facing line for each way a run can fail, and its exit status.

``run_command(fn)`` runs ``fn()`` and turns the failures a user can meet into one paragraph on stderr and an
exit status: a ``UserError`` (2), Ctrl-C or SIGTERM (130, saying what the run left), a killed data loader
worker, a failed collective operation in a multi-process run, and operating-system errors such as a
read-only folder or a full disk (2). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import re
import signal
import sys
import threading
from typing import Callable

from util.errors import UserError, killed_worker_error
from util.outputs.run_folder import describe_interrupted


def sigterm_as_interrupt() -> None:
    """SIGTERM (a scheduler stopping the job, ``kill PID``) ends the run as Ctrl-C does: a clean message,
    the last checkpoint intact, no C++ stack dump. Call it after importing paddle, which installs its own
    SIGTERM handler."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@contextlib.contextmanager
def interrupt_in_backward():
    """Around ``loss.backward()``: a Ctrl-C or SIGTERM that lands while Paddle's backward pass runs Python code
    (a ``PyLayer``'s backward: ``models/cpu_kernels.py``) comes out of Paddle as an ``OSError`` ("(External)
    ... KeyboardInterrupt"); it is raised here as the ``KeyboardInterrupt`` it was, so the run ends as after
    any other interrupt. A DataLoader worker's death reported there (Paddle's SIGCHLD handler) is raised as the
    ``SystemError`` it is elsewhere, so ``run_command`` gives its one line. Every other error passes unchanged."""
    try:
        yield
    except OSError as exc:
        if "KeyboardInterrupt" in str(exc):
            raise KeyboardInterrupt from None
        if "DataLoader" in str(exc) and "SystemError" in str(exc):
            raise SystemError(str(exc)) from None
        raise


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_command(fn: Callable[[], object]) -> int:
    try:
        fn()
    except UserError as exc:
        _say(f"error: {exc}")
        return 2
    except KeyboardInterrupt as exc:
        _say(describe_interrupted(getattr(exc, "run_dir", None)))
        return 130
    except SystemError as exc:  # Paddle's SIGCHLD handler: a DataLoader worker died (killed, out of memory)
        if "DataLoader" not in str(exc):
            raise
        found = re.search(r"pid (\d+)\).*?signal: (\w+)", str(exc))
        if found:
            _say(f"error: {killed_worker_error(found.group(1), found.group(2))}")
        else:
            first = str(exc).strip().splitlines()[0].replace("(Fatal) ", "").split(" (at /")[0]
            _say(f"error: {first}; a data loader worker was stopped from outside the run (the system may have run "
                 "out of memory: check `dmesg`); rerun, with fewer --num_workers or --num_workers 0")
        return 2
    except RuntimeError as exc:  # a collective operation failed because another process of the run died
        from util import distributed as D  # Paddle: imported by then (flag errors come before it)

        if D.get_world_size() == 1:
            raise
        D.stop_watching_peers()  # this handler says it, once
        problem = D.wait_for_peer_problem() or "another process of the run failed or cannot be reached"
        first = (str(exc).strip().splitlines() or [""])[-1][:200]
        _say(f"error: rank {D.get_rank()}: a collective operation failed ({first}): {problem}; that rank's own log "
             "(workerlog.N in the launcher's --log_dir) says why")
        return 2
    except OSError as exc:  # read-only folder, full disk, a file where a folder belongs, ...
        _say(f"error: {exc.filename or 'a file of this run'}: {exc.strerror or exc} (while writing or reading this "
             "run's files); check that the folder exists, is writable and has free space, or pick another "
             "--output_dir")
        return 2
    return 0
