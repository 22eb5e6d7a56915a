"""The fine-tuning loop: ``train_one_epoch`` and ``evaluate``.

Loss, output activation, metrics, decision thresholds and predictions follow from the dataset's ``task``
(single_label, multi_label, regression) through the ``TASKS`` table; nothing here branches on a model,
dataset format or task name outside that table.

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

from util.cli import interrupt_in_backward
from util.distributed import all_reduce_mean, gather_rows, get_rank, get_world_size
from util.errors import UserError, close_matches
from util.inference import AmpConfig
from util.losses import build_loss
from util.metrics import METRIC_COLUMNS, compute_metrics, per_class_report, selection_value
from util.metrics.calibration import calibrate_outputs, temperature_applies
from util.metrics.multi_label import MULTILABEL_COLUMNS, binarize, compute_multilabel_metrics, tune_thresholds_f1
from util.metrics.regression import (
    REGRESSION_COLUMNS,
    compute_regression_metrics,
    cut_grades,
    default_grade_thresholds,
    optimise_thresholds_qwk,
)
from util.progress import Progress
from util.task_names import TASK_NAMES


class NonFiniteLossError(UserError):
    """Training produced a NaN/inf loss."""


def _per_class_rows(class_names, table: dict) -> list[dict]:
    keys = list(table)
    return [{"class": c, **{k: table[k][i] for k in keys}} for i, c in enumerate(class_names)]


def _single_label_predict(probs, num_classes, thresholds=None):
    return np.nan_to_num(probs, nan=-np.inf).argmax(axis=1)


def _single_label_metrics(y_true, probs, num_classes, class_names=None, thresholds=None, classes=None) -> dict:
    out = compute_metrics(y_true, probs, num_classes, class_names, classes=classes)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    report = per_class_report(y_true, _single_label_predict(probs, num_classes), num_classes)
    report["auroc"] = out["per_class_auroc"]
    report["ap"] = out["per_class_ap"]
    out["per_class"] = _per_class_rows(names, report)
    return out


def _multi_label_metrics(y_true, probs, num_classes, class_names=None, thresholds=None) -> dict:
    return compute_multilabel_metrics(y_true, probs, thresholds=thresholds, class_names=class_names)


def _multi_label_predict(probs, num_classes, thresholds=None):
    return binarize(probs, thresholds)  # the metrics' rule (probability > threshold), so the two agree


def _regression_metrics(y_true, outputs, num_classes, class_names=None, thresholds=None) -> dict:
    return compute_regression_metrics(y_true, outputs.reshape(-1), num_classes, tuned_thresholds=thresholds,
                                      class_names=class_names)


def _regression_tune(y_true, outputs, num_classes):
    return optimise_thresholds_qwk(y_true, outputs.reshape(-1), num_classes)


def _regression_predict(outputs, num_classes, thresholds=None):
    cuts = thresholds if thresholds is not None else default_grade_thresholds(num_classes)
    return cut_grades(outputs.reshape(-1), cuts)


def _probs(outputs_i) -> list:
    return [f"{v:.6f}" for v in outputs_i]


def _number(value: float) -> str:
    return f"{float(value):.6g}"  # 2 for 2.0, nan for NaN


# predictions_test.csv (labelled: label, outputs, decisions at the fixed and the tuned thresholds) and
# predict.py's result.csv (unlabelled: the decision as text, then the outputs), per task
def _single_label_table(names, tuned: bool):
    return ["label", "prediction"] + [f"prob_{c}" for c in names]


def _single_label_row(y, out, fixed, tuned):
    return [int(y), int(fixed)] + _probs(out)


def _single_label_result(names):
    return ["prediction"] + [f"prob_{c}" for c in names]


def _single_label_result_row(names, pred, out):
    return [names[int(pred)]] + _probs(out)


def _multi_label_table(names, tuned: bool):
    return ([f"label_{c}" for c in names] + [f"prob_{c}" for c in names] + [f"pred_{c}" for c in names]
            + ([f"pred_tuned_{c}" for c in names] if tuned else []))


def _multi_label_row(y, out, fixed, tuned):
    return ([int(v) for v in y] + _probs(out) + [int(v) for v in fixed]
            + ([int(v) for v in tuned] if tuned is not None else []))


def _multi_label_result_row(names, pred, out):
    return [";".join(c for c, v in zip(names, pred) if v)] + _probs(out)


def _regression_table(names, tuned: bool):
    return ["label", "output", "prediction"] + (["prediction_tuned"] if tuned else [])


def _regression_row(y, out, fixed, tuned):
    return [_number(float(y)), f"{out[0]:.6f}", int(fixed)] + ([int(tuned)] if tuned is not None else [])


def _regression_result_row(names, pred, out):
    return [int(pred), f"{out[0]:.6f}"]


@dataclass(frozen=True)
class TaskSpec:
    """Everything that depends on the task type, so that the loop, the reports and model selection never
    branch on it.

    ``outputs`` are ``activation(logits)``: class probabilities (single/multi-label) or the continuous grade
    [N, 1] (regression). ``thresholds`` are the task's decision cuts tuned on validation (per-label
    probability thresholds, or grade cut points); ``None`` when not tuned.
    """

    name: str
    activation: Callable  # float32 logits -> outputs
    metrics: Callable  # (y_true, outputs, num_classes, class_names, thresholds) -> dict
    columns: list  # metrics CSV columns, 'val_loss' first
    default_val_metric: str  # what --val_metric selects by default
    num_outputs: Callable[[int], int]  # num_classes -> model outputs
    label_dim: Callable[[int], int]  # num_classes -> label columns per sample
    predict: Callable  # (outputs, num_classes, thresholds) -> predictions (class / 0-1 matrix / grade)
    decode_labels: Callable  # gathered float label columns [N, label_dim] -> y_true in the task's dtype
    tune: Callable | None = None  # (y_true, outputs, num_classes) -> thresholds
    tune_by_default: bool = False
    minimize: frozenset = frozenset({"val_loss"})  # columns where lower is better
    headline: tuple = ()  # the metrics printed each epoch and drawn in training_curves.png
    loss_options: frozenset = frozenset()  # the loss flags that apply: smoothing, class_weights, pos_weight
    per_label: bool = False  # decisions are a 0/1 matrix [N, labels] (a 2 x 2 confusion matrix per label)
    # predictions_test.csv: (class_names, tuned) -> columns; (label, outputs, decision, tuned decision) -> cells
    table_columns: Callable | None = None
    table_row: Callable | None = None
    # predict.py's result.csv: class_names -> columns after "file"; (class_names, decision, outputs) -> cells
    result_columns: Callable | None = None
    result_row: Callable | None = None

    def check_metric(self, name: str, flag: str) -> str:
        """``name`` if it is one of this task's metric columns, else a ``UserError`` naming ``flag``."""
        if name not in self.columns:
            near = close_matches(name, self.columns)
            raise UserError(f"{flag} {name!r}: not a {self.name} metric (one of {', '.join(self.columns)}); "
                            + (f"did you mean {near[0]!r}? " if near else "") + "pick one of those")
        return name

    def selection_value(self, stats: dict, metric: str) -> float:
        """The number model selection maximises: the metric (negated when lower is better); NaN -> -inf."""
        value = selection_value(stats.get(metric, float("nan")))
        return -value if metric in self.minimize and math.isfinite(value) else value


TASKS: dict[str, TaskSpec] = {
    "single_label": TaskSpec(
        name="single_label",
        activation=lambda logits: F.softmax(logits.astype("float32"), axis=-1),
        metrics=_single_label_metrics,
        columns=METRIC_COLUMNS,
        default_val_metric="score",  # the reference's (f1 + roc_auc + kappa) / 3
        num_outputs=lambda k: k,
        label_dim=lambda k: 1,
        predict=_single_label_predict,
        decode_labels=lambda cols: cols[:, 0].astype(np.int64),
        minimize=frozenset({"val_loss", "hamming"}),
        headline=("accuracy", "f1", "roc_auc", "kappa", "score"),
        loss_options=frozenset({"smoothing", "class_weights"}),
        table_columns=_single_label_table,
        table_row=_single_label_row,
        result_columns=_single_label_result,
        result_row=_single_label_result_row,
    ),
    "multi_label": TaskSpec(
        name="multi_label",
        activation=lambda logits: F.sigmoid(logits.astype("float32")),
        metrics=_multi_label_metrics,
        columns=MULTILABEL_COLUMNS,
        default_val_metric="roc_auc",
        num_outputs=lambda k: k,
        label_dim=lambda k: k,
        predict=_multi_label_predict,
        decode_labels=lambda cols: np.rint(cols).astype(np.int64),
        tune=lambda y, probs, k: tune_thresholds_f1(y, probs),  # per label, maximising its F1 on val
        tune_by_default=True,
        minimize=frozenset({"val_loss", "hamming"}),
        headline=("f1_macro", "f1_micro", "roc_auc", "map", "odir_final"),
        loss_options=frozenset({"pos_weight"}),
        per_label=True,
        table_columns=_multi_label_table,
        table_row=_multi_label_row,
        result_columns=_single_label_result,  # the labels over their thresholds, ';'-joined
        result_row=_multi_label_result_row,
    ),
    "regression": TaskSpec(
        name="regression",
        activation=lambda logits: logits.astype("float32"),
        metrics=_regression_metrics,
        columns=REGRESSION_COLUMNS,
        default_val_metric="kappa_quadratic",
        num_outputs=lambda k: 1,
        label_dim=lambda k: 1,
        predict=_regression_predict,
        decode_labels=lambda cols: cols[:, 0].astype(np.float64),
        tune=_regression_tune,
        minimize=frozenset({"val_loss", "mae"}),
        headline=("accuracy", "f1", "kappa_quadratic", "mae"),
        table_columns=_regression_table,
        table_row=_regression_row,
        result_columns=lambda names: ["prediction", "output"],
        result_row=_regression_result_row,
    ),
}


assert tuple(TASKS) == TASK_NAMES, "every task type has exactly one entry in TASKS"


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"task {name!r} is not supported (known: {', '.join(TASKS)})")
    return TASKS[name]


def train_one_epoch(model, criterion: Callable, data_loader, optimizer, epoch: int, *, schedule,
                    accum_iter: int = 1, clip_grad: float | None = None, scaler=None, amp: AmpConfig | None = None,
                    logger=None, print_freq: int | None = None, global_step: int = 0, epochs: int | None = None,
                    print_interval: float = 30.0) -> tuple[dict, int]:
    """Train for one epoch.

    The LR is set at every optimizer step from the fractional epoch ``epoch + step / len(loader)``
    (the reference's per-iteration schedule): ``schedule.adjust(optimizer, e)`` applies it and returns it.
    Returns the epoch's averages ``{'loss', 'lr'}`` and the updated optimizer-step counter.

    Progress (rank 0, ``util.progress.Progress``): a bar on a terminal; otherwise a line at step 1, every
    ``print_interval`` seconds, at least every ``print_freq`` steps (``None``: by time only) and at the end.
    ``epochs`` (the run's total) adds the run's ETA.
    """
    amp = amp or AmpConfig()
    model.train()
    n = len(data_loader)
    world = get_world_size()
    distributed = world > 1
    optimizer.clear_grad()
    loss_sum, lr, count = 0.0, 0.0, 0
    # "with": a terminal bar is closed on an error too, before the error is printed
    with Progress(n, f"Epoch {epoch}", print_freq, enabled=get_rank() == 0, interval=print_interval, epoch=epoch,
                  epochs=epochs, leave=True) as progress:
        for step, (samples, targets) in enumerate(data_loader):
            if step % accum_iter == 0:
                lr = schedule.adjust(optimizer, epoch + step / n)
            with amp.autocast():
                outputs = amp.forward(model, samples)  # GPU: under Paddle's AMP; CPU bf16: a static program
                loss = criterion(outputs, targets)
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"epoch {epoch}, step {step}: the training loss is {loss_value} (a finite number was "
                    "expected); lower the learning rate (--blr/--lr), enable --clip_grad, or check the data; "
                    "the last saved checkpoint was left untouched")
            update = (step + 1) % accum_iter == 0
            sync = contextlib.nullcontext() if (update or not distributed) else model.no_sync()
            with sync, interrupt_in_backward():
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
            # images of all processes: each rank trains a batch per step
            progress.update(step, images=len(targets) * world, loss=loss_value, lr=lr)
    return {"loss": all_reduce_mean(loss_sum / max(count, 1)), "lr": lr}, global_step


@paddle.no_grad()
def evaluate(model, data_loader, task: TaskSpec, num_classes: int, *, loss_fn: Callable | None = None,
             thresholds=None, tune: bool = False, class_names=None, amp: AmpConfig | None = None,
             header: str = "Eval", print_freq: int | None = None,
             print_interval: float = 30.0, classes=None,
             temperature: float | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Evaluate on a loader whose sampler is a ``ShardSampler`` (or sequential in a single process).

    Every example is counted exactly once whatever the number of processes: each rank evaluates its
    shard, the rows are gathered and put back in dataset order. ``loss_fn`` is a per-sample loss (default:
    the task's default loss). With ``tune`` the task's decision thresholds are fitted on these outputs
    (validation) and used for the ``*_tuned`` metrics; otherwise the given ``thresholds`` are (test).
    ``classes`` (single-label): the class indices the macro averages run over (default all).
    Returns (metrics, y_true, outputs); ``metrics['thresholds']`` holds the thresholds used (or None).
    Progress under ``header`` as in ``train_one_epoch`` (``print_freq``, ``print_interval``).

    ``temperature`` (fitted on validation by ``--calibrate``; probability tasks only, ignored for regression):
    the loss is that of the logits divided by it, and the outputs are ``apply_temperature(outputs, T)``
    before the thresholds are tuned or the metrics computed. Given multi-label thresholds (tuned on the
    uncalibrated validation outputs) move through the same increasing map
    (``apply_temperature_to_thresholds``), so every decision is the one the uncalibrated model makes and the
    returned ``metrics['thresholds']`` are on the scale of the returned outputs. ``None`` changes nothing.
    """
    amp = amp or AmpConfig()
    loss_fn = loss_fn or build_loss(task.name, "auto", reduction="none")
    scale = float(temperature) if temperature_applies(task.name, temperature) else None
    model.eval()
    rows = []
    width = task.label_dim(num_classes)
    world = get_world_size()
    with Progress(len(data_loader), header, print_freq, enabled=get_rank() == 0, interval=print_interval) as progress:
        for step, (samples, targets) in enumerate(data_loader):
            with amp.autocast():
                logits = amp.forward(model, samples)
            logits = logits.astype("float32")
            losses = loss_fn(logits if scale is None else logits / scale, targets).reshape([-1, 1])
            outputs = task.activation(logits)
            target_cols = targets.astype("float64").reshape([-1, width])
            rows.append(np.concatenate([target_cols.numpy(), losses.numpy().astype(np.float64),
                                        outputs.numpy().astype(np.float64)], axis=1))
            progress.update(step, images=len(targets) * world)  # the shards differ by one image at most
    n_out = task.num_outputs(num_classes)
    local = np.concatenate(rows, axis=0) if rows else np.zeros((0, width + 1 + n_out))
    parts = gather_rows(local)
    # rank r holds examples r, r + world, r + 2 * world, ... (ShardSampler): interleave back to order
    total = sum(len(p) for p in parts)
    ordered = np.zeros((total, local.shape[1]))
    for r, p in enumerate(parts):
        ordered[r::len(parts)][: len(p)] = p
    y_true = task.decode_labels(ordered[:, :width])
    outputs = ordered[:, width + 1:]
    outputs, thresholds = calibrate_outputs(outputs, thresholds, scale, task.name)
    if tune and task.tune is not None and total:
        thresholds = np.asarray(task.tune(y_true, outputs, num_classes), dtype=np.float64)
    subset = {} if classes is None else {"classes": classes}  # single-label data with some of the classes
    metrics = task.metrics(y_true, outputs, num_classes, class_names, thresholds, **subset)
    metrics = {"val_loss": float(ordered[:, width].mean()) if total else float("nan"), **metrics,
               "thresholds": None if thresholds is None else [float(t) for t in thresholds]}
    model.train()
    return metrics, y_true, outputs
