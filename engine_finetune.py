"""The fine-tuning loop: ``train_one_epoch`` and ``evaluate``.

Loss, output activation and metrics follow from the dataset's ``task`` through ``TASKS``; nothing here
branches on a model or dataset name.

References: RETFound_MAE / MAE ``engine_finetune.py`` (per-iteration LR, gradient accumulation, loss
scaling, non-finite loss check, metric set of the evaluation).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import paddle
import paddle.nn.functional as F

from util.distributed import all_reduce_mean, gather_rows, get_rank, get_world_size
from util.errors import UserError
from util.logger import Progress
from util.metrics import METRIC_COLUMNS, compute_metrics


class NonFiniteLossError(UserError):
    """Training produced a NaN/inf loss."""


def soft_cross_entropy(logits: paddle.Tensor, target: paddle.Tensor, smoothing: float = 0.0) -> paddle.Tensor:
    """Cross-entropy with label smoothing spread over all classes (timm's LabelSmoothingCrossEntropy)."""
    logp = F.log_softmax(logits.astype("float32"), axis=-1)
    nll = -paddle.take_along_axis(logp, target.reshape([-1, 1]).astype("int64"), axis=1).squeeze(1)
    if smoothing <= 0:
        return nll.mean()
    return ((1.0 - smoothing) * nll - smoothing * logp.mean(axis=-1)).mean()


@dataclass(frozen=True)
class TaskSpec:
    """How a task turns logits into a loss, probabilities and metrics."""

    train_loss: Callable[..., Callable]  # (smoothing=...) -> loss_fn(logits, target)
    eval_loss: Callable  # per-sample loss, reduction none
    activation: Callable  # logits -> probabilities
    metrics: Callable  # (y_true, probs) -> dict
    columns: list


def _single_label_train_loss(smoothing: float = 0.0) -> Callable:
    return lambda logits, target: soft_cross_entropy(logits, target, smoothing)


def _single_label_eval_loss(logits, target):
    return F.cross_entropy(logits.astype("float32"), target.reshape([-1, 1]).astype("int64"), reduction="none")


TASKS: dict[str, TaskSpec] = {
    "single_label": TaskSpec(
        train_loss=_single_label_train_loss,
        eval_loss=_single_label_eval_loss,
        activation=lambda logits: F.softmax(logits.astype("float32"), axis=-1),
        metrics=compute_metrics,
        columns=METRIC_COLUMNS,
    ),
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"task {name!r} is not supported (known: {', '.join(TASKS)})")
    return TASKS[name]


@dataclass
class AmpConfig:
    enabled: bool = False
    dtype: str = "float16"

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=True, dtype=self.dtype, level="O1")


def train_one_epoch(model, criterion: Callable, data_loader, optimizer, epoch: int, *,
                    set_lr: Callable[[float], float], accum_iter: int = 1, clip_grad: float | None = None,
                    scaler=None, amp: AmpConfig | None = None, logger=None, print_freq: int = 20,
                    global_step: int = 0) -> tuple[dict, int]:
    """Train for one epoch.

    The LR is set at every optimizer step from the fractional epoch ``epoch + step / len(loader)``
    (the reference's per-iteration schedule); ``set_lr`` applies it to the optimizer and returns it.
    Returns the epoch's averages ``{'loss', 'lr'}`` and the updated optimizer-step counter.
    """
    amp = amp or AmpConfig()
    model.train()
    n = len(data_loader)
    distributed = get_world_size() > 1
    progress = Progress(n, f"Epoch {epoch}", print_freq, enabled=get_rank() == 0)
    optimizer.clear_grad()
    loss_sum, lr, count = 0.0, 0.0, 0
    for step, (samples, targets) in enumerate(data_loader):
        if step % accum_iter == 0:
            lr = set_lr(epoch + step / n)
        with amp.autocast():
            outputs = model(samples)
            loss = criterion(outputs, targets)
        loss_value = float(loss)
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"epoch {epoch}, step {step}: the training loss is {loss_value} (a finite number was "
                "expected); lower the learning rate (--blr/--lr), enable --clip_grad, or check the data; "
                "the last saved checkpoint was left untouched")
        update = (step + 1) % accum_iter == 0
        sync = contextlib.nullcontext() if (update or not distributed) else model.no_sync()
        with sync:
            scaled = loss / accum_iter
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        if update:
            if clip_grad:
                if scaler is not None:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                # the global norm over all parameters, as torch's clip_grad_norm_ in the reference; not the
                # optimizer's grad_clip, which Paddle applies to each parameter group separately
                paddle.nn.utils.clip_grad_norm_(list(model.parameters()), clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.clear_grad()
            global_step += 1
            reduced = all_reduce_mean(loss_value)  # collective: every rank calls it, logger or not
            if logger is not None:
                logger.scalar("train/loss", reduced, global_step)
                logger.scalar("train/lr", lr, global_step)
        loss_sum += loss_value
        count += 1
        progress.update(step, loss=loss_value, lr=lr)
    return {"loss": all_reduce_mean(loss_sum / max(count, 1)), "lr": lr}, global_step


@paddle.no_grad()
def evaluate(model, data_loader, task: TaskSpec, num_classes: int, *, amp: AmpConfig | None = None,
             header: str = "Eval", print_freq: int = 20) -> tuple[dict, np.ndarray, np.ndarray]:
    """Evaluate on a loader whose sampler is a ``ShardSampler`` (or sequential in a single process).

    Every example is counted exactly once whatever the number of processes: each rank evaluates its
    shard, the rows are gathered and put back in dataset order. Returns (metrics, y_true, probs).
    """
    amp = amp or AmpConfig()
    model.eval()
    rows = []
    progress = Progress(len(data_loader), header, print_freq, enabled=get_rank() == 0)
    for step, (samples, targets) in enumerate(data_loader):
        with amp.autocast():
            logits = model(samples)
        logits = logits.astype("float32")
        losses = task.eval_loss(logits, targets).reshape([-1, 1])
        probs = task.activation(logits)
        target_col = targets.reshape([-1, 1]).astype("float64")
        rows.append(np.concatenate([target_col.numpy(), losses.numpy().astype(np.float64),
                                    probs.numpy().astype(np.float64)], axis=1))
        progress.update(step)
    local = np.concatenate(rows, axis=0) if rows else np.zeros((0, 2 + num_classes))
    parts = gather_rows(local)
    # rank r holds examples r, r + world, r + 2 * world, ... (ShardSampler): interleave back to order
    total = sum(len(p) for p in parts)
    ordered = np.zeros((total, local.shape[1]))
    for r, p in enumerate(parts):
        ordered[r::len(parts)][: len(p)] = p
    y_true = ordered[:, 0].astype(np.int64)
    probs = ordered[:, 2:]
    metrics = task.metrics(y_true, probs, num_classes)
    metrics = {"val_loss": float(ordered[:, 1].mean()) if total else float("nan"), **metrics}
    model.train()
    return metrics, y_true, probs
