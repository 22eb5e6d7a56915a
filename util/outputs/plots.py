"""Training curves as a PNG in the run folder, for people who would rather look than read log.txt.

Reads the run's ``log.txt`` (one JSON line per epoch) and draws train/val loss and the validation metrics
the model selection uses, with the selected (best) epoch marked. VisualDL shows the same live; this file
stays with the run.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

from util.fileio import atomic_path
from util.metrics.common import confusion_matrix
from util.outputs.run_log import metric_name


def _series(records: list[dict], *keys: str) -> list[float]:
    """The values of the first of ``keys`` each record has (a resumed run's log.txt may hold lines written
    before the keys were renamed: ``val_val_loss`` then ``val_loss``)."""
    out = []
    for r in records:
        v = next((r[k] for k in keys if k in r), None)
        out.append(float(v) if isinstance(v, (int, float)) and math.isfinite(v) else float("nan"))
    return out


def save_training_curves_png(log_path: str, path: str, best_epoch: int | None = None,
                             metrics: tuple[str, ...] = ("roc_auc", "f1", "kappa", "score")) -> str | None:
    """Draw ``log.txt`` into ``path``; returns ``path``, or ``None`` when the log has no epoch yet."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not os.path.isfile(log_path):
        return None
    with open(log_path, encoding="utf8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    records = [r for r in records if "epoch" in r]
    if not records:
        return None
    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_val = fig.subplots(1, 2)
    ax_loss.plot(epochs, _series(records, "train_loss"), marker="o", label="train loss")
    ax_loss.plot(epochs, _series(records, "val_loss", "val_val_loss"), marker="o", label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("loss")
    for name in metrics:
        ax_val.plot(epochs, _series(records, f"val_{metric_name(name)}", f"val_{name}"), marker="o",
                    label=metric_name(name))
    ax_val.set_xlabel("epoch")
    ax_val.set_title("validation" + (" (score = (F1 + AUROC + kappa) / 3)" if "score" in metrics else ""))
    for ax in (ax_loss, ax_val):
        if best_epoch is not None and best_epoch >= 0:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    return path


def save_confusion_matrix_png(cm: np.ndarray, class_names: Sequence[str] | None, path: str,
                              title: str = 'Confusion matrix') -> str:
    """Write a confusion-matrix image: colour = row-normalised fraction (recall per true class), text =
    counts. Sizes scale with the number of classes so ~40 classes stay readable. Written atomically;
    uses matplotlib's Agg canvas directly (no pyplot, no global backend change). Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    k = cm.shape[0]
    if cm.shape != (k, k):
        raise ValueError(f"save_confusion_matrix_png: cm must be square, got {cm.shape}")
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"save_confusion_matrix_png: {len(names)} class names for {k} classes")
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)

    side = min(max(4.0, 0.45 * k + 2.5), 24.0)
    font = 10 if k <= 10 else max(6, 10 - (k - 10) // 8)  # ~0.45 in per cell fits 3 digits at 7 pt
    fig = Figure(figsize=(side + 1.2, side), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap='Blues', vmin=0.0, vmax=1.0, interpolation='nearest')
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label='fraction of true class')
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(names, rotation=90 if k > 8 else 45, ha='center' if k > 8 else 'right',
                       fontsize=font)
    ax.set_yticklabels(names, fontsize=font)
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    ax.set_title(title)
    for t in range(k):
        for p in range(k):
            if cm[t, p] or k <= 20:
                ax.text(p, t, str(int(cm[t, p])), ha='center', va='center', fontsize=font,
                        color='white' if norm[t, p] > 0.5 else 'black')
    fig.tight_layout()

    with atomic_path(path, suffix='.png') as tmp:
        fig.savefig(tmp, format='png')
    return path


def save_multilabel_confusion_png(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str],
                                  path: str, title: str) -> str:
    """One 2 x 2 confusion matrix (rows true 0/1, columns predicted 0/1) per label, in a grid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(class_names)
    cols = min(4, n)
    rows = int(math.ceil(n / cols))
    fig = Figure(figsize=(2.6 * cols, 2.6 * rows + 0.4), dpi=120)
    FigureCanvasAgg(fig)
    for i, name in enumerate(class_names):
        ax = fig.add_subplot(rows, cols, i + 1)
        cm = confusion_matrix(y_true[:, i], y_pred[:, i], 2)
        totals = cm.sum(axis=1, keepdims=True)
        norm = np.divide(cm, totals, out=np.zeros(cm.shape), where=totals > 0)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for t in range(2):
            for p in range(2):
                ax.text(p, t, str(int(cm[t, p])), ha="center", va="center",
                        color="white" if norm[t, p] > 0.5 else "black")
        ax.set_xticks([0, 1])
        ax.set_yticks([0, 1])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(str(name), fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path
