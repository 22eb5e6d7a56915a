"""Files a user reads after a run: per-class tables, per-image predictions, confusion matrices, thresholds.

Every writer works from what ``engine_finetune.evaluate`` returns (metrics with a ``per_class`` table,
labels and outputs in dataset order) and the task's ``predict``, so nothing here branches on the task name
except the choice of confusion-matrix picture (one K x K matrix for classes and grades; one 2 x 2 matrix
per label for multi-label data).
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Sequence

import numpy as np

from util.fileio import atomic_path, display_path
from util.metrics.common import confusion_matrix, constant_output_warning
from util.outputs.plots import save_confusion_matrix_png, save_multilabel_confusion_png
from util.outputs.run_log import EVAL_LOSS_KEY, metric_name


def _fmt(value) -> str:
    if isinstance(value, (float, np.floating)):
        return "nan" if not math.isfinite(float(value)) else f"{float(value):.6g}"
    return str(value)


def per_class_columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def append_per_class_csv(path: str, rows: list[dict], epoch: int | None = None) -> None:
    """Append one row per class to ``path`` (header written when the file is new), tagged with ``epoch``."""
    if not rows:
        return
    cols = per_class_columns(rows)
    new = not os.path.isfile(path)
    with open(path, "a", newline="", encoding="utf8") as f:
        w = csv.writer(f)
        if new:
            w.writerow((["epoch"] if epoch is not None else []) + cols)
        for r in rows:
            w.writerow(([epoch] if epoch is not None else []) + [_fmt(r.get(c, "")) for c in cols])


def format_metrics(split: str, stats: dict, columns: Sequence[str]) -> str:
    """One console line of an evaluation, the split said once: ``test loss 0.8123, accuracy 0.6000, ...``
    (``engine_finetune.evaluate`` calls its loss ``val_loss`` whatever the split)."""
    cells, seen = [], set()
    for key in columns:
        name = metric_name(key)
        if key in stats and name not in seen:
            seen.add(name)
            cells.append(f"{split} {name} {float(stats[key]):.4f}" if key == EVAL_LOSS_KEY
                         else f"{name} {float(stats[key]):.4f}")
    return ", ".join(cells)


def test_summary(stats: dict, outputs, columns: Sequence[str]) -> list[str]:
    """The console lines of the test: its metrics, the thresholds tuned on val (if any), and a warning when
    the model gave every image the same output."""
    lines = [format_metrics("test", stats, columns)]
    if stats.get("thresholds") is not None:
        lines.append("test thresholds (tuned on val): " + ", ".join(f"{t:.3f}" for t in stats["thresholds"]))
    return lines + constant_output_warning(outputs)


def format_per_class(rows: list[dict], keys: Sequence[str] = ("precision", "recall", "f1", "support")) -> str:
    """A fixed-width per-class table for the console."""
    keys = [k for k in keys if rows and k in rows[0]]
    width = max([5] + [len(str(r["class"])) for r in rows])
    lines = [f"{'class':<{width}}  " + "  ".join(f"{k:>9}" for k in keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r[k]
            cells.append(f"{int(v):>9d}" if k == "support" else f"{float(v):>9.4f}")
        lines.append(f"{str(r['class']):<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def save_thresholds_json(path: str, task: str, class_names: Sequence[str], thresholds, source: str) -> None:
    """The decision thresholds a run uses at test time, and where they were tuned."""
    with atomic_path(path, suffix=".json") as tmp:
        with open(tmp, "w", encoding="utf8") as f:
            json.dump({"task": task, "source": source, "class_names": list(class_names),
                       "thresholds": None if thresholds is None else [float(t) for t in thresholds]}, f, indent=2)


def write_test_report(run_dir: str, task, stats: dict, y_true: np.ndarray, outputs: np.ndarray, dataset,
                      num_classes: int) -> list[str]:
    """per_class_test.csv, predictions_test.csv and the confusion matrix picture(s); returns the paths."""
    class_names = list(dataset.class_names)
    thresholds = stats.get("thresholds")
    written = []
    path = os.path.join(run_dir, "per_class_test.csv")
    if os.path.exists(path):
        os.remove(path)
    append_per_class_csv(path, stats.get("per_class", []))
    written.append(path)

    fixed = task.predict(outputs, num_classes, None)
    tuned = task.predict(outputs, num_classes, thresholds) if thresholds is not None else None
    if task.per_label:  # one 0/1 column per label
        p = save_multilabel_confusion_png(y_true, fixed, class_names,
                                          os.path.join(run_dir, "confusion_matrix_test.png"),
                                          "Test confusion per label (threshold 0.5)")
        written.append(p)
        if tuned is not None:
            written.append(save_multilabel_confusion_png(
                y_true, tuned, class_names, os.path.join(run_dir, "confusion_matrix_test_tuned.png"),
                "Test confusion per label (thresholds tuned on val)"))
    else:
        truth = np.rint(y_true).astype(np.int64)
        ok = fixed >= 0  # a diverged regression output (NaN) has grade -1: left out of the picture
        truth, fixed_cm = truth[ok], fixed[ok]
        written.append(save_confusion_matrix_png(confusion_matrix(truth, fixed_cm, len(class_names)), class_names,
                                                 os.path.join(run_dir, "confusion_matrix_test.png"),
                                                 title="Test confusion matrix"))
        if tuned is not None:
            written.append(save_confusion_matrix_png(
                confusion_matrix(truth, tuned[ok], len(class_names)), class_names,
                os.path.join(run_dir, "confusion_matrix_test_tuned.png"),
                title="Test confusion matrix (thresholds tuned on val)"))

    path = os.path.join(run_dir, "predictions_test.csv")
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="", encoding="utf8") as f:
        w = csv.writer(f)
        w.writerow(["index", "file"] + task.table_columns(class_names, tuned is not None))
        for i in range(len(y_true)):
            cells = task.table_row(y_true[i], outputs[i], fixed[i], None if tuned is None else tuned[i])
            w.writerow([i, display_path(dataset.sample_id(i))] + cells)
    written.append(path)
    return written
