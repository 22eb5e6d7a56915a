"""Multi-process data parallel through ``paddle.distributed``.

Started with ``python -m paddle.distributed.launch --nproc_per_node N main_finetune.py ...`` (GPUs, or CPU
processes over the gloo backend). A plain ``python main_finetune.py`` is a world of one. Only rank 0 writes
files; evaluation shards the data without padding and gathers every example exactly once, so metrics do
not depend on the number of processes (the reference's ``--dist_eval`` pads with duplicates instead).

References: MAE ``util/misc.py`` (init_distributed_mode); Paddle ``paddle.distributed`` docs.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
import zlib

import numpy as np
import paddle
import paddle.distributed as dist


def is_launched() -> bool:
    """True when started by ``paddle.distributed.launch`` with more than one process."""
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1


def init_distributed() -> None:
    """Join the process group when launched with several processes; no-op otherwise.

    A launched process also watches the other processes of the run that share its machine: when one of
    them dies (a crash, SIGKILL, the out-of-memory killer) or is stopped (SIGSTOP) for more than
    ``STOPPED_GRACE`` seconds, this process prints one line naming that rank and exits, instead of waiting
    in a collective operation (gloo's own timeout is ``PADDLE_PG_TIMEOUT``, 30 minutes by default) or dying
    with a gloo exception and a C++ stack dump (Paddle's C++ signal handler is turned off for that reason).
    """
    if is_launched():
        paddle.disable_signal_handler()
        dist.init_parallel_env()
        _watch_peers()
        _on_terminate_say_which_peer()


STOPPED_GRACE = 10.0
_PEERS: dict[int, tuple[int, int]] = {}  # rank -> (pid, host id), filled by init_distributed


def _host_id() -> int:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return zlib.crc32(f"{socket.gethostname()}/{boot}".encode()) & 0x7FFFFFFF


def _process_state(pid: int) -> str | None:
    """The /proc state letter of ``pid`` (R, S, D, T, Z, ...) or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def peer_problem() -> str | None:
    """What is wrong with another process of this run on this machine (dead or stopped), or None."""
    for rank, (pid, host) in sorted(_PEERS.items()):
        if host != _host_id() or rank == get_rank():
            continue
        state = _process_state(pid)
        if state is None or state in "ZXx":
            return f"rank {rank} (pid {pid}) has died"
        if state in "Tt":
            return f"rank {rank} (pid {pid}) is stopped"
    return None


_WATCHING = threading.Event()


def stop_watching_peers() -> None:
    """Call after this process's last collective operation: from then on the others may exit normally."""
    _WATCHING.clear()


_TERMINATE_HANDLER = None  # kept alive: the C++ runtime holds a raw pointer to it


def _on_terminate_say_which_peer() -> None:
    """When a peer dies in the middle of a collective, gloo throws inside Paddle's C++ backward pass, where no
    Python code can catch it, and the C++ runtime terminates the process with two lines about
    ``gloo::IoException``. Install a C++ terminate handler that says instead which rank is gone (best effort:
    only where libstdc++ is the C++ runtime)."""
    global _TERMINATE_HANDLER
    import ctypes

    try:
        libstdcxx = ctypes.CDLL("libstdc++.so.6")
        set_terminate = libstdcxx._ZSt13set_terminatePFvvE
    except (OSError, AttributeError):
        return
    me = get_rank()

    def on_terminate():
        problem = wait_for_peer_problem() or "another process of the run failed or cannot be reached"
        os.write(2, (f"error: rank {me}: a collective operation failed (gloo): {problem}; that rank's own log "
                     "(workerlog.N in the launcher's --log_dir) says why; resume from the last "
                     "checkpoint-last.pdparams\n").encode())
        os._exit(1)

    _TERMINATE_HANDLER = ctypes.CFUNCTYPE(None)(on_terminate)
    set_terminate.restype = ctypes.c_void_p
    set_terminate.argtypes = [ctypes.c_void_p]
    set_terminate(ctypes.cast(_TERMINATE_HANDLER, ctypes.c_void_p))


def wait_for_peer_problem(seconds: float = 3.0) -> str | None:
    """``peer_problem()``, waiting up to ``seconds`` for it: a killed peer's sockets close (and a collective
    fails here) a moment before the process itself is gone."""
    deadline = time.time() + seconds
    while True:
        problem = peer_problem()
        if problem is not None or time.time() >= deadline:
            return problem
        time.sleep(0.05)


def _watch_peers(interval: float = 0.05) -> None:
    parts: list = []
    dist.all_gather(parts, paddle.to_tensor([os.getpid(), _host_id()], dtype="int64"))
    _PEERS.update({r: (int(p.numpy()[0]), int(p.numpy()[1])) for r, p in enumerate(parts)})
    if not os.path.isdir("/proc"):
        return
    me = get_rank()
    _WATCHING.set()

    def watch():
        stopped_since = None
        while _WATCHING.is_set():
            problem = peer_problem()
            if problem and "stopped" in problem:
                stopped_since = stopped_since or time.time()
                if time.time() - stopped_since < STOPPED_GRACE:
                    problem = None
            else:
                stopped_since = None
            if problem and _WATCHING.is_set():
                sys.stderr.write(f"error: {problem}, so rank {me} stops too (the run cannot continue without "
                                 "it); that rank's own log (workerlog.N in the launcher's --log_dir) says why; "
                                 "resume from the last checkpoint-last.pdparams\n")
                sys.stderr.flush()
                os._exit(1)
            time.sleep(interval)

    threading.Thread(target=watch, name="peer-watch", daemon=True).start()


def get_rank() -> int:
    return dist.get_rank() if is_launched() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_launched() else 1


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(value: float) -> float:
    """Mean of a Python float over all processes."""
    if get_world_size() == 1:
        return float(value)
    t = paddle.to_tensor([float(value)], dtype="float64")
    dist.all_reduce(t)
    return float(t.numpy()[0]) / get_world_size()


def gather_rows(array: np.ndarray) -> list[np.ndarray]:
    """All-gather a 2-D float64 array whose row count may differ between processes.

    Returns the per-rank arrays in rank order (on every rank).
    """
    array = np.asarray(array, dtype=np.float64)
    if get_world_size() == 1:
        return [array]
    n = paddle.to_tensor([array.shape[0]], dtype="int64")
    counts: list = []
    dist.all_gather(counts, n)
    counts = [int(c.numpy()[0]) for c in counts]
    width = array.shape[1]
    padded = np.zeros((max(max(counts), 1), width), dtype=np.float64)
    padded[: array.shape[0]] = array
    parts: list = []
    dist.all_gather(parts, paddle.to_tensor(padded))
    return [p.numpy()[:c] for p, c in zip(parts, counts)]


class ShardSampler(paddle.io.Sampler):
    """Indices ``rank, rank + world, ...`` of a dataset, without padding: each example is seen once."""

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
