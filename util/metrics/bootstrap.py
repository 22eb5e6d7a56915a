"""Confidence intervals of evaluation metrics: the stratified percentile bootstrap.

``bootstrap_cis`` resamples the rows with replacement ``n_resamples`` times, within each stratum (so every
resample keeps the stratum sizes of the data, e.g. its class counts), scores each resample with ``metric_fn``
and reports, per scalar metric, the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the resampled
values (numpy's default linear interpolation). A resample where a metric is NaN (or infinite) is left out of
that metric's percentiles; a metric that is NaN in every resample gets ``(nan, nan)``.

The draws: ``rng = numpy.random.default_rng(seed)``; for each resample in turn, for each stratum in sorted
order of its label, ``rng.integers(0, n_s, n_s)`` picks the stratum's ``n_s`` rows (positions among the
stratum's rows in data order), which take the places of the stratum's rows in the resample.

``task_metric_cis`` gives the intervals of a task's reported metrics (every column of ``task.columns`` but the
loss), computed by the task's own metric function. Scikit-learn's per-call overhead makes that about 25 ms per
resample, so for the three tasks this module re-computes the same scalars with plain numpy (confusion
matrices, rank AUROC, step-wise average precision) -- and uses that only after checking, on the data itself,
that it gives the task function's numbers to 1e-9; otherwise (a metric changed, a diverged model) the task
function scores every resample. Strata: the class (single-label), the grade (regression), the label
combination (multi-label; combinations with fewer than ``MIN_STRATUM`` rows pooled into one stratum).

References: Efron and Tibshirani, "An Introduction to the Bootstrap", 1993 (percentile intervals, ch. 13);
scikit-learn metric definitions (the quantities re-computed here).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
from scipy.stats import rankdata

from util.metrics.regression import cut_grades, default_grade_thresholds

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
MIN_STRATUM = 5  # multi-label: label combinations with fewer rows share one stratum
_AGREEMENT = 1e-9  # the numpy re-computation must give the task function's numbers within this


def _strata_members(strata, n: int) -> list[np.ndarray]:
    if strata is None:
        return [np.arange(n)]
    labels = np.asarray(strata)
    if labels.shape[:1] != (n,):
        raise ValueError(f"bootstrap_cis: strata must hold one label per row ({n}), got shape {labels.shape}")
    _, inverse = np.unique(labels, axis=0 if labels.ndim > 1 else None, return_inverse=True)
    inverse = inverse.reshape(-1)
    return [np.flatnonzero(inverse == s) for s in range(int(inverse.max()) + 1)] if n else []


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def bootstrap_cis(metric_fn: Callable, y_true, outputs, *, strata=None, n_resamples: int = DEFAULT_RESAMPLES,
                  seed: int = 0, level: float = DEFAULT_LEVEL) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every scalar ``metric_fn(y_true_sub, outputs_sub)`` returns.

    Args:
        metric_fn: rows of ``y_true`` and ``outputs`` -> dict; its int/float values get an interval, others
            (lists, per-class tables) are ignored. Warnings it raises on resamples are silenced.
        y_true, outputs: arrays with one row per sample (indexed along the first axis).
        strata: one label per row (scalars, or rows of an array); resampling stays within each; None: one.
        n_resamples, seed, level: resamples, the seed of ``numpy.random.default_rng``, the interval's level.

    Returns:
        ``{metric: (low, high)}``; ``{}`` for no rows.
    """
    y, out = np.asarray(y_true), np.asarray(outputs)
    n = len(y)
    if len(out) != n:
        raise ValueError(f"bootstrap_cis: {n} labels but {len(out)} rows of outputs")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"bootstrap_cis: n_resamples must be a positive integer, got {n_resamples!r}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"bootstrap_cis: level must lie in (0, 1), got {level!r}")
    members = _strata_members(strata, n)
    if n == 0:
        return {}
    rng = np.random.default_rng(seed)
    values: dict[str, np.ndarray] = {}
    idx = np.empty(n, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one undefined metric would warn in hundreds of resamples
        for b in range(int(n_resamples)):
            for rows in members:
                idx[rows] = rows[rng.integers(0, len(rows), len(rows))]
            for key, v in metric_fn(y[idx], out[idx]).items():
                if _is_scalar(v):
                    values.setdefault(key, np.full(int(n_resamples), math.nan))[b] = float(v)
    alpha = (1.0 - float(level)) / 2.0
    cis = {}
    for key, v in values.items():
        v = v[np.isfinite(v)]
        cis[key] = ((math.nan, math.nan) if not v.size else
                    tuple(float(q) for q in np.percentile(v, [100 * alpha, 100 * (1 - alpha)])))
    return cis


def task_strata(task_name: str, y_true) -> np.ndarray:
    """One stratum label per row: the class (single-label), the grade (regression), or the label combination
    (multi-label), combinations with fewer than ``MIN_STRATUM`` rows sharing label -1."""
    y = np.asarray(y_true)
    if task_name != "multi_label":
        return np.rint(y.reshape(-1)).astype(np.int64)
    if not len(y):
        return np.zeros(0, dtype=np.int64)
    _, inverse, counts = np.unique(np.rint(y).astype(np.int64), axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    return np.where(counts[inverse] >= MIN_STRATUM, inverse, -1)


# ---------------------------------------------------------------------------------------------------
# The tasks' scalar metrics in plain numpy (finite outputs only), checked against the task function


def _div(num, den) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)  # zero_division=0


def _kappa(cm: np.ndarray, weights: np.ndarray) -> float:
    """Cohen's kappa of a confusion matrix (scikit-learn's formula); NaN when 0/0."""
    expected = np.outer(cm.sum(axis=0), cm.sum(axis=1)) / cm.sum()
    den = float((weights * expected).sum())
    return 1.0 - float((weights * cm).sum()) / den if den > 0 else math.nan


def _weights(k: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.arange(k)[:, None] - np.arange(k)[None, :]
    return (d != 0).astype(np.float64), d.astype(np.float64) ** 2  # unweighted, quadratic


def _confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k).astype(np.float64)


def _auroc(pos: np.ndarray, score: np.ndarray) -> float:
    """Binary AUROC as the Mann-Whitney statistic with average ranks (ties count one half)."""
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if not n_pos or not n_neg:
        return math.nan
    return float((rankdata(score)[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _average_precision(pos: np.ndarray, score: np.ndarray) -> float:
    """Sum over the distinct scores, highest first, of (recall gain) x precision at that score."""
    n_pos = int(pos.sum())
    if not n_pos:
        return math.nan
    order = np.argsort(-score, kind="stable")
    s, hits = score[order], pos[order].astype(np.float64)
    ends = np.append(np.flatnonzero(np.diff(s) != 0), len(s) - 1)  # last row of each group of equal scores
    tps = np.cumsum(hits)[ends]
    recall = tps / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * tps / (ends + 1)))


def _single_label(y, probs, num_classes, thresholds=None, classes=None) -> dict:
    k, n = probs.shape[1], len(y)
    macro = list(range(k)) if classes is None else sorted({int(c) for c in classes})
    pred = probs.argmax(axis=1)
    cm = _confusion(y, pred, k)
    tp, rows, cols = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    fp, fn = cols - tp, rows - tp
    unweighted, quadratic = _weights(k)
    out = {"accuracy": tp.sum() / n, "hamming": 2.0 * (n - tp.sum()) / (n * k),
           "jaccard": _div(tp, tp + fp + fn)[macro].mean(), "f1": _div(2 * tp, 2 * tp + fp + fn)[macro].mean(),
           "precision": _div(tp, tp + fp)[macro].mean(), "recall": _div(tp, tp + fn)[macro].mean(),
           "kappa": _kappa(cm, unweighted), "kappa_quadratic": _kappa(cm, quadratic)}
    auc = [_auroc(y == c, probs[:, c]) for c in macro]
    ap = [_average_precision(y == c, probs[:, c]) for c in macro]
    out["roc_auc"], out["average_precision"] = float(np.mean(auc)), float(np.mean(ap))  # NaN if one is
    out["score"] = (out["f1"] + out["roc_auc"] + out["kappa"]) / 3.0
    return {key: float(v) for key, v in out.items()}


def _label_f1(y, pred) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    tp = (y & pred).sum(axis=0).astype(np.float64)
    fp, fn = pred.sum(axis=0) - tp, y.sum(axis=0) - tp
    micro = float(_div(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum()))
    return _div(2 * tp, 2 * tp + fp + fn), micro, _div(tp, tp + fp), _div(tp, tp + fn)


def _multi_label(y, probs, num_classes, thresholds=None, classes=None) -> dict:
    y = np.rint(y).astype(np.int64)
    pred = (probs > 0.5).astype(np.int64)
    f1, micro, precision, recall = _label_f1(y, pred)
    out = {"f1_macro": f1.mean(), "f1_micro": micro, "precision_macro": precision.mean(),
           "recall_macro": recall.mean(), "hamming": np.mean(y != pred),
           "subset_accuracy": np.mean((y == pred).all(axis=1))}
    pos = y.astype(bool)
    auc = np.array([_auroc(pos[:, c], probs[:, c]) for c in range(y.shape[1])])
    ap = np.array([_average_precision(pos[:, c], probs[:, c]) for c in range(y.shape[1])])
    out["roc_auc"] = auc[~np.isnan(auc)].mean() if (~np.isnan(auc)).any() else math.nan
    out["map"] = ap[~np.isnan(ap)].mean() if (~np.isnan(ap)).any() else math.nan
    gt, flat = y.ravel(), pred.ravel()
    kappa = _kappa(_confusion(gt, flat, 2), _weights(2)[0])
    agree = float(np.mean(gt == flat))  # scikit-learn's micro F1 of two 0/1 vectors (both classes counted)
    auc_flat = _auroc(gt.astype(bool), probs.ravel())
    out.update(odir_kappa=kappa, odir_f1=agree, odir_auc=auc_flat, odir_final=(kappa + agree + auc_flat) / 3.0)
    out["f1_macro_tuned"] = out["f1_micro_tuned"] = math.nan
    if thresholds is not None:
        f1_t, micro_t, _, _ = _label_f1(y, (probs > np.asarray(thresholds, dtype=np.float64)).astype(np.int64))
        out["f1_macro_tuned"], out["f1_micro_tuned"] = f1_t.mean(), micro_t
    return {key: float(v) for key, v in out.items()}


def _grading(y, out, cuts, g) -> dict:
    grades = cut_grades(out, cuts)
    cm = _confusion(y, grades, g)
    tp = np.diag(cm)
    f1 = _div(2 * tp, cm.sum(axis=0) + cm.sum(axis=1))  # 2TP + FP + FN = predicted + true
    unweighted, quadratic = _weights(g)
    return {"accuracy": tp.sum() / len(y), "f1": f1.mean(), "kappa_quadratic": _kappa(cm, quadratic),
            "kappa": _kappa(cm, unweighted)}


def _regression(y, outputs, num_classes, thresholds=None, classes=None) -> dict:
    y, out, g = np.rint(y).astype(np.int64).reshape(-1), outputs.reshape(-1), int(num_classes)
    plain = _grading(y, out, np.asarray(default_grade_thresholds(g)), g)
    plain["mae"] = np.mean(np.abs(out - y))
    tuned = dict.fromkeys(("accuracy", "f1", "kappa_quadratic"), math.nan)
    if thresholds is not None:
        tuned = _grading(y, out, np.asarray(thresholds, dtype=np.float64), g)
    plain.update({f"{key}_tuned": tuned[key] for key in ("accuracy", "f1", "kappa_quadratic")})
    return {key: float(v) for key, v in plain.items()}


_NUMPY_METRICS = {"single_label": _single_label, "multi_label": _multi_label, "regression": _regression}


def _agree(a: dict, b: dict, keys) -> bool:
    for key in keys:
        x, y = float(a.get(key, math.nan)), float(b.get(key, math.nan))
        if not ((math.isnan(x) and math.isnan(y)) or abs(x - y) <= _AGREEMENT * max(1.0, abs(y))):
            return False
    return True


def task_metric_cis(task, y_true, outputs, num_classes: int, thresholds=None, class_names=None,
                    n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, classes=None,
                    level: float = DEFAULT_LEVEL) -> dict[str, tuple[float, float]]:
    """Bootstrap intervals of the task's reported metrics (``task.columns`` but ``val_loss``), stratified by
    ``task_strata``, of exactly the numbers ``task.metrics(y_true, outputs, num_classes, class_names,
    thresholds)`` reports (``classes``: single-label macro averages over a subset, as in ``evaluate``)."""
    keys = [c for c in task.columns if c != "val_loss"]
    y, out = np.asarray(y_true), np.asarray(outputs, dtype=np.float64)
    subset = {} if classes is None else {"classes": classes}

    def reported(ys, os_):
        return task.metrics(ys, os_, num_classes, class_names, thresholds, **subset)

    metric_fn = reported
    fast = _NUMPY_METRICS.get(task.name)
    if fast is not None and len(y) and np.isfinite(out).all():
        def numpy_metrics(ys, os_):
            return fast(ys, os_, num_classes, thresholds, classes)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the task function's warnings reach the user from evaluate
            try:
                if _agree(numpy_metrics(y, out), reported(y, out), keys):
                    metric_fn = numpy_metrics
            except (ValueError, IndexError):  # data the numpy version does not take: the task function decides
                pass
    cis = bootstrap_cis(metric_fn, y, out, strata=task_strata(task.name, y), n_resamples=n_resamples, seed=seed,
                        level=level)
    return {key: cis.get(key, (math.nan, math.nan)) for key in keys} if cis else {}
