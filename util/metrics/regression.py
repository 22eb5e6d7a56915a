"""Metrics of grading as regression: one continuous output per image, cut into grades 0..G-1 by thresholds,
and a deterministic search for the cuts that maximise quadratic-weighted kappa.

The default cuts are the midpoints between grades, ``(0.5, 1.5, ..., G - 1.5)``; ``cut_grades`` applies
cuts with ``np.digitize`` semantics (``output < t0`` -> 0, ``t0 <= output < t1`` -> 1, ..., ``output >=
t_last`` -> G-1). ``compute_regression_metrics`` reports, at the given cuts (default: the midpoints),
accuracy, macro F1 over all G grades (zero_division 0), quadratic-weighted and unweighted Cohen kappa, and
the mean absolute error of the continuous output; at tuned cuts (e.g. from ``optimise_thresholds_qwk`` on
the validation split) the ``*_tuned`` variants. Quadratic kappa weighs disagreements by the squared grade
distance over the full range 0..G-1 (scikit-learn ``cohen_kappa_score(weights='quadratic',
labels=range(G))``), so a grade missing from a split does not shrink the distances.

Total functions (data a metric cannot score gives NaN and a warning, never an exception): undefined kappas are NaN with one ``MetricWarning``; any
non-finite output (a diverged model) makes every metric NaN with one warning.

``optimise_thresholds_qwk`` is coordinate ascent: each cut in turn moves to the position, among all
positions that change which samples it separates, that maximises QWK of the whole split (computed exactly
and vectorised from the confusion matrix), for a few sweeps until nothing improves. A cut only moves when
QWK strictly improves, so the result is never worse than the start, the cuts stay strictly increasing,
and the search is deterministic. Outputs closer together than ``CUT_RESOLUTION`` count as one value, so a
tuned cut never separates two outputs that differ only by float rounding (a float32 model evaluated in
batches of another size moves its outputs by ~1e-7): every tuned cut lies at least ``CUT_RESOLUTION / 2``
from every validation output and at least ``CUT_RESOLUTION / 4`` from its neighbouring cuts.

References: the DR-grading regression seed system (SmoothL1 on one output, thresholds cut into grades 0-4,
macro F1); the APTOS 2019 "OptimizedRounder" practice of tuning the cuts for QWK; scikit-learn
``cohen_kappa_score``.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np

from util.metrics.common import MetricWarning, cohen_kappa, confusion_matrix, per_class_report

REGRESSION_COLUMNS = ['val_loss', 'accuracy', 'f1', 'kappa_quadratic', 'kappa', 'mae', 'accuracy_tuned', 'f1_tuned',
                      'kappa_quadratic_tuned']
DEFAULT_GRADE_THRESHOLDS = (0.5, 1.5, 2.5, 3.5)
# outputs (in grade units) closer than this are one value to the cut search; see the module docstring
CUT_RESOLUTION = 1e-4

_SCALAR_KEYS = [c for c in REGRESSION_COLUMNS if c != 'val_loss']


def default_grade_thresholds(num_grades: int) -> tuple[float, ...]:
    """The midpoints between grades, ``(0.5, 1.5, ..., num_grades - 1.5)`` (``DEFAULT_GRADE_THRESHOLDS`` for 5)."""
    return tuple(g + 0.5 for g in range(int(num_grades) - 1))


def _cuts(thresholds, num_grades: int | None, where: str) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if num_grades is not None and t.size != num_grades - 1:
        raise ValueError(f"{where}: {t.size} thresholds for {num_grades} grades ({num_grades - 1} expected)")
    if not np.isfinite(t).all() or (np.diff(t) <= 0).any():
        raise ValueError(f"{where}: thresholds must be finite and strictly increasing, got {t.tolist()}")
    return t


def cut_grades(outputs, thresholds) -> np.ndarray:
    """Grades (int64, same length as ``outputs``) from continuous outputs and strictly increasing cuts:
    ``output < t0`` -> 0, ``t[i-1] <= output < t[i]`` -> i, ``output >= t[-1]`` -> len(t). A NaN output has no
    grade and gets -1 (+-inf go to the end grades)."""
    out = np.asarray(outputs, dtype=np.float64).reshape(-1)
    grades = np.digitize(out, _cuts(thresholds, None, 'cut_grades')).astype(np.int64)
    grades[np.isnan(out)] = -1
    return grades


def _grades(y_true, n: int, num_grades: int, where: str) -> np.ndarray:
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{where}: {y.shape[0]} labels but {n} outputs")
    if n and (not np.isfinite(y).all() or not np.all(np.mod(y, 1) == 0) or y.min() < 0 or y.max() >= num_grades):
        raise ValueError(f"{where}: labels must be integer grades in [0, {num_grades})")
    return y.astype(np.int64)


def _outputs(outputs, where: str) -> np.ndarray:
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.ndim != 1:
        raise ValueError(f"{where}: outputs must have shape [N] or [N, 1], got {out.shape}")
    return out


def _qwk(conf: np.ndarray) -> float:
    """Quadratic-weighted kappa from a [G, G] confusion matrix (scikit-learn's definition); NaN when 0/0."""
    g = conf.shape[0]
    w = (np.arange(g)[:, None] - np.arange(g)[None, :]) ** 2.0
    n = conf.sum()
    expected = np.outer(conf.sum(axis=1), conf.sum(axis=0)) / n if n else np.zeros_like(conf, dtype=np.float64)
    den = (w * expected).sum()
    return float(1.0 - (w * conf).sum() / den) if den > 0 else math.nan


def _at_cuts(y: np.ndarray, out: np.ndarray, cuts: np.ndarray, num_grades: int) -> dict:
    grades = cut_grades(out, cuts)
    report = per_class_report(y, grades, num_grades)
    return {'accuracy': float(np.mean(grades == y)), 'f1': float(np.mean(report['f1'])),
            'kappa_quadratic': cohen_kappa(y, grades, 'quadratic', labels=np.arange(num_grades)),
            'kappa': cohen_kappa(y, grades), 'report': report, 'confusion': confusion_matrix(y, grades, num_grades)}


def _per_class(names: list[str], report: dict | None, support: np.ndarray) -> list[dict]:
    rows = []
    for g, name in enumerate(names):
        if report is None:
            rows.append({'class': name, 'support': int(support[g]), 'precision': math.nan, 'recall': math.nan,
                         'f1': math.nan})
        else:
            rows.append({'class': name, 'support': int(report['support'][g]),
                         'precision': float(report['precision'][g]), 'recall': float(report['recall'][g]),
                         'f1': float(report['f1'][g])})
    return rows


def compute_regression_metrics(y_true, outputs, num_grades: int, thresholds=None, tuned_thresholds=None,
                               class_names: Sequence[str] | None = None) -> dict:
    """Evaluation metrics of grading by regression.

    Args:
        y_true: integer grades [N] in [0, num_grades) (float arrays of whole numbers are accepted).
        outputs: continuous model outputs [N] or [N, 1].
        num_grades: G.
        thresholds: G-1 strictly increasing cuts for the plain metrics; None -> the midpoints 0.5, 1.5, ...
        tuned_thresholds: G-1 cuts for the ``*_tuned`` metrics (e.g. optimised on validation); None -> NaN.
        class_names: optional G grade names for ``per_class`` (default '0'..'G-1').

    Returns:
        dict with the float keys of ``REGRESSION_COLUMNS`` except ``val_loss``; ``per_class``: G dicts
        ``{class, support, precision, recall, f1}`` at ``thresholds``; ``confusion``: int64 [G, G] counts
        (true grade x predicted grade) at ``thresholds``; ``confusion_tuned`` (or None); ``thresholds`` and
        ``tuned_thresholds`` (lists, or None) as used; ``notes``: the warning texts.

    Raises:
        ValueError: inconsistent shapes, grades outside [0, G), malformed thresholds (caller bugs).
    """
    where = 'compute_regression_metrics'
    out = _outputs(outputs, where)
    n, num_grades = out.shape[0], int(num_grades)
    y = _grades(y_true, n, max(num_grades, 1), where)
    names = [str(g) for g in range(num_grades)] if class_names is None else [str(c) for c in class_names]
    if len(names) != num_grades:
        raise ValueError(f"{where}: {len(names)} class names for {num_grades} grades")
    cuts = tuned = None
    if num_grades >= 2:
        cuts = _cuts(default_grade_thresholds(num_grades) if thresholds is None else thresholds, num_grades, where)
        tuned = None if tuned_thresholds is None else _cuts(tuned_thresholds, num_grades, where)
    result = {'thresholds': None if cuts is None else cuts.tolist(),
              'tuned_thresholds': None if tuned is None else tuned.tolist(), 'confusion_tuned': None}
    support = np.bincount(y, minlength=max(num_grades, 1))[:num_grades]
    finite = np.isfinite(out)

    note = None
    if num_grades < 2:
        note = f"regression metrics: {num_grades} grade(s) (at least 2 expected); all metrics are NaN"
    elif n == 0:
        note = "regression metrics: no samples to evaluate; all metrics are NaN"
    elif not finite.all():
        note = (f"regression metrics: {int((~finite).sum())} of {n} outputs are not finite (diverged model?); all "
                f"metrics are NaN and the confusion matrix counts the finite outputs only")
    if note is not None:
        warnings.warn(note, MetricWarning, stacklevel=2)
        cm = (confusion_matrix(y[finite], cut_grades(out[finite], cuts), num_grades) if cuts is not None
              else np.zeros((max(num_grades, 0),) * 2, dtype=np.int64))
        return {**dict.fromkeys(_SCALAR_KEYS, math.nan), 'per_class': _per_class(names, None, support),
                'confusion': cm, **result, 'notes': [note]}

    notes = []
    plain = _at_cuts(y, out, cuts, num_grades)
    scalars = {k: plain[k] for k in ('accuracy', 'f1', 'kappa_quadratic', 'kappa')}
    scalars['mae'] = float(np.mean(np.abs(out - y)))
    undefined = [k for k in ('kappa_quadratic', 'kappa') if math.isnan(scalars[k])]
    if tuned is None:
        scalars.update(accuracy_tuned=math.nan, f1_tuned=math.nan, kappa_quadratic_tuned=math.nan)
    else:
        at_tuned = _at_cuts(y, out, tuned, num_grades)
        scalars.update(accuracy_tuned=at_tuned['accuracy'], f1_tuned=at_tuned['f1'],
                       kappa_quadratic_tuned=at_tuned['kappa_quadratic'])
        result['confusion_tuned'] = at_tuned['confusion']
        if math.isnan(scalars['kappa_quadratic_tuned']):
            undefined.append('kappa_quadratic_tuned')
    if undefined:
        notes.append(f"regression metrics: {', '.join(undefined)} undefined (true and predicted grades are all one "
                     f"grade, 0/0); reported as NaN")
        warnings.warn('; '.join(notes), MetricWarning, stacklevel=2)
    return {**scalars, 'per_class': _per_class(names, plain['report'], support), 'confusion': plain['confusion'],
            **result, 'notes': notes}


def optimise_thresholds_qwk(y_true, outputs, num_grades: int, init=None, max_sweeps: int = 20) -> np.ndarray:
    """Cuts (float64 [G-1], strictly increasing) maximising quadratic-weighted kappa of ``cut_grades(outputs,
    cuts)`` against ``y_true``, by coordinate ascent from ``init`` (default: the midpoints 0.5, 1.5, ...).

    Each step moves one cut to the best of all positions between its neighbours (one candidate per distinct
    split of the samples there: midpoints between consecutive distinct outputs, outputs closer than
    ``CUT_RESOLUTION`` counting as one; 0.5 beyond the last output when the neighbour is open), ties going to the position closest to the current cut; a cut only moves
    when QWK strictly improves. Stops after a sweep without change or ``max_sweeps`` sweeps. Empty input,
    a single grade or non-finite outputs return ``init`` unchanged (non-finite: one ``MetricWarning``).
    """
    where = 'optimise_thresholds_qwk'
    num_grades = int(num_grades)
    if num_grades < 2:
        raise ValueError(f"{where}: {num_grades} grade(s); at least 2 are needed to place a cut")
    out = _outputs(outputs, where)
    y = _grades(y_true, out.shape[0], num_grades, where)
    t = _cuts(default_grade_thresholds(num_grades) if init is None else init, num_grades, where).copy()
    if out.size == 0:
        return t
    if not np.isfinite(out).all():
        warnings.warn(f"{where}: {int((~np.isfinite(out)).sum())} outputs are not finite (diverged model?); the "
                      f"thresholds stay {t.tolist()}", MetricWarning, stacklevel=2)
        return t

    G = num_grades
    w = (np.arange(G)[:, None] - np.arange(G)[None, :]) ** 2.0
    rows = np.bincount(y, minlength=G).astype(np.float64)
    v = rows @ w / out.size                      # expected-disagreement weight of one sample predicted as p
    best = _qwk(confusion_matrix(y, cut_grades(out, t), G))
    best = -math.inf if math.isnan(best) else best
    for _ in range(max_sweeps):
        moved = False
        for j in range(G - 1):
            lo = t[j - 1] if j > 0 else -math.inf
            hi = t[j + 1] if j < G - 2 else math.inf
            window = (out >= lo) & (out < hi)      # the samples graded j or j + 1, the ones cut j separates
            if not window.any():
                continue
            base = confusion_matrix(y[~window], cut_grades(out[~window], t), G).astype(np.float64)
            u = np.unique(out[window])
            # runs of outputs closer than the resolution form one group: a cut never splits a group
            group = np.concatenate([[0], np.cumsum(np.diff(u) >= CUT_RESOLUTION)])
            gmin = u[np.concatenate([[True], np.diff(group) > 0])]
            gmax = u[np.concatenate([np.diff(group) > 0, [True]])]
            inv = group[np.searchsorted(u, out[window])]
            cnt = np.zeros((len(gmin), G))
            np.add.at(cnt, (inv, y[window]), 1.0)
            cum = np.vstack([np.zeros(G), np.cumsum(cnt, axis=0)])     # [m + 1, G]: first k groups -> grade j
            tot = cum[-1]
            # candidate cut k puts the k smallest groups of window outputs in grade j, the rest in j + 1
            agree = (w * base).sum() + cum @ w[:, j] + (tot - cum) @ w[:, j + 1]
            cols = np.tile(base.sum(axis=0), (len(cum), 1))
            cols[:, j] += cum.sum(axis=1)
            cols[:, j + 1] += (tot - cum).sum(axis=1)
            den = cols @ v
            with np.errstate(divide='ignore', invalid='ignore'):
                kappa = np.where(den > 0, 1.0 - agree / den, -math.inf)
            left = np.concatenate([[lo if np.isfinite(lo) else gmin[0] - 1.0], gmax])
            right = np.concatenate([gmin, [hi if np.isfinite(hi) else gmax[-1] + 1.0]])
            cand = (left + right) / 2.0
            # the cut keeps its margin from the outputs and cuts beside it, and stays between its neighbours
            margin = CUT_RESOLUTION / 4
            feasible = (cand - left >= margin) & (right - cand >= margin) & (cand > lo) & (cand < hi)
            kappa = np.where(feasible, kappa, -math.inf)
            top = kappa.max()
            if not top > best + 1e-12:
                continue
            ties = np.flatnonzero(kappa >= top - 1e-12)
            t[j] = cand[ties[np.argmin(np.abs(cand[ties] - t[j]))]]
            best, moved = top, True
        if not moved:
            break
    return t
