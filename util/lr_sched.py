"""Learning-rate schedule of the fine-tuning recipe: linear warmup then half-cycle cosine, set per iteration.

The engine calls ``adjust_learning_rate`` before every optimizer step with the fractional epoch
``epoch + step / len(loader)``; it sets the optimizer's base LR with ``optimizer.set_lr``, which Paddle
multiplies by each parameter group's fixed scale (util/lr_decay.py). (Writing the LR into the group dicts
instead -- the earlier port's fault -- is ignored by Paddle and trains at a constant LR.)

References: facebookresearch/mae util/lr_sched.py; RETFound_MAE main_finetune.py (effective LR rule).
"""
from __future__ import annotations

import math

import paddle


def effective_lr(blr: float, lr: float | None, batch_size: int, accum_iter: int = 1,
                 world_size: int = 1) -> float:
    """The absolute peak LR: ``lr`` when given, else ``blr * batch_size * accum_iter * world_size / 256``.

    The one place this rule is computed; log its result, do not write it back into the config.
    """
    if lr is not None:
        return float(lr)
    return float(blr) * int(batch_size) * int(accum_iter) * int(world_size) / 256.0


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """LR at fractional ``epoch``: ``lr * epoch / warmup_epochs`` during warmup, then
    ``min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (epoch - warmup) / (epochs - warmup)))``.

    Beyond the reference's domain: at or past ``epochs`` (and when ``warmup_epochs >= epochs``, once the
    warmup is over) the LR stays at ``min_lr`` instead of rising along the cosine again.
    """
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = epochs - warmup_epochs
    if span <= 0 or epoch >= epochs:
        return min_lr
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))


def adjust_learning_rate(optimizer: paddle.optimizer.Optimizer, epoch: float, lr: float, min_lr: float,
                         warmup_epochs: float, epochs: float) -> float:
    """Set the optimizer's LR to ``lr_at(epoch, ...)`` (per-group scales apply on top); return it."""
    value = lr_at(epoch, lr, min_lr, warmup_epochs, epochs)
    optimizer.set_lr(float(value))
    return value
