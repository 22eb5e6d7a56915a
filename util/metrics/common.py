"""What every task's metrics share: the warning category of undefined values, Cohen's kappa, the
per-class report, the confusion matrix and the selection value of a NaN score.

References: scikit-learn metric definitions (``cohen_kappa_score``, ``precision_recall_fscore_support``).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from sklearn import metrics as skm


class MetricWarning(UserWarning):
    """An evaluation metric is undefined for this data and was reported as NaN."""

def _class_label(k: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and k < len(class_names):
        return f"{k} ({class_names[k]!r})"
    return str(k)

def _kappa(y_true: np.ndarray, y_pred: np.ndarray, weights: str | None, labels=None) -> float:
    # scikit-learn returns NaN (or raises in some versions) when expected agreement is 1 (0/0).
    try:
        value = float(skm.cohen_kappa_score(y_true, y_pred, weights=weights, labels=labels))
    except (ValueError, ZeroDivisionError):
        return float('nan')
    return value if math.isfinite(value) else float('nan')

def cohen_kappa(y_true, y_pred, weights: str | None = None, labels=None) -> float:
    """scikit-learn's ``cohen_kappa_score``, NaN (without a warning) where it is undefined (0/0).

    For ``weights='quadratic'`` pass ``labels=range(K)`` so grades are weighted by their distance."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return _kappa(np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1), weights, labels)

def selection_value(score: float) -> float:
    """The value model selection compares: ``score``, with NaN ranked below every number (-inf)."""
    score = float(score)
    return -math.inf if math.isnan(score) else score

def per_class_report(y_true, y_pred, num_classes: int) -> dict[str, list[float]]:
    """Per-class precision, recall, F1 (zero_division 0) and support, each a list of ``num_classes``."""
    p, r, f, s = skm.precision_recall_fscore_support(
        np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1), labels=np.arange(num_classes),
        zero_division=0)
    return {'precision': p.tolist(), 'recall': r.tolist(), 'f1': f.tolist(), 'support': s.tolist()}

def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts ``cm[t, p]`` of samples with true class t predicted as p, shape [K, K] int64."""
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"confusion_matrix: {y_true.size} labels but {y_pred.size} predictions")
    for arr, what in ((y_true, 'labels'), (y_pred, 'predictions')):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"confusion_matrix: {what} must be in [0, {num_classes}), got range "
                             f"[{arr.min()}, {arr.max()}]")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def constant_output_warning(outputs, tolerance: float = 1e-6) -> list[str]:
    """A warning line when a model gave (nearly) the same output for every image: its ranking metrics are
    then chance by construction (AUROC 0.5) and its decisions one class for all; empty otherwise."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim != 2 or len(outputs) < 2 or not np.isfinite(outputs).all():
        return []
    spread = float((outputs.max(axis=0) - outputs.min(axis=0)).max())
    if spread > tolerance:
        return []
    return [f"warning: the model gave the same output for all {len(outputs)} test images (largest spread "
            f"{spread:.2g} across images): it has not learned to tell them apart, so its AUROC is 0.5 by "
            "construction; check the labels, the learning rate (--blr/--lr) and the number of epochs"]
