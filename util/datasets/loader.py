"""Batch loading with errors that reach the user.

With ``num_workers == 0`` batches are read in this process by a plain loop: Paddle's single-process
``DataLoader`` reads in a background thread that dies silently on an exception (a corrupt image then hangs
training). With workers, Paddle's multi-process loader is used and a worker failure is re-raised as a
``UserError`` (the worker prints the original error, which names the file).
"""
from __future__ import annotations

import ctypes
import os
import random
import signal
import sys
import threading

import numpy as np
import paddle

from util.datasets.samplers import WeightedBatchSampler, balanced_sample_weights
from util.distributed import ShardSampler
from util.errors import UserError, killed_worker_error


def _collate(samples: list) -> list:
    fields = list(zip(*samples))
    return [paddle.to_tensor(np.stack([np.asarray(x) for x in f])) for f in fields]


def _worker_message(captured: list, exc: BaseException) -> str:
    """The user-facing line of a worker's error (``UserError: <path>: cannot read image ...``)."""
    for err in reversed(captured):
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        if lines:
            last = lines[-1]
            for prefix in ("util.errors.UserError: ", "UserError: "):
                if last.startswith(prefix):
                    return last[len(prefix):]
            return last
    text = str(exc).strip().splitlines()
    return (f"{type(exc).__name__}: {text[-1] if text else ''}; rerun with --num_workers 0 to see the "
            "failing sample's error")


def _killed_worker(iterator) -> tuple[int, str] | None:
    """(pid, signal name) of a worker of Paddle's ``iterator`` that a signal ended, if any."""
    for worker in getattr(iterator, "_workers", None) or []:
        code = worker.exitcode  # negative: ended by that signal
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            return worker.pid, name
    return None


class _WorkerInit:
    """Runs in every worker first: the worker dies with its parent (a killed or crashed main process must
    not leave workers holding hundreds of MB each), then the user's ``worker_init_fn``."""

    def __init__(self, parent_pid: int, then=None):
        self.parent_pid, self.then = parent_pid, then

    def __call__(self, worker_id: int) -> None:
        if sys.platform.startswith("linux"):
            try:  # PR_SET_PDEATHSIG (1): the kernel sends SIGKILL to this worker when its parent exits
                ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
            except (OSError, AttributeError):
                pass
        if os.getppid() != self.parent_pid:  # the parent died before the request above was in place
            os._exit(1)
        if self.then is not None:
            self.then(worker_id)


class BatchLoader:
    """Iterable of ``[images, labels]`` batches over ``dataset`` in the order of ``batch_sampler``."""

    def __init__(self, dataset, batch_sampler, num_workers: int = 0, worker_init_fn=None, name: str = "data"):
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.num_workers = num_workers
        self.name = name
        self._paddle_loader = None
        if num_workers > 0:
            self._paddle_loader = paddle.io.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                                                       worker_init_fn=_WorkerInit(os.getpid(), worker_init_fn),
                                                       use_shared_memory=False)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        if self._paddle_loader is None:
            for indices in self.batch_sampler:
                yield _collate([self.dataset[i] for i in indices])
            return
        # Paddle re-raises a worker's error in its reader thread, whose traceback would be printed by
        # threading.excepthook; keep it instead and report the worker's message as one paragraph.
        captured: list[BaseException] = []
        previous = threading.excepthook
        threading.excepthook = lambda args: captured.append(args.exc_value)
        iterator = iter(self._paddle_loader)
        try:
            yield from iterator
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as exc:
            # stop the workers now: left running, they keep the process from exiting
            killed = _killed_worker(iterator)
            shutdown = getattr(iterator, "_try_shutdown_all", None)
            if shutdown is not None:
                shutdown(1)
            if killed is not None:  # Paddle's reader saw the dead worker before its SIGCHLD handler did
                raise killed_worker_error(*killed) from None
            raise UserError(f"{self.name}: a data loader worker failed: {_worker_message(captured, exc)}") from None
        finally:
            threading.excepthook = previous


class WorkerSeeder:
    """``worker_init_fn`` giving every DataLoader worker its own seed for ``random`` and numpy (the
    augmentations draw from both); ``base`` is set before each epoch so epochs differ."""

    def __init__(self, base: int = 0):
        self.base = base

    def __call__(self, worker_id: int) -> None:
        seed = (self.base + 7919 * (worker_id + 1)) % (2**32)
        random.seed(seed)
        np.random.seed(seed)


def build_loaders(datasets: dict, batch_size: int, num_workers: int, seed: int, rank: int, world: int,
                  balanced: bool = False) -> tuple[dict, dict]:
    """A ``BatchLoader`` per split (train: shuffled or balanced and sharded, last partial batch dropped;
    val/test: sharded without padding, in order) and the train seeders; returns (loaders, seeders)."""
    loaders, seeders = {}, {}
    for split, ds in datasets.items():
        seeder = WorkerSeeder(seed)
        if split == "train" and balanced:
            # the same weighted stream on every rank (seeded by --seed and the epoch), then sharded
            sampler = WeightedBatchSampler(balanced_sample_weights(ds), batch_size, num_replicas=world, rank=rank,
                                           drop_last=True, seed=seed - rank)
        elif split == "train":
            sampler = paddle.io.DistributedBatchSampler(ds, batch_size=batch_size, num_replicas=world, rank=rank,
                                                        shuffle=True, drop_last=True)
        else:
            sampler = paddle.io.BatchSampler(sampler=ShardSampler(len(ds), rank, world), batch_size=batch_size,
                                             drop_last=False)
        loaders[split] = BatchLoader(ds, sampler, num_workers=num_workers,
                                     worker_init_fn=seeder if num_workers > 0 else None, name=f"{split} split")
        seeders[split] = seeder
    return loaders, seeders
