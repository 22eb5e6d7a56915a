"""Training curves as a PNG in the run folder, for people who would rather look than read log.txt.

Reads the run's ``log.txt`` (one JSON line per epoch) and draws train/val loss and the validation metrics
the model selection uses, with the selected (best) epoch marked. VisualDL shows the same live; this file
stays with the run.
"""
from __future__ import annotations

import json
import math
import os

from util.fileio import atomic_path


def _series(records: list[dict], key: str) -> list[float]:
    out = []
    for r in records:
        v = r.get(key)
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
    ax_loss.plot(epochs, _series(records, "val_val_loss"), marker="o", label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("loss")
    for name in metrics:
        ax_val.plot(epochs, _series(records, f"val_{name}"), marker="o", label=name)
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
