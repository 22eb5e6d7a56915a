"""Multi-label evaluation metrics, the official ODIR-5K score and per-label F1 threshold tuning, as total
functions.

A label is predicted positive when its probability is **strictly greater** than its threshold (0.5 unless
tuned), the rule of the ODIR evaluation code; ``binarize`` applies it.

``compute_multilabel_metrics`` gives, at threshold 0.5: macro/micro F1, macro precision/recall
(scikit-learn's definitions with zero_division 0: a label never predicted and never present scores F1 0),
macro AUROC (``roc_auc``), macro average precision (``map``), hamming loss, subset (exact-match) accuracy
and the ODIR score; at the given per-label thresholds, ``f1_macro_tuned`` / ``f1_micro_tuned``.

Undefined per-label values: a label with no positive or no negative sample has no AUROC; a label with no
positive has no AP. They are NaN per label, and -- unlike the single-label module, where a class missing
from the split is unusual -- the macro ``roc_auc`` / ``map`` are the mean over the labels where they are
defined: multi-label data often has a rare label with no positive in a small validation split, and a NaN
macro AUROC would make model selection and ReduceLROnPlateau on it useless for the whole run. One
``MetricWarning`` names the labels left out (also in ``notes``); the macro is NaN only when no label is
defined. Non-finite probabilities (a diverged model) make every metric NaN with one warning.

``odir_score`` is the official ODIR-5K challenge score over the **flattened** patient x label matrix at
threshold 0.5: ``kappa = cohen_kappa(gt, pr > 0.5)``, ``f1 = f1_score(gt, pr > 0.5, average='micro')``,
``auc = roc_auc(gt, pr)``, ``final = (kappa + f1 + auc) / 3``. Note that scikit-learn's micro F1 of two
flattened 0/1 vectors counts both classes, so ``odir_f1`` equals the fraction of correct label entries
(``1 - hamming``), not the positive-class micro F1 reported as ``f1_micro``; the challenge defined it so.

``tune_thresholds_f1`` picks, per label, the threshold that maximises that label's F1 on the given data.

References: ODIR-5K challenge evaluation code (``ODIR_Metrics``, Peking University International
Competition on Ocular Disease Intelligent Recognition, 2019); scikit-learn metric definitions.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from sklearn import metrics as skm

from util.metrics.common import MetricWarning, cohen_kappa

MULTILABEL_COLUMNS = ['val_loss', 'f1_macro', 'f1_micro', 'precision_macro', 'recall_macro', 'roc_auc', 'map',
                      'hamming', 'subset_accuracy', 'odir_kappa', 'odir_f1', 'odir_auc', 'odir_final',
                      'f1_macro_tuned', 'f1_micro_tuned']

_SCALAR_KEYS = [c for c in MULTILABEL_COLUMNS if c != 'val_loss']
_PER_CLASS_KEYS = ['support', 'precision', 'recall', 'f1', 'auroc', 'ap', 'threshold', 'f1_tuned']
DEFAULT_THRESHOLD = 0.5


def _names(num_labels: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_labels)]
    names = [str(c) for c in class_names]
    if len(names) != num_labels:
        raise ValueError(f"multi-label metrics: {len(names)} class names for {num_labels} labels")
    return names


def _label(i: int, names: Sequence[str]) -> str:
    return f"{i} ({names[i]!r})"


def _check(y_true, probs, where: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or y.shape != p.shape:
        raise ValueError(f"{where}: y_true and probs must both have shape [N, L], got {y.shape} and {p.shape}")
    if y.size and not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"{where}: y_true must hold 0/1 labels")
    return y.astype(np.int64), p


def _thresholds(thresholds, num_labels: int, where: str) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64)
    if t.shape != (num_labels,) or not np.isfinite(t).all():
        raise ValueError(f"{where}: thresholds must be {num_labels} finite numbers (one per label), got "
                         f"shape {t.shape}")
    return t


def binarize(probs, thresholds=None) -> np.ndarray:
    """0/1 predictions ``probs > threshold`` per label (0.5 when ``thresholds`` is None), int64 [N, L].
    Non-finite probabilities are predicted negative."""
    p = np.asarray(probs, dtype=np.float64)
    t = np.full(p.shape[-1], DEFAULT_THRESHOLD) if thresholds is None else _thresholds(thresholds, p.shape[-1],
                                                                                      'binarize')
    with np.errstate(invalid='ignore'):
        return (p > t).astype(np.int64)


# ---------------------------------------------------------------------------------------------------
# ODIR


def _odir(y: np.ndarray, p: np.ndarray) -> tuple[dict, list[str]]:
    gt, pr = y.ravel(), p.ravel()
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        pred = (pr > DEFAULT_THRESHOLD).astype(np.int64)
        kappa = cohen_kappa(gt, pred)
        f1 = float(skm.f1_score(gt, pred, average='micro'))
        both = 0 < gt.sum() < gt.size
        auc = float(skm.roc_auc_score(gt, pr)) if both else math.nan
    if math.isnan(kappa):
        notes.append("odir_score: Cohen kappa of the flattened labels is undefined (labels and predictions are "
                     "all one value); odir_kappa and odir_final are NaN")
    if not both:
        notes.append("odir_score: the flattened labels are all one value, so odir_auc and odir_final are NaN")
    return {'kappa': kappa, 'f1': f1, 'auc': auc, 'final': (kappa + f1 + auc) / 3.0}, notes


def odir_score(y_true, probs) -> dict:
    """The official ODIR-5K score of ``y_true [N, L]`` (0/1) and ``probs [N, L]``: dict of floats ``kappa``,
    ``f1``, ``auc``, ``final`` (see the module docstring). Undefined parts and non-finite probabilities give
    NaN with one ``MetricWarning``."""
    y, p = _check(y_true, probs, 'odir_score')
    if y.size == 0 or not np.isfinite(p).all():
        note = ("odir_score: no samples" if y.size == 0 else
                "odir_score: non-finite probabilities (diverged model?)") + "; the score is NaN"
        warnings.warn(note, MetricWarning, stacklevel=2)
        return dict.fromkeys(('kappa', 'f1', 'auc', 'final'), math.nan)
    out, notes = _odir(y, p)
    if notes:
        warnings.warn('; '.join(notes), MetricWarning, stacklevel=2)
    return out


# ---------------------------------------------------------------------------------------------------
# Metrics


def _counts(y: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp = (y & pred).sum(axis=0).astype(np.float64)
    return tp, (pred.sum(axis=0) - tp).astype(np.float64), (y.sum(axis=0) - tp).astype(np.float64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)  # zero_division=0


def _prf(y: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-label precision, recall, F1 of 0/1 matrices (scikit-learn's definitions, zero_division 0)."""
    tp, fp, fn = _counts(y, pred)
    return _ratio(tp, tp + fp), _ratio(tp, tp + fn), _ratio(2 * tp, 2 * tp + fp + fn)


def _micro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp, fp, fn = (v.sum(keepdims=True) for v in _counts(y, pred))
    return float(_ratio(2 * tp, 2 * tp + fp + fn)[0])


def _nan_result(names: list[str], y: np.ndarray, thresholds, note: str) -> dict:
    warnings.warn(note, MetricWarning, stacklevel=3)
    out = dict.fromkeys(_SCALAR_KEYS, math.nan)
    support = y.sum(axis=0) if y.size else np.zeros(len(names), dtype=np.int64)
    out['per_class'] = [{'class': c, **dict.fromkeys(_PER_CLASS_KEYS, math.nan), 'support': int(support[i]),
                         'threshold': float(thresholds[i]) if thresholds is not None else math.nan}
                        for i, c in enumerate(names)]
    out['undefined_labels'] = list(range(len(names)))
    out['notes'] = [note]
    return out


def compute_multilabel_metrics(y_true, probs, thresholds=None, class_names: Sequence[str] | None = None) -> dict:
    """Evaluation metrics of multi-label predictions.

    Args:
        y_true: 0/1 labels, shape [N, L].
        probs: sigmoid probabilities, shape [N, L].
        thresholds: optional per-label decision thresholds [L] (e.g. from ``tune_thresholds_f1`` on the
            validation split) for the ``*_tuned`` metrics; None -> those are NaN.
        class_names: optional L label names used in ``per_class`` and warnings.

    Returns:
        dict with the float keys of ``MULTILABEL_COLUMNS`` except ``val_loss``; ``per_class``: a list of L
        dicts ``{class, support, precision, recall, f1, auroc, ap, threshold, f1_tuned}`` (precision /
        recall / f1 at 0.5; ``threshold`` is the tuned one, NaN when none); ``undefined_labels``: indices of
        the labels without AUROC; ``notes``: the warning texts.

    Raises:
        ValueError: inconsistent shapes, labels other than 0/1, or malformed thresholds (caller bugs).
    """
    y, p = _check(y_true, probs, 'compute_multilabel_metrics')
    n, num_labels = p.shape
    names = _names(num_labels, class_names)
    tuned = None if thresholds is None else _thresholds(thresholds, num_labels, 'compute_multilabel_metrics')
    if n == 0 or num_labels == 0:
        return _nan_result(names, y, tuned, f"multi-label metrics: {n} samples x {num_labels} labels; all "
                                            f"metrics are NaN")
    if not np.isfinite(p).all():
        bad = int((~np.isfinite(p)).any(axis=1).sum())
        return _nan_result(names, y, tuned, f"multi-label metrics: {bad} of {n} samples have non-finite "
                                            f"probabilities (diverged model?); all metrics are NaN")

    notes: list[str] = []
    pred = binarize(p)
    pos = y.sum(axis=0)
    out: dict = {}
    prec, rec, f1 = _prf(y, pred)
    out['f1_macro'] = float(np.mean(f1))
    out['f1_micro'] = _micro_f1(y, pred)
    out['precision_macro'] = float(np.mean(prec))
    out['recall_macro'] = float(np.mean(rec))
    out['hamming'] = float(np.mean(y != pred))
    out['subset_accuracy'] = float(np.mean((y == pred).all(axis=1)))
    auroc = np.full(num_labels, math.nan)
    ap = np.full(num_labels, math.nan)
    for c in range(num_labels):
        if pos[c] > 0:
            ap[c] = skm.average_precision_score(y[:, c], p[:, c])
            if pos[c] < n:
                auroc[c] = skm.roc_auc_score(y[:, c], p[:, c])
    undefined = [c for c in range(num_labels) if math.isnan(auroc[c])]
    out['roc_auc'] = float(np.mean(auroc[~np.isnan(auroc)])) if len(undefined) < num_labels else math.nan
    out['map'] = float(np.mean(ap[~np.isnan(ap)])) if (pos > 0).any() else math.nan
    if undefined:
        labels = ', '.join(_label(c, names) for c in undefined)
        what = ('macro roc_auc and map are NaN' if len(undefined) == num_labels else
                'macro roc_auc' + (' and map' if (pos == 0).any() else '') + ' average the other labels')
        notes.append(f"multi-label metrics: label(s) {labels} have no positive or no negative sample; their AUROC "
                     f"(and AP if no positive) is undefined (NaN), {what}")

    odir, odir_notes = _odir(y, p)
    notes += odir_notes
    out.update(odir_kappa=odir['kappa'], odir_f1=odir['f1'], odir_auc=odir['auc'], odir_final=odir['final'])

    f1_t = np.full(num_labels, math.nan)
    out['f1_macro_tuned'] = out['f1_micro_tuned'] = math.nan
    if tuned is not None:
        pred_t = binarize(p, tuned)
        f1_t = _prf(y, pred_t)[2]
        out['f1_micro_tuned'] = _micro_f1(y, pred_t)
        out['f1_macro_tuned'] = float(np.mean(f1_t))

    out['per_class'] = [
        {'class': names[c], 'support': int(pos[c]), 'precision': float(prec[c]), 'recall': float(rec[c]),
         'f1': float(f1[c]), 'auroc': float(auroc[c]), 'ap': float(ap[c]),
         'threshold': float(tuned[c]) if tuned is not None else math.nan, 'f1_tuned': float(f1_t[c])}
        for c in range(num_labels)]
    out['undefined_labels'] = undefined
    out['notes'] = notes
    if notes:
        warnings.warn('; '.join(notes), MetricWarning, stacklevel=2)
    return out


# ---------------------------------------------------------------------------------------------------
# Threshold tuning


def _candidates(p: np.ndarray) -> np.ndarray:
    """One threshold per distinct prediction set ``{p > t}``: midpoints between consecutive distinct
    probabilities, one below the smallest (all positive) and one at or above the largest (none), plus 0.5."""
    u = np.unique(p)
    mids = (u[:-1] + u[1:]) / 2.0
    # in the probability range [0, 1] the outer thresholds sit in the middle of the gap to 0 / 1
    below = u[0] / 2.0 if 0.0 < u[0] <= 1.0 else np.nextafter(u[0], -np.inf)
    above = (u[-1] + 1.0) / 2.0 if 0.0 <= u[-1] < 1.0 else u[-1]
    return np.concatenate([[below], mids, [above, DEFAULT_THRESHOLD]])


def _f1_at(y: np.ndarray, p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """F1 of ``p > t`` against ``y`` for every threshold in ``t`` (vectorised, exact)."""
    order = np.argsort(p, kind='stable')
    ps, ys = p[order], y[order]
    pos_cum = np.concatenate([[0], np.cumsum(ys)])           # positives among the k smallest
    k = np.searchsorted(ps, t, side='right')                  # samples with p <= t (predicted negative)
    pos = ys.sum()
    tp = pos - pos_cum[k]
    predicted = len(p) - k
    denom = pos + predicted                                   # 2TP + FP + FN
    return np.divide(2.0 * tp, denom, out=np.zeros(len(t)), where=denom > 0)


def tune_thresholds_f1(y_true, probs, grid=None, class_names: Sequence[str] | None = None) -> np.ndarray:
    """Per-label thresholds maximising each label's F1 of ``probs > t`` on this data (float64 [L]).

    Candidates: with ``grid`` None, one threshold per distinct prediction set (midpoints between
    consecutive distinct probabilities, plus one below the smallest and one above the largest), so the
    search is exact; otherwise the values of ``grid``. 0.5 is always a candidate, so the tuned F1 is never
    below the F1 at 0.5 on the same data. Ties go to the threshold closest to 0.5 (then the smaller one).
    A label with no positive sample, or with non-finite probabilities, keeps 0.5 (one ``MetricWarning``
    for the non-finite case).
    """
    y, p = _check(y_true, probs, 'tune_thresholds_f1')
    names = _names(p.shape[1], class_names)
    extra = None
    if grid is not None:
        extra = np.asarray(grid, dtype=np.float64).reshape(-1)
        if extra.size == 0 or not np.isfinite(extra).all():
            raise ValueError("tune_thresholds_f1: grid must hold finite thresholds")
    out = np.full(p.shape[1], DEFAULT_THRESHOLD)
    bad = []
    for c in range(p.shape[1]):
        yc, pc = y[:, c], p[:, c]
        if not np.isfinite(pc).all():
            bad.append(c)
            continue
        if yc.sum() == 0:
            continue
        cand = _candidates(pc) if extra is None else np.append(extra, DEFAULT_THRESHOLD)
        f1 = _f1_at(yc, pc, cand)
        best = np.flatnonzero(f1 >= f1.max() - 1e-12)
        pick = best[np.lexsort((cand[best], np.abs(cand[best] - DEFAULT_THRESHOLD)))[0]]
        out[c] = cand[pick]
    if bad:
        warnings.warn(f"tune_thresholds_f1: label(s) {', '.join(_label(c, names) for c in bad)} have non-finite "
                      f"probabilities (diverged model?); their threshold stays {DEFAULT_THRESHOLD}",
                      MetricWarning, stacklevel=2)
    return out
