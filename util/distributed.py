"""Multi-process data parallel through ``paddle.distributed``.

Started with ``python -m paddle.distributed.launch --nproc_per_node N main_finetune.py ...`` (GPUs, or CPU
processes over the gloo backend). A plain ``python main_finetune.py`` is a world of one. Only rank 0 writes
files; evaluation shards the data without padding and gathers every example exactly once, so metrics do
not depend on the number of processes (the reference's ``--dist_eval`` pads with duplicates instead).

References: MAE ``util/misc.py`` (init_distributed_mode); Paddle ``paddle.distributed`` docs.
"""
from __future__ import annotations

import os

import numpy as np
import paddle
import paddle.distributed as dist


def is_launched() -> bool:
    """True when started by ``paddle.distributed.launch`` with more than one process."""
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1


def init_distributed() -> None:
    """Join the process group when launched with several processes; no-op otherwise."""
    if is_launched():
        dist.init_parallel_env()


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
