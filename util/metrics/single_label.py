"""Classification metrics for single-label evaluation, as total functions.

``compute_metrics`` reproduces the numbers of the RETFound reference ``evaluate()``: argmax predictions,
one-hot encodings of labels and predictions, and scikit-learn's accuracy, hamming loss, macro jaccard,
macro average precision, unweighted Cohen kappa, macro F1 / precision / recall (zero_division 0) and macro
one-vs-rest AUROC on the class probabilities; ``score = (f1 + roc_auc + kappa) / 3`` is the model-selection
score. Two additions: ``kappa_quadratic`` (quadratic-weighted kappa over the full label range 0..K-1) and
per-class AUROC / AP.

Where the reference crashes, these functions do not: they are total functions (data a metric cannot score
gives NaN and a warning, never an exception). A class with no positive (or no negative) sample in ``y_true``
has no AUROC; a class with no positive sample has no average precision. There the reference's
``roc_auc_score`` raises (older scikit-learn) or returns NaN with a warning (recent scikit-learn);
scikit-learn's ``average_precision_score`` silently counts such a class as 0. Here the per-class value is NaN
and the macro value is NaN too (a macro over a subset of the classes would not be comparable between
evaluations), with exactly one ``MetricWarning`` naming the classes, also returned in ``notes``. ``score`` is
then NaN as well; model selection must rank a NaN score below every number -- use ``selection_value``. The
per-class arrays let a caller report the classes that are defined. Fewer than two classes or no samples give
NaN everywhere (one warning). Non-finite probabilities (a diverged model) make the probability-based metrics
NaN (one warning); the argmax-based ones are computed with non-finite entries treated as -inf.

References: RETFound_MAE engine_finetune.evaluate (rmaphoh/RETFound_MAE); scikit-learn metric definitions.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from sklearn import metrics as skm

from util.metrics.common import MetricWarning, _class_label, _kappa

# CSV column order; the first ten are the reference's order.
METRIC_COLUMNS = ['val_loss', 'accuracy', 'f1', 'roc_auc', 'hamming', 'jaccard', 'precision', 'recall',
                  'average_precision', 'kappa', 'kappa_quadratic', 'score']

_SCALAR_KEYS = [c for c in METRIC_COLUMNS if c != 'val_loss']


def _nan_result(num_classes: int, note: str) -> dict:
    warnings.warn(note, MetricWarning, stacklevel=3)
    out = {k: float('nan') for k in _SCALAR_KEYS}
    out['per_class_auroc'] = [float('nan')] * max(num_classes, 0)
    out['per_class_ap'] = [float('nan')] * max(num_classes, 0)
    out['undefined_classes'] = list(range(max(num_classes, 0)))
    out['notes'] = [note]
    return out


def compute_metrics(y_true, probs, num_classes: int | None = None,
                    class_names: Sequence[str] | None = None, classes: Sequence[int] | None = None) -> dict:
    """Evaluation metrics of single-label predictions.

    Args:
        y_true: integer labels, shape [N], values in [0, K).
        probs: class probabilities (softmax outputs), shape [N, K].
        num_classes: K; defaults to ``probs.shape[1]`` and must equal it when given.
        class_names: optional names used in warning messages.
        classes: the class indices the macro averages (f1, precision, recall, jaccard, roc_auc,
            average_precision) run over; default all K. External validation on data holding a subset of a
            model's classes passes the classes present: the others have no sample to score. Accuracy,
            hamming and the kappas always use every class (a prediction of an absent class is an error).

    Returns:
        dict with the float keys of ``METRIC_COLUMNS`` except ``val_loss`` (NaN where undefined), plus
        ``per_class_auroc`` and ``per_class_ap`` (lists of K floats, NaN where undefined),
        ``undefined_classes`` (class indices whose AUROC is undefined) and ``notes`` (the warning texts).

    Raises:
        ValueError: on inconsistent shapes or labels outside [0, K) -- caller bugs, not data properties.
    """
    y_true = np.asarray(y_true).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1 and probs.size == 0:
        probs = probs.reshape(0, num_classes or 0)
    if probs.ndim != 2:
        raise ValueError(f"compute_metrics: probs must have shape [N, K], got {probs.shape}")
    n, k = probs.shape
    if num_classes is not None and num_classes != k:
        raise ValueError(f"compute_metrics: num_classes={num_classes} but probs has {k} columns")
    if y_true.shape[0] != n:
        raise ValueError(f"compute_metrics: {y_true.shape[0]} labels but {n} rows of probabilities")
    if n and not np.issubdtype(y_true.dtype, np.integer):
        if not np.all(np.equal(np.mod(y_true, 1), 0)):
            raise ValueError("compute_metrics: y_true must hold integer class indices")
    y_true = y_true.astype(np.int64)
    macro = list(range(k)) if classes is None else sorted({int(c) for c in classes})
    if classes is not None and (not macro or macro[0] < 0 or macro[-1] >= k):
        raise ValueError(f"compute_metrics: classes must be a non-empty subset of [0, {k}), got {classes}")
    if n and (y_true.min() < 0 or y_true.max() >= k):
        raise ValueError(f"compute_metrics: labels must be in [0, {k}), got range "
                         f"[{y_true.min()}, {y_true.max()}]")
    if n == 0:
        return _nan_result(k, "metrics: no samples to evaluate; all metrics are NaN")
    if k < 2:
        return _nan_result(k, f"metrics: {k} class(es) (expected at least 2); all metrics are NaN")

    notes: list[str] = []
    finite = np.isfinite(probs).all()
    if not finite:
        bad = int((~np.isfinite(probs)).any(axis=1).sum())
        notes.append(f"metrics: {bad} of {n} samples have non-finite probabilities (diverged model?); "
                     f"roc_auc, average_precision and score are NaN")
    y_pred = np.argmax(np.where(np.isfinite(probs), probs, -np.inf), axis=1)
    eye = np.eye(k, dtype=np.int64)
    true_oh, pred_oh = eye[y_true], eye[y_pred]

    out: dict = {}
    with warnings.catch_warnings():
        # scikit-learn's own warnings (undefined precision, kappa 0/0, ...) are replaced by ours.
        warnings.simplefilter('ignore')
        out['accuracy'] = float(skm.accuracy_score(y_true, y_pred))
        out['hamming'] = float(skm.hamming_loss(true_oh, pred_oh))
        # zero_division=0 reproduces the value of the reference's default ('warn' -> 0) without the warning.
        t, p = true_oh[:, macro], pred_oh[:, macro]
        out['jaccard'] = float(skm.jaccard_score(t, p, average='macro', zero_division=0))
        out['f1'] = float(skm.f1_score(t, p, average='macro', zero_division=0))
        out['precision'] = float(skm.precision_score(t, p, average='macro', zero_division=0))
        out['recall'] = float(skm.recall_score(t, p, average='macro', zero_division=0))
        out['kappa'] = _kappa(y_true, y_pred, None)
        # Quadratic weights need the full label range: with labels=None scikit-learn would measure the
        # distance between grades by their index among the grades present, not by the grade itself.
        out['kappa_quadratic'] = _kappa(y_true, y_pred, 'quadratic', labels=np.arange(k))

        per_auc = [float('nan')] * k
        per_ap = [float('nan')] * k
        pos = true_oh.sum(axis=0)
        undefined_auc = [c for c in macro if pos[c] == 0 or pos[c] == n]
        if finite:
            for c in range(k):
                if pos[c] > 0:
                    per_ap[c] = float(skm.average_precision_score(true_oh[:, c], probs[:, c]))
                    if pos[c] < n:
                        per_auc[c] = float(skm.roc_auc_score(true_oh[:, c], probs[:, c]))
    if math.isnan(out['kappa']):
        notes.append("metrics: Cohen kappa is undefined (labels and predictions are all one class); kappa "
                     "and score are NaN")
    if undefined_auc and finite:
        names = ', '.join(_class_label(c, class_names) for c in undefined_auc)
        notes.append(f"metrics: class(es) {names} have no positive or no negative sample in y_true; their "
                     f"AUROC (and AP if no positives) is undefined, so macro roc_auc"
                     f"{' and average_precision' if (pos[macro] == 0).any() else ''} and score are NaN; "
                     f"per_class_auroc holds the defined classes")
    out['per_class_auroc'] = per_auc
    out['per_class_ap'] = per_ap
    out['undefined_classes'] = undefined_auc
    out['roc_auc'] = float(np.mean([per_auc[c] for c in macro]))  # NaN if any class is undefined
    out['average_precision'] = float(np.mean([per_ap[c] for c in macro]))
    out['score'] = (out['f1'] + out['roc_auc'] + out['kappa']) / 3.0
    out['notes'] = notes
    if notes:
        warnings.warn('; '.join(notes), MetricWarning, stacklevel=2)
    return out


