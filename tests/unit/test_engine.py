"""The training step as the optimizer really applies it: gradient accumulation, clipping, per-iteration LR."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

import engine_finetune as engine
from models import create_model
from util.losses import build_loss, soft_cross_entropy
from util.lr_decay import build_optimizer


def _model(seed=0):
    paddle.seed(seed)
    return create_model("vit_test", num_classes=3, drop_path_rate=0.0, input_size=32)


def _data(n=8, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 3, size=n).astype(np.int64)
    return x, y


def _loader(x, y, batch):
    return [(paddle.to_tensor(x[i:i + batch]), paddle.to_tensor(y[i:i + batch])) for i in range(0, len(x), batch)]


def _train(batch, accum):
    model = _model()
    # a large Adam epsilon: with 1e-8, parameters whose true gradient is zero (the attention key bias)
    # get updates of size lr from float noise, which differs between any two summation orders
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.75, eps=1e-3)
    seen = []

    class Schedule:  # records the fractional epochs the engine asks for
        def adjust(self, optimizer, e):
            seen.append(e)
            optimizer.set_lr(1e-3 * (1 + e))
            return optimizer.get_lr()

    x, y = _data()
    criterion = build_loss("single_label", "ce", smoothing=0.1)
    stats, steps = engine.train_one_epoch(model, criterion, _loader(x, y, batch), opt, 0, schedule=Schedule(),
                                          accum_iter=accum)
    return model, seen, steps, stats


def test_accumulating_two_half_batches_equals_one_full_batch():
    full, lr_full, steps_full, _ = _train(batch=4, accum=1)
    accum, lr_accum, steps_accum, _ = _train(batch=2, accum=2)
    assert steps_full == steps_accum == 2
    # the LR is set once per optimizer step, from the same fractional epochs
    assert lr_full == pytest.approx([0.0, 0.5]) and lr_accum == pytest.approx([0.0, 0.5])
    a, b = full.state_dict(), accum.state_dict()
    moved = 0
    for k in a:
        np.testing.assert_allclose(b[k].numpy(), a[k].numpy(), atol=2e-6, err_msg=k)
        moved += not np.allclose(a[k].numpy(), _model().state_dict()[k].numpy())
    assert moved > 10  # training really changed the weights


def test_without_accumulation_the_half_batches_differ():
    full, *_ = _train(batch=4, accum=1)
    half, *_ = _train(batch=2, accum=1)
    diff = max(np.abs(full.state_dict()[k].numpy() - half.state_dict()[k].numpy()).max() for k in full.state_dict())
    assert diff > 1e-4  # so the equality above is not vacuous


@pytest.mark.parametrize("clip", [None, "tiny"])
def test_clip_grad_scales_the_global_norm_before_adamw(clip):
    x, y = _data(4)
    probe = _model()
    loss = soft_cross_entropy(probe(paddle.to_tensor(x)), paddle.to_tensor(y))
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in probe.named_parameters() if p.grad is not None}
    gnorm = float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values())))
    max_norm = None if clip is None else gnorm * 1e-7  # clipped grads ~1e-9..1e-8: Adam's eps (1e-8) shows it

    model = _model()
    lr = 1e-3
    opt = build_optimizer(model, lr=lr, weight_decay=0.05, layer_decay=0.75)
    before = model.head.bias.numpy().copy()
    engine.train_one_epoch(model, soft_cross_entropy, _loader(x, y, 4), opt, 0,
                           schedule=_Fixed(lr), clip_grad=max_norm)
    g = grads["head.bias"] * (1.0 if max_norm is None else max_norm / gnorm)
    expected = before - lr * g / (np.abs(g) + 1e-8)  # first AdamW step; head.bias: no decay, LR scale 1
    np.testing.assert_allclose(model.head.bias.numpy(), expected, rtol=1e-3, atol=1e-9)


class _Fixed:
    """A schedule that keeps the LR at ``lr``."""

    def __init__(self, lr=1e-3):
        self.lr = lr

    def adjust(self, optimizer, e):
        optimizer.set_lr(self.lr)
        return self.lr


def test_non_finite_loss_names_epoch_and_step():
    model = _model()
    opt = build_optimizer(model, lr=1e-3)
    x, y = _data(8)
    x[4:] = np.nan
    with pytest.raises(engine.NonFiniteLossError, match=r"epoch 3, step 1"):
        engine.train_one_epoch(model, soft_cross_entropy, _loader(x, y, 4), opt, 3, schedule=_Fixed())
