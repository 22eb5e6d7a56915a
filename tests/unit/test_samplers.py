"""Balanced sampling: inverse-frequency weights per task, and the weighted, sharded batch sampler."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import paddle
import pytest

from util.datasets.samplers import WeightedBatchSampler, balanced_sample_weights
from util.errors import UserError


def fake(task, targets):
    return SimpleNamespace(task_type=task, targets=np.asarray(targets), data_path='fake')


def drawn(sampler, epochs):
    out = []
    for e in range(epochs):
        sampler.set_epoch(e)
        out += [i for batch in sampler for i in batch]
    return np.asarray(out)


def test_weights_single_label_and_regression():
    w = balanced_sample_weights(fake('single_label', [0, 0, 0, 1, 2, 2]))
    np.testing.assert_allclose(w, [1 / 3, 1 / 3, 1 / 3, 1, 1 / 2, 1 / 2])
    w = balanced_sample_weights(fake('regression', np.array([0.0, 0.0, 4.0, 1.0, 1.0, 1.0], np.float32)))
    np.testing.assert_allclose(w, [1 / 2, 1 / 2, 1, 1 / 3, 1 / 3, 1 / 3])


def test_weights_multilabel_least_seen_label():
    y = np.array([[1, 0, 0],      # only the common label: 1/4
                  [1, 1, 0],      # common + mid -> mid is rarer: 1/2
                  [1, 0, 1],      # common + rare -> 1/1
                  [1, 1, 0],
                  [0, 0, 0],      # all-negative: 1/2 (two such samples)
                  [0, 0, 0]], np.float32)
    np.testing.assert_allclose(balanced_sample_weights(fake('multi_label', y)), [1 / 4, 1 / 2, 1, 1 / 2, 1 / 2, 1 / 2])
    with pytest.raises(UserError, match="task 'detection': no balancing rule"):
        balanced_sample_weights(fake('detection', [0]))


def test_sampler_balances_an_imbalanced_label_set():
    labels = np.array([0] * 500 + [1] * 50 + [2] * 5)
    sampler = WeightedBatchSampler(balanced_sample_weights(fake('single_label', labels)), batch_size=8, seed=1)
    idx = drawn(sampler, 20)                     # 20 x 552 = 11040 draws; sd of a class share ~0.0045
    share = np.bincount(labels[idx], minlength=3) / idx.size
    np.testing.assert_allclose(share, [1 / 3] * 3, atol=0.03)   # unweighted would be 0.90 / 0.09 / 0.009
    # with replacement: the 5 rare images are drawn many times each
    assert np.bincount(idx[labels[idx] == 2]).max() > 100


def test_sampler_raises_rare_multilabel_labels():
    rng = np.random.default_rng(0)
    y = np.stack([rng.random(400) < 0.6, rng.random(400) < 0.1, rng.random(400) < 0.02], 1).astype(np.float32)
    sampler = WeightedBatchSampler(balanced_sample_weights(fake('multi_label', y)), batch_size=10, seed=0)
    idx = drawn(sampler, 10)
    before, after = y.mean(0), y[idx].mean(0)
    assert after[2] > 4 * before[2] and after[1] > 2 * before[1]
    assert min(after) > 0.15


def test_sampler_deterministic_per_epoch():
    w = np.linspace(1, 3, 50)
    a, b = WeightedBatchSampler(w, 4, seed=7), WeightedBatchSampler(w, 4, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) and list(a) == list(a)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(WeightedBatchSampler(w, 4, seed=8)) != list(WeightedBatchSampler(w, 4, seed=7))


@pytest.mark.parametrize('n, world, batch, drop_last', [(103, 3, 4, True), (103, 3, 4, False), (64, 2, 8, True),
                                                        (10, 4, 3, False)])
def test_sampler_shards_one_stream(n, world, batch, drop_last):
    w = np.arange(1, n + 1, dtype=float)
    ranks = [WeightedBatchSampler(w, batch, num_replicas=world, rank=r, drop_last=drop_last, seed=5) for r in
             range(world)]
    for s in ranks:
        s.set_epoch(2)
    stream = ranks[0].epoch_stream()
    assert all((s.epoch_stream() == stream).all() for s in ranks)        # identical on every rank
    per_rank = -(-n // world)
    assert stream.size == per_rank * world
    positions = []
    for r, s in enumerate(ranks):
        batches = list(s)
        assert len(batches) == len(s)
        assert all(len(b) == batch for b in batches[:-1]) and (not drop_last or len(batches[-1]) == batch)
        mine = [i for b in batches for i in b]
        np.testing.assert_array_equal(mine, stream[r::world][:len(mine)])
        positions += list(range(r, world * len(mine), world))
    assert len(positions) == len(set(positions))                        # disjoint positions in the stream
    if not drop_last:
        assert sorted(positions) == list(range(per_rank * world))      # and together the whole stream


def test_sampler_len_matches_distributed_batch_sampler():
    ds = list(range(103))
    for world, batch, drop_last in [(1, 8, True), (3, 4, True), (3, 4, False), (2, 50, False)]:
        ref = paddle.io.DistributedBatchSampler(ds, batch, num_replicas=world, rank=0, drop_last=drop_last)
        ours = WeightedBatchSampler(np.ones(103), batch, num_replicas=world, rank=0, drop_last=drop_last)
        assert len(ours) == len(ref) and ours.num_samples == ref.num_samples


def test_sampler_works_in_a_paddle_dataloader():
    class Tiny(paddle.io.Dataset):
        def __getitem__(self, i):
            return np.float32(i), np.int64(i % 2)

        def __len__(self):
            return 20

    sampler = WeightedBatchSampler(np.r_[np.ones(10), np.zeros(10)], batch_size=5, seed=0)
    batches = [x.numpy() for x, _ in paddle.io.DataLoader(Tiny(), batch_sampler=sampler, num_workers=0)]
    assert len(batches) == 4 and all(b.max() < 10 for b in batches)      # zero weight: never drawn


def test_sampler_rejects_bad_weights():
    for w in ([], [0.0, 0.0], [1.0, -1.0], [1.0, np.nan]):
        with pytest.raises(UserError, match='finite, non-negative, not all zero'):
            WeightedBatchSampler(w, 2)
    with pytest.raises(UserError, match='--batch_size 0'):
        WeightedBatchSampler([1.0], 0)
