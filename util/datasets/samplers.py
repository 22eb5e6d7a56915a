"""Class-balanced sampling: per-sample weights from a dataset's labels and a weighted, sharded batch sampler.

``balanced_sample_weights(dataset)`` gives each sample the inverse frequency of its class:

- single_label: ``1 / count(class of the sample)``;
- regression: the same with the rounded grade as the class (the DR-grading seed balances its grades);
- multi_label ("least-seen label"): ``1 / count(rarest positive label of the sample)``, where a label's
  count is its number of positives; samples with no positive label get ``1 / count(all-negative
  samples)``, so "nothing found" is one more group drawn as often as a label.

Drawing with these weights makes every class (grade, rarest label) about equally frequent per epoch;
multi-label balance is approximate, since a sample with a rare and a common label also adds a draw of
the common one.

``WeightedBatchSampler`` replaces ``paddle.io.DistributedBatchSampler`` for the train loader: per epoch
it draws ``len(weights)`` indices with replacement from one generator seeded with ``seed + epoch`` (the
same stream on every rank), rounds the stream up to a multiple of ``num_replicas`` and gives rank ``r``
the positions ``r, r + num_replicas, ...`` — disjoint shards of one stream — cut into batches.

References: the ODIR seed's weighted random sampling by label frequency; torch
``WeightedRandomSampler`` (draws with replacement) and ``DistributedSampler`` (set_epoch, interleaved
shards); Paddle ``io.DistributedBatchSampler`` (interface mimicked).
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from util.errors import UserError


def _inverse_frequency(groups: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].astype(np.float64)


def balanced_sample_weights(dataset) -> np.ndarray:
    """float64 [N] weights making classes (grades, rarest positive labels) equally likely; see the module doc."""
    task = dataset.task_type
    targets = np.asarray(dataset.targets)
    if len(targets) == 0:
        raise UserError(f"{getattr(dataset, 'data_path', 'dataset')}: no samples to weight (at least one); "
                        f"check the train split")
    if task == 'single_label':
        return _inverse_frequency(targets.astype(np.int64))
    if task == 'regression':
        return _inverse_frequency(np.rint(targets).astype(np.int64))
    if task == 'multi_label':
        y = targets.reshape(len(targets), -1) > 0.5
        positives = y.sum(0)
        # the rarest positive label of each sample; -1 for all-negative samples (their own group)
        masked = np.where(y, positives[None, :], np.iinfo(np.int64).max)
        rarest_count = masked.min(1).astype(np.float64)
        negative = ~y.any(1)
        rarest_count[negative] = negative.sum()
        return 1.0 / rarest_count
    raise UserError(f"task {task!r}: no balancing rule (single_label, multi_label or regression); "
                    f"train without --balanced_sampler")


class WeightedBatchSampler:
    """Batches of indices drawn with replacement by ``weights``; see the module docstring.

    ``len(self)`` is the number of batches per rank and epoch, like ``DistributedBatchSampler``; call
    ``set_epoch(epoch)`` before iterating each epoch (iterating twice without it repeats the stream).
    """

    def __init__(self, weights, batch_size: int, num_replicas: int = 1, rank: int = 0, drop_last: bool = True,
                 seed: int = 0):
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.size == 0 or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
            raise UserError(f"sampler weights: {w.size} weights, min {w.min() if w.size else 'n/a'} (finite, "
                            f"non-negative, not all zero); check the training labels")
        if int(batch_size) != batch_size or batch_size < 1:
            raise UserError(f"--batch_size {batch_size}: not a positive integer; pass e.g. --batch_size 16")
        if num_replicas < 1 or not (0 <= rank < num_replicas):
            raise ValueError(f'rank {rank} outside [0, {num_replicas})')
        self.weights = w
        self.batch_size = int(batch_size)
        self.nranks = int(num_replicas)
        self.local_rank = int(rank)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.epoch = 0
        self.num_samples = math.ceil(w.size / self.nranks)     # per rank, as DistributedBatchSampler
        self.total_size = self.num_samples * self.nranks
        self._cdf = np.cumsum(w / w.sum())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_stream(self) -> np.ndarray:
        """All ``total_size`` draws of this epoch (identical on every rank)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        u = rng.random(self.total_size)
        return np.minimum(np.searchsorted(self._cdf, u * self._cdf[-1], side='right'), self.weights.size - 1)

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.epoch_stream()[self.local_rank::self.nranks].tolist()
        stop = len(mine) - len(mine) % self.batch_size if self.drop_last else len(mine)
        for start in range(0, stop, self.batch_size):
            yield mine[start:start + self.batch_size]

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)
