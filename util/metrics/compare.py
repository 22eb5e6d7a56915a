"""Two models on the same test images: is the difference of a metric larger than chance?

``paired_bootstrap`` resamples the test rows (stratified, with the draws of ``util.metrics.bootstrap``:
``rng = numpy.random.default_rng(seed)``, per resample and per stratum in sorted order
``rng.integers(0, n_s, n_s)``), scores both models on the *same* resample and collects the difference
``A - B``. Its interval is the percentile interval of those differences; its two-sided p-value inverts it,
``p = min(1, 2 (1 + min(#{d* <= 0}, #{d* >= 0})) / (R + 1))`` over the R resamples where the metric is
defined: the smallest level at which the percentile interval leaves out 0 (the + 1 keeps a p-value from
being 0 with finitely many resamples; Davison and Hinkley 1997, eq. 4.11).

``delong_test`` compares AUROCs without resampling (DeLong, DeLong and Clarke-Pearson 1988). An AUROC is a
two-sample U-statistic; its placement values (structural components) are, for a positive ``i``, the share of
negatives it outscores, ``V10_i``, and for a negative ``j`` the share of positives that outscore it,
``V01_j`` (ties count one half). Sun and Xu (2014) get them in O(n log n) from midranks: with ``T_Z`` the
midranks of all scores, ``T_X`` those among the positives and ``T_Y`` among the negatives,
``V10_i = (T_Z(i) - T_X(i)) / n`` and ``V01_j = 1 - (T_Z(j) - T_Y(j)) / m`` (m positives, n negatives).
DeLong's variance of an AUROC difference is ``S10 / m + S01 / n``, with ``S10``, ``S01`` the sample
(co)variances (denominator m - 1, n - 1) of the two models' placement-value differences over the positives
and over the negatives.

Macro AUROC (the toolkit's ``roc_auc``: one-vs-rest classes, or the labels of a multi-label task) is the
mean of per-class AUROCs whose positives and negatives differ from class to class. It is handled as DeLong
handles one AUROC, with the rows in strata taken as fixed-size independent samples: each row gets the
influence value ``h = mean_c [V10_c - AUC_c] / m_c`` (where it is a positive of class c) or
``[V01_c - AUC_c] / n_c`` (a negative), differenced between the models, and the variance is
``sum_g N_g / (N_g - 1) * sum_{rows of g} (h - mean_g h)^2`` over the strata g (a one-row stratum adds h^2).
The strata are those of the bootstrap (``bootstrap.task_strata``): the class of a single-label row, the label
combination of a multi-label row. For one binary AUROC (the strata are then the positives and the negatives)
this is DeLong's formula exactly; for K classes it is the K-sample version of the same structural-components
estimate (Sen 1960). ``z = (AUC_A - AUC_B) / se``, two-sided normal p-value, interval ``d ± z_{1-a/2} se``.

References: DeLong, DeLong and Clarke-Pearson, "Comparing the areas under two or more correlated receiver
operating characteristic curves: a nonparametric approach", Biometrics 44(3), 1988; Sun and Xu, "Fast
implementation of DeLong's algorithm for comparing the areas under correlated receiver operating
characteristic curves", IEEE Signal Processing Letters 21(11), 2014; Sen, "On some convergence properties
of U-statistics", Calcutta Statistical Association Bulletin 10, 1960; Davison and Hinkley, "Bootstrap Methods
and their Application", 1997; Efron and Tibshirani, "An Introduction to the Bootstrap", 1993.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
from scipy.stats import norm

from util.metrics.bootstrap import task_strata

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


def midranks(x) -> np.ndarray:
    """1-based ranks of ``x`` where tied values share the mean of the ranks they span (Sun and Xu's
    midranks; what ``scipy.stats.rankdata(method='average')`` computes)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    n = len(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]]) if n else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], n]  # a run of ties covers sorted positions starts..ends-1: ranks starts+1..ends
    out = np.empty(n, dtype=np.float64)
    out[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return out


def placement_values(pos_scores, neg_scores) -> tuple[np.ndarray, np.ndarray, float]:
    """``(V10, V01, AUC)`` of one binary AUROC from midranks (Sun and Xu 2014): ``V10[i]`` the share of
    negatives below positive i (ties one half), ``V01[j]`` the share of positives above negative j."""
    x, y = np.asarray(pos_scores, dtype=np.float64), np.asarray(neg_scores, dtype=np.float64)
    m, n = len(x), len(y)
    if not m or not n:
        raise ValueError(f"placement_values: {m} positives and {n} negatives (at least one of each)")
    tz = midranks(np.concatenate([x, y]))
    v10 = (tz[:m] - midranks(x)) / n
    v01 = 1.0 - (tz[m:] - midranks(y)) / m
    return v10, v01, float(v10.mean())


def _auc_terms(y_true, task_name: str, num_outputs: int, classes=None) -> tuple[list[tuple[int, np.ndarray]], list]:
    """The one-vs-rest AUROCs the macro average runs over: ``[(score column, positive mask)]`` and the classes
    left out (no positive, or no negative, in ``y_true``)."""
    y = np.asarray(y_true)
    if task_name == "single_label":
        y = y.reshape(-1).astype(np.int64)
        masks = [(c, y == c) for c in (range(num_outputs) if classes is None else sorted(set(classes)))]
    elif task_name == "multi_label":
        y = np.rint(y).astype(np.int64).reshape(len(y), -1)
        masks = [(c, y[:, c] > 0) for c in (range(y.shape[1]) if classes is None else sorted(set(classes)))]
    else:
        raise ValueError(f"delong_test: AUROC is not a metric of the {task_name} task")
    terms = [(c, m) for c, m in masks if 0 < m.sum() < len(m)]
    return terms, [c for c, m in masks if not 0 < m.sum() < len(m)]


def _influence(scores: np.ndarray, terms) -> tuple[float, np.ndarray]:
    """The macro AUROC of ``scores`` [N, C] over ``terms`` and each row's influence value h (module docstring)."""
    h = np.zeros(len(scores), dtype=np.float64)
    aucs = []
    for col, pos in terms:
        v10, v01, auc = placement_values(scores[pos, col], scores[~pos, col])
        h[pos] += (v10 - auc) / pos.sum()
        h[~pos] += (v01 - auc) / (~pos).sum()
        aucs.append(auc)
    return float(np.mean(aucs)), h / len(terms)


def _stratified_cov(u: np.ndarray, v: np.ndarray, strata: np.ndarray) -> float:
    """``sum_g N_g / (N_g - 1) sum_{rows of g} (u - mean_g u)(v - mean_g v)`` (one-row strata: ``u v``)."""
    total = 0.0
    for g in np.unique(strata, axis=0):
        rows = np.flatnonzero((strata == g).all(axis=1) if strata.ndim > 1 else strata == g)
        if len(rows) == 1:
            total += float(u[rows[0]] * v[rows[0]])
            continue
        du, dv = u[rows] - u[rows].mean(), v[rows] - v[rows].mean()
        total += len(rows) / (len(rows) - 1) * float(du @ dv)
    return total


def delong_test(y_true, scores_a, scores_b, task_name: str = "single_label", *, classes=None, strata=None,
                level: float = DEFAULT_LEVEL) -> dict:
    """DeLong's test of ``AUROC(A) - AUROC(B)`` on the same rows (module docstring).

    Args:
        y_true: class indices [N] (single-label; 0/1 for a binary task) or 0/1 labels [N, L] (multi-label).
        scores_a, scores_b: the models' scores, [N, C] (a column per class or label; a single-label binary
            task may give [N] scores of class 1).
        task_name: 'single_label' or 'multi_label'.
        classes: the classes (columns) of the macro average; default all with a positive and a negative row.
        strata: one label per row (default ``bootstrap.task_strata``: the class, or the label combination).

    Returns:
        ``auc_a``, ``auc_b``, ``diff``, ``se_a``, ``se_b``, ``se`` (of the difference), ``z``, ``p``,
        ``ci`` (of the difference), ``ci_a``, ``ci_b``, ``n``, ``classes`` (the columns averaged) and
        ``left_out`` (classes without a positive or a negative row). An undefined AUROC (no class with both)
        gives NaN values.
    """
    y = np.asarray(y_true)
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.ndim == 1:  # binary scores of class 1
        a, b = np.stack([1.0 - a, a], axis=1), np.stack([1.0 - b, b], axis=1)
        classes = [1] if classes is None else classes
    if a.shape != b.shape or len(a) != len(y):
        raise ValueError(f"delong_test: {len(y)} labels, scores of shapes {a.shape} and {b.shape} (the same rows)")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("delong_test: the scores hold NaN or infinite values (a diverged model?)")
    terms, left_out = _auc_terms(y, task_name, a.shape[1], classes)
    nan = math.nan
    out = {"n": int(len(y)), "classes": [c for c, _ in terms], "left_out": left_out}
    if not terms:
        return {**out, **dict.fromkeys(("auc_a", "auc_b", "diff", "se_a", "se_b", "se", "z", "p"), nan),
                "ci": (nan, nan), "ci_a": (nan, nan), "ci_b": (nan, nan)}
    strata = task_strata(task_name, y) if strata is None else np.asarray(strata)
    auc_a, h_a = _influence(a, terms)
    auc_b, h_b = _influence(b, terms)
    var_a, var_b = _stratified_cov(h_a, h_a, strata), _stratified_cov(h_b, h_b, strata)
    var_d = max(var_a + var_b - 2.0 * _stratified_cov(h_a, h_b, strata), 0.0)
    diff, se = auc_a - auc_b, math.sqrt(var_d)
    q = float(norm.ppf(0.5 + level / 2.0))
    if se > 0:
        z = diff / se
        p = float(2.0 * norm.sf(abs(z)))
    else:  # no spread: identical rankings (p 1) or a degenerate test set
        z, p = (0.0, 1.0) if diff == 0 else (nan, nan)
    se_a, se_b = math.sqrt(max(var_a, 0.0)), math.sqrt(max(var_b, 0.0))
    return {**out, "auc_a": auc_a, "auc_b": auc_b, "diff": diff, "se_a": se_a, "se_b": se_b, "se": se, "z": z,
            "p": p, "ci": (diff - q * se, diff + q * se), "ci_a": (auc_a - q * se_a, auc_a + q * se_a),
            "ci_b": (auc_b - q * se_b, auc_b + q * se_b)}


def _draws(strata, n: int) -> list[np.ndarray]:
    """The rows of each stratum, strata in sorted order (as ``bootstrap.bootstrap_cis`` draws them)."""
    if strata is None:
        return [np.arange(n)]
    labels = np.asarray(strata)
    _, inverse = np.unique(labels, axis=0 if labels.ndim > 1 else None, return_inverse=True)
    inverse = inverse.reshape(-1)
    return [np.flatnonzero(inverse == s) for s in range(int(inverse.max()) + 1)] if n else []


def paired_bootstrap(metric_fn: Callable, y_true, outputs_a, outputs_b, *, strata=None,
                     n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = DEFAULT_LEVEL,
                     metric_b: Callable | None = None) -> dict[str, dict]:
    """Paired bootstrap of ``metric_fn(y, outputs_a) - metric_fn(y, outputs_b)`` (module docstring).

    Args:
        metric_fn: ``(y_true rows, outputs rows) -> {metric: value}`` (several metrics share the resamples);
            warnings it raises on resamples are silenced.
        y_true, outputs_a, outputs_b: one row per test image, the same images in the same order.
        strata: one label per row; resampling stays within each (None: one stratum).
        metric_b: B's metric function when it differs from A's (each run's own tuned thresholds); default
            ``metric_fn``.

    Returns:
        ``{metric: {a, b, diff (on all rows), ci (percentile interval of the resampled differences), p
        (two-sided), resamples (those where both values are defined), n}}``.
    """
    y, oa, ob = np.asarray(y_true), np.asarray(outputs_a), np.asarray(outputs_b)
    metric_b = metric_fn if metric_b is None else metric_b
    n = len(y)
    if len(oa) != n or len(ob) != n:
        raise ValueError(f"paired_bootstrap: {n} labels but {len(oa)} and {len(ob)} rows of outputs")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"paired_bootstrap: n_resamples must be a positive integer, got {n_resamples!r}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"paired_bootstrap: level must lie in (0, 1), got {level!r}")
    members = _draws(strata, n)
    rng = np.random.default_rng(seed)
    idx = np.empty(n, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full_a, full_b = metric_fn(y, oa), metric_b(y, ob)
        diffs = {key: np.full(int(n_resamples), math.nan) for key in full_a}
        for r in range(int(n_resamples)):
            for rows in members:
                idx[rows] = rows[rng.integers(0, len(rows), len(rows))]
            va, vb = metric_fn(y[idx], oa[idx]), metric_b(y[idx], ob[idx])
            for key in diffs:
                diffs[key][r] = float(va[key]) - float(vb[key])
    alpha = (1.0 - float(level)) / 2.0
    out = {}
    for key, values in diffs.items():
        d = values[np.isfinite(values)]
        if not d.size:
            ci, p = (math.nan, math.nan), math.nan
        else:
            ci = tuple(float(q) for q in np.percentile(d, [100 * alpha, 100 * (1 - alpha)]))
            p = min(1.0, 2.0 * (1 + min(int((d <= 0).sum()), int((d >= 0).sum()))) / (d.size + 1))
        a, b = float(full_a[key]), float(full_b[key])
        out[key] = {"a": a, "b": b, "diff": a - b, "ci": ci, "p": float(p), "resamples": int(d.size), "n": n}
    return out
