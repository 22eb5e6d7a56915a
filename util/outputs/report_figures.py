"""The pictures of ``report.html``, each returned as PNG bytes (the report embeds them; nothing is written here
except the training curves, which ``util.outputs.plots`` draws into a temporary file).

Drawn on matplotlib's Agg canvas directly (no pyplot, no global backend change), as ``util.outputs.plots``
does. Curves: ROC and precision-recall per class (one-vs-rest for single-label classes, per label for
multi-label data, per grade threshold ``grade >= g`` for regression), the row-normalised confusion matrix,
the reliability diagram and the referral curve.

References: scikit-learn ``roc_curve`` / ``precision_recall_curve`` definitions; Guo et al., "On Calibration of
Modern Neural Networks" (ICML 2017) for the reliability diagram.
"""
from __future__ import annotations

import io
import math
import os
import tempfile
from typing import Sequence

import numpy as np
from sklearn import metrics as skm

from util.metrics.common import confusion_matrix
from util.metrics.multi_label import binarize
from util.metrics.regression import cut_grades, default_grade_thresholds
from util.outputs.plots import save_training_curves_png


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def binary_problems(task_name: str, y_true, outputs, class_names: Sequence[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The yes/no questions the ROC and PR curves answer, as ``(name, truth 0/1, score)``: each class against
    the rest (single-label), each label (multi-label), each ``grade >= g`` for g = 1..K-1 (regression, scored
    by the continuous output). Rows with a non-finite score are left out."""
    y = np.asarray(y_true)
    out = np.asarray(outputs, dtype=np.float64)
    names = [str(c) for c in class_names]
    problems = []
    if task_name == "single_label":
        for k, name in enumerate(names):
            problems.append((name, (y.reshape(-1) == k).astype(np.int64), out[:, k]))
    elif task_name == "multi_label":
        for k, name in enumerate(names):
            problems.append((name, (y[:, k] > 0.5).astype(np.int64), out[:, k]))
    else:
        grade = np.rint(y.astype(np.float64).reshape(-1))
        score = out.reshape(-1)
        for g in range(1, len(names)):
            problems.append((f"grade >= {names[g]}", (grade >= g).astype(np.int64), score))
    return [(n, t[np.isfinite(s)], s[np.isfinite(s)]) for n, t, s in problems]


def _defined(truth: np.ndarray) -> bool:
    return 0 < int(truth.sum()) < len(truth)


def roc_pr_png(task_name: str, y_true, outputs, class_names: Sequence[str]) -> tuple[bytes | None, list[str]]:
    """ROC (left) and precision-recall (right) curves of every binary problem, AUROC / AP in the legends.
    Returns the PNG (``None`` when no problem has both positives and negatives) and one note per problem left
    out."""
    notes, drawn = [], []
    for name, truth, score in binary_problems(task_name, y_true, outputs, class_names):
        if _defined(truth):
            drawn.append((name, truth, score))
        else:
            what = "no positive" if truth.sum() == 0 else "no negative"
            notes.append(f"{name}: {what} case in the test split, so its ROC and precision-recall curves are "
                         "undefined")
    if not drawn:
        return None, notes
    fig = _figure(12, 5.2)
    ax_roc, ax_pr = fig.subplots(1, 2)
    for name, truth, score in drawn:
        fpr, tpr, _ = skm.roc_curve(truth, score)
        line, = ax_roc.plot(fpr, tpr, label=f"{name} (AUC {skm.roc_auc_score(truth, score):.3f})")
        precision, recall, _ = skm.precision_recall_curve(truth, score)
        ax_pr.step(recall, precision, where="post", color=line.get_color(),
                   label=f"{name} (AP {skm.average_precision_score(truth, score):.3f})")
    ax_roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax_roc.set_xlabel("1 - specificity (false positive rate)")
    ax_roc.set_ylabel("sensitivity (true positive rate)")
    ax_roc.set_title("ROC")
    ax_pr.set_xlabel("recall (sensitivity)")
    ax_pr.set_ylabel("precision (positive predictive value)")
    ax_pr.set_title("precision-recall")
    for ax in (ax_roc, ax_pr):
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if ax is ax_roc else "lower left")
    return _png(fig), notes


def decisions(task_name: str, outputs, num_classes: int, thresholds=None) -> np.ndarray:
    """The predictions the confusion matrix counts: the top class, the labels over their thresholds (0.5
    when none), or the grade between the cuts (midpoints when none; -1 for a NaN output)."""
    out = np.asarray(outputs, dtype=np.float64)
    if task_name == "single_label":
        return np.nan_to_num(out, nan=-np.inf).argmax(axis=1)
    if task_name == "multi_label":
        return binarize(out, thresholds)
    cuts = thresholds if thresholds is not None else default_grade_thresholds(num_classes)
    return cut_grades(out.reshape(-1), cuts)


def _matrix(ax, cm: np.ndarray, names: list[str], font: int) -> None:
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    k = cm.shape[0]
    ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(names, rotation=90 if k > 8 else 45, ha="center" if k > 8 else "right", fontsize=font)
    ax.set_yticklabels(names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for t in range(k):
        for p in range(k):
            if rows[t, 0] and (cm[t, p] or k <= 12):
                ax.text(p, t, f"{norm[t, p]:.2f}\n({int(cm[t, p])})", ha="center", va="center", fontsize=font,
                        color="white" if norm[t, p] > 0.5 else "black")


def confusion_png(task_name: str, y_true, outputs, class_names: Sequence[str], thresholds=None) -> bytes:
    """The confusion matrix normalised per true class (each row sums to 1: the diagonal is the sensitivity
    of each class), with the counts in brackets; multi-label: a 2 x 2 matrix per label."""
    names = [str(c) for c in class_names]
    pred = decisions(task_name, outputs, len(names), thresholds)
    y = np.asarray(y_true)
    if task_name == "multi_label":
        cols = min(4, len(names))
        rows = int(math.ceil(len(names) / cols))
        fig = _figure(3.0 * cols, 3.0 * rows)
        for i, name in enumerate(names):
            ax = fig.add_subplot(rows, cols, i + 1)
            _matrix(ax, confusion_matrix(np.rint(y[:, i]), pred[:, i], 2), ["no", "yes"], 9)
            ax.set_title(name, fontsize=9)
        return _png(fig)
    truth = np.rint(np.asarray(y, dtype=np.float64).reshape(-1)).astype(np.int64)
    ok = pred >= 0  # a NaN regression output has no grade
    k = len(names)
    side = min(max(4.5, 0.55 * k + 2.5), 20.0)
    fig = _figure(side + 0.5, side)
    _matrix(fig.add_subplot(1, 1, 1), confusion_matrix(truth[ok], pred[ok], k), names,
            10 if k <= 10 else max(5, 10 - (k - 10) // 6))
    return _png(fig)


def reliability_png(before: dict, after: dict | None = None) -> bytes:
    """Reliability diagram: mean confidence against observed accuracy per bin (the diagonal is perfect
    calibration), marker area by the bin's count; ``after`` (temperature-scaled) drawn beside ``before``."""
    fig = _figure(6.5, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    series = [("before temperature scaling" if after else "model", before, "o-")]
    if after:
        series.append(("after temperature scaling", after, "s--"))
    for label, summary, style in series:
        bins = [b for b in summary.get("bins", []) if b.get("count", 0) > 0]
        if not bins:
            continue
        conf = [float(b["confidence"]) for b in bins]
        acc = [float(b["accuracy"]) for b in bins]
        total = sum(int(b["count"]) for b in bins)
        line, = ax.plot(conf, acc, style, label=f"{label} (ECE {float(summary['ece']):.3f}, "
                                                f"Brier {float(summary['brier']):.3f})")
        ax.scatter(conf, acc, s=[20 + 300 * int(b["count"]) / total for b in bins], color=line.get_color(),
                   alpha=0.35)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability (confidence)")
    ax.set_ylabel("observed frequency (accuracy)")
    ax.set_title("reliability diagram")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def referral_png(curve: dict) -> bytes:
    """The metric on the cases kept against the fraction of most uncertain cases referred to a clinician."""
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    fractions = [100 * float(f) for f in curve["fraction"]]
    ax.plot(fractions, [float(m) for m in curve["metric"]], "o-")
    ax.set_xlabel("most uncertain cases referred (%)")
    ax.set_ylabel(f"{curve.get('metric_name', 'metric')} on the cases kept")
    ax.set_title("referral curve")
    ax.grid(alpha=0.3)
    return _png(fig)


def training_png(log_path: str | None, metrics: Sequence[str], best_epoch: int | None = None) -> bytes | None:
    """``util.outputs.plots.save_training_curves_png`` of ``log_path`` as bytes; ``None`` when there is no log
    or it has no epoch (an ``--eval`` run)."""
    if not log_path or not os.path.isfile(log_path):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = save_training_curves_png(log_path, os.path.join(tmp, "curves.png"), best_epoch=best_epoch,
                                        metrics=tuple(metrics))
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()
