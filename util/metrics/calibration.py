"""Calibration of predicted probabilities: reliability (ECE, Brier, reliability bins), temperature scaling and
the referral curve.

Single-label: the top-class probability (the confidence) against whether the argmax is right. Multi-label:
every (sample, label) probability against its 0/1 truth. Regression outputs are grades, not probabilities:
calibration is not defined for them (``calibration_summary`` returns ``{}``, ``apply_temperature`` returns the
outputs unchanged).

ECE: the confidences go into ``n_bins`` equal-width bins ``(lo, hi]`` over [0, 1] (a confidence of exactly 0
into the first); ECE is the mean over bins of ``|accuracy - confidence|`` weighted by the bin's share of the
predictions. Brier: single-label the mean over samples of ``sum_k (p_k - onehot_k)^2`` (0 to 2), multi-label
the mean of ``(p - y)^2`` over every entry.

Temperature scaling divides the logits by one scalar T > 0 fitted on validation by minimum negative
log-likelihood (softmax cross-entropy; multi-label: the binary cross-entropy of every entry). NLL is convex
in 1/T, so a bounded scalar search over log T (``TEMPERATURE_RANGE``) finds its minimum. Only probabilities
are stored, so the logits are recovered from them: ``log p`` for softmax (the logits up to a per-row constant,
which softmax ignores), ``log(p / (1 - p))`` for sigmoid. The probabilities of this toolkit are float32
activations: a probability of exactly 0 is read as float32's smallest normal number and exactly 1 as float32's
largest number below 1 (sigmoid only), so saturated outputs get a finite logit. T > 1 softens, T < 1 sharpens;
the argmax, and for sigmoid the order of every label's probabilities, are unchanged.

Referral curve: refer the most uncertain fraction of the cases to a human and score the rest (the
"referral" evaluation of uncertainty in diabetic retinopathy screening).

References: Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (temperature scaling, ECE);
Naeini et al., "Obtaining Well Calibrated Probabilities Using Bayesian Binning", AAAI 2015 (ECE); Brier,
Monthly Weather Review 78(1), 1950; Leibig et al., "Leveraging uncertainty information from deep neural
networks for disease detection", Scientific Reports 7, 2017 (referral curves).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit

from util.metrics.common import MetricWarning
from util.metrics.multi_label import _prf, binarize
from util.metrics.regression import cut_grades, default_grade_thresholds

CALIBRATED_TASKS = ("single_label", "multi_label")  # the tasks whose outputs are probabilities
TEMPERATURE_RANGE = (0.01, 100.0)  # the search interval of fit_temperature
_TINY = float(np.finfo(np.float32).tiny)  # a probability of exactly 0
_ONE = float(np.nextafter(np.float32(1.0), np.float32(0.0)))  # a sigmoid probability of exactly 1
DEFAULT_FRACTIONS = tuple(round(0.05 * i, 2) for i in range(11))  # 0, 0.05, ..., 0.5


def _check_task(task_name: str, where: str) -> None:
    if task_name not in CALIBRATED_TASKS + ("regression",):
        raise ValueError(f"{where}: unknown task {task_name!r} (one of single_label, multi_label, regression)")


def temperature_applies(task_name: str, temperature) -> bool:
    """Whether ``temperature`` changes this task's outputs: a probability task and a T other than None / 1."""
    return task_name in CALIBRATED_TASKS and temperature is not None and float(temperature) != 1.0


def _check_temperature(temperature, where: str) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"{where}: temperature must be a finite number > 0, got {temperature!r}")
    return t


def _arrays(y_true, outputs, task_name: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(outputs, dtype=np.float64)
    y = np.asarray(y_true)
    if task_name == "single_label":
        y = y.reshape(-1)
        if p.ndim != 2 or len(y) != len(p):
            raise ValueError(f"{where}: expected probabilities [N, K] and N labels, got {p.shape} and {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
            raise ValueError(f"{where}: labels must be in [0, {p.shape[1]})")
        return y.astype(np.int64), p
    if p.ndim != 2 or y.shape != p.shape:
        raise ValueError(f"{where}: y_true and probabilities must both have shape [N, L], got {y.shape} and {p.shape}")
    return y.astype(np.float64), p


def _logits(p: np.ndarray, task_name: str) -> np.ndarray:
    """Logits recovered from probabilities (see the module docstring); NaN stays NaN."""
    if task_name == "single_label":
        return np.log(np.maximum(p, _TINY))
    q = np.clip(p, _TINY, _ONE)
    return np.log(q) - np.log1p(-q)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    top = z.max(axis=1, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(axis=1, keepdims=True))


def _nll_of_logits(y: np.ndarray, z: np.ndarray, task_name: str) -> float:
    if task_name == "single_label":
        return float(-_log_softmax(z)[np.arange(len(y)), y].mean())
    return float(np.mean(np.logaddexp(0.0, z) - y * z))  # binary cross-entropy with logits


def apply_temperature(outputs, temperature, task_name: str) -> np.ndarray:
    """Probabilities recomputed from the logits recovered from ``outputs``, divided by ``temperature``
    (float64, same shape). Regression outputs, and T == 1, are returned unchanged."""
    _check_task(task_name, "apply_temperature")
    t = _check_temperature(temperature, "apply_temperature")
    if task_name not in CALIBRATED_TASKS or t == 1.0:
        return outputs
    p = np.asarray(outputs, dtype=np.float64)
    z = _logits(p, task_name) / t
    if task_name == "single_label":
        with np.errstate(invalid="ignore"):
            return np.exp(_log_softmax(z))
    return expit(z)


def apply_temperature_to_thresholds(thresholds, temperature, task_name: str):
    """Multi-label decision thresholds moved onto the calibrated scale: each through the same map as the
    probabilities, so ``calibrated p > calibrated t`` exactly when ``p > t`` (the map is increasing). Other
    tasks' thresholds (regression grade cuts) and ``None`` are returned unchanged."""
    if thresholds is None or task_name != "multi_label" or not temperature_applies(task_name, temperature):
        return thresholds
    t = np.asarray(thresholds, dtype=np.float64).reshape(1, -1)
    return apply_temperature(t, temperature, task_name)[0]


def calibrate_outputs(outputs, thresholds, temperature, task_name: str):
    """(outputs, thresholds) with ``temperature`` applied to both (``apply_temperature`` and
    ``apply_temperature_to_thresholds``), so decisions stay the uncalibrated model's; unchanged when the
    temperature does not apply (``temperature_applies``). What ``evaluate`` and ``predict.py`` both do."""
    if not temperature_applies(task_name, temperature):
        return outputs, thresholds
    return (apply_temperature(outputs, temperature, task_name),
            apply_temperature_to_thresholds(thresholds, temperature, task_name))


def negative_log_likelihood(y_true, outputs, task_name: str) -> float:
    """Mean NLL of the truth under the probabilities (single-label cross-entropy; multi-label binary
    cross-entropy per entry), with the logits recovered as ``apply_temperature`` does; NaN when empty or when
    an output is not finite."""
    if task_name not in CALIBRATED_TASKS:
        raise ValueError(f"negative_log_likelihood: {task_name} outputs are not probabilities")
    y, p = _arrays(y_true, outputs, task_name, "negative_log_likelihood")
    if not len(p) or not np.isfinite(p).all():
        return float("nan")
    return _nll_of_logits(y, _logits(p, task_name), task_name)


def fit_temperature(y_true, outputs, task_name: str) -> float:
    """The temperature T > 0 minimising the NLL of ``apply_temperature(outputs, T)`` on these (validation)
    outputs: a bounded scalar search over log T in ``TEMPERATURE_RANGE``. No samples, or non-finite outputs
    (one ``MetricWarning``), give 1.0 (no change)."""
    if task_name not in CALIBRATED_TASKS:
        raise ValueError(f"fit_temperature: {task_name} outputs are not probabilities; temperature scaling "
                         "does not apply")
    y, p = _arrays(y_true, outputs, task_name, "fit_temperature")
    if not len(p):
        return 1.0
    if not np.isfinite(p).all():
        warnings.warn(f"fit_temperature: {int((~np.isfinite(p)).any(axis=1).sum())} of {len(p)} samples have "
                      "non-finite probabilities (diverged model?); the temperature stays 1", MetricWarning)
        return 1.0
    z = _logits(p, task_name)
    lo, hi = (math.log(v) for v in TEMPERATURE_RANGE)
    def nll(log_t: float) -> float:
        return _nll_of_logits(y, z / math.exp(log_t), task_name)

    found = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-7})
    best, log_t = found.fun, found.x
    for edge in (lo, hi):  # the bounded search never evaluates the ends themselves
        value = nll(edge)
        if value <= best:
            best, log_t = value, edge
    temperature = float(math.exp(log_t))
    if min(log_t - lo, hi - log_t) < 1e-3:
        warnings.warn(f"fit_temperature: the NLL is lowest at the edge of the search range (T {temperature:.3g}, range "
                      f"{TEMPERATURE_RANGE[0]:g} to {TEMPERATURE_RANGE[1]:g}): the validation outputs are (nearly) "
                      "perfectly separated or too few to fit a temperature (expected a minimum inside the range); "
                      "use a larger validation split, or do not use --calibrate for this run", MetricWarning)
    return temperature


def _confidence(y: np.ndarray, p: np.ndarray, task_name: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(confidence per prediction, 1.0 where it was right / the label is positive, Brier score)."""
    if task_name == "single_label":
        onehot = np.eye(p.shape[1])[y]
        return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64), float(((p - onehot) ** 2).sum(1).mean())
    return p.ravel(), y.ravel(), float(((p - y) ** 2).mean())


def calibration_summary(y_true, outputs, task_name: str, n_bins: int = 15) -> dict:
    """``{'ece', 'brier', 'bins'}``: ``bins`` holds all ``n_bins`` equal-width bins, each
    ``{'lo', 'hi', 'confidence', 'accuracy', 'count'}`` (mean confidence and accuracy of the predictions in
    ``(lo, hi]``, NaN when the bin is empty). Regression: ``{}``. No samples, or non-finite outputs (one
    ``MetricWarning``), give NaN ECE and Brier with empty bins."""
    _check_task(task_name, "calibration_summary")
    if task_name not in CALIBRATED_TASKS:
        return {}
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"calibration_summary: n_bins must be a positive integer, got {n_bins!r}")
    y, p = _arrays(y_true, outputs, task_name, "calibration_summary")
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    empty = [{"lo": float(edges[i]), "hi": float(edges[i + 1]), "confidence": math.nan, "accuracy": math.nan,
              "count": 0} for i in range(int(n_bins))]
    if not len(p) or not np.isfinite(p).all():
        if len(p):
            warnings.warn("calibration_summary: non-finite probabilities (diverged model?); ECE and Brier are NaN",
                          MetricWarning)
        return {"ece": math.nan, "brier": math.nan, "bins": empty}
    conf, hit, brier = _confidence(y, p, task_name)
    # searchsorted on the listed edges, so a confidence equal to an edge falls in the bin that edge closes
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, int(n_bins) - 1)
    bins, ece = [], 0.0
    for i, row in enumerate(empty):
        members = which == i
        count = int(members.sum())
        if count:
            c, a = float(conf[members].mean()), float(hit[members].mean())
            ece += count / len(conf) * abs(a - c)
            row = {**row, "confidence": c, "accuracy": a, "count": count}
        bins.append(row)
    return {"ece": float(ece), "brier": brier, "bins": bins}


def _certainty(y, out, task_name, thresholds, num_classes) -> tuple[np.ndarray, str, object]:
    """(certainty per case, higher is surer; the metric's name; the function scoring a subset of rows)."""
    if task_name == "single_label":
        finite = np.isfinite(out).all(axis=1)
        pred = np.nan_to_num(out, nan=-np.inf).argmax(axis=1)
        certainty = np.where(finite, np.nan_to_num(out, nan=-np.inf).max(axis=1), -np.inf)
        return certainty, "accuracy", lambda keep: float(np.mean(pred[keep] == y[keep]))
    if task_name == "multi_label":
        t = np.full(out.shape[1], 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        certainty = np.abs(out - t).mean(axis=1)
        pred = binarize(out, thresholds)
        return (np.where(np.isfinite(certainty), certainty, -np.inf), "f1_macro",
                lambda keep: float(np.mean(_prf(y[keep].astype(np.int64), pred[keep])[2])))
    cuts = np.asarray(default_grade_thresholds(num_classes) if thresholds is None else thresholds, dtype=np.float64)
    flat = out.reshape(-1)
    certainty = np.abs(flat[:, None] - cuts[None, :]).min(axis=1) if cuts.size else np.zeros(len(flat))
    grades = cut_grades(flat, cuts)
    return (np.where(np.isfinite(certainty), certainty, -np.inf), "accuracy",
            lambda keep: float(np.mean(grades[keep] == y[keep])))


def referral_curve(y_true, outputs, task_name: str, num_classes: int, thresholds=None, fractions=None) -> dict:
    """The metric on the cases kept after referring the most uncertain fraction of them.

    Uncertain first: the lowest top-class probability (single-label), the lowest mean ``|p - threshold|``
    (multi-label, thresholds 0.5 unless given), the output nearest a grade cut (regression, the midpoints
    unless given); ties in the original order, non-finite outputs referred first. ``floor(f * N)`` cases are
    referred at fraction f. The metric: accuracy (single-label), macro F1 at the thresholds (multi-label),
    accuracy of the grades (regression); NaN when no case is kept.

    Returns ``{'fraction': [...], 'metric': [...], 'metric_name': str, 'kept': [...]}`` (``kept``: the cases
    scored at each fraction).
    """
    _check_task(task_name, "referral_curve")
    fractions = list(DEFAULT_FRACTIONS if fractions is None else fractions)
    if any(not (0.0 <= float(f) < 1.0) for f in fractions):
        raise ValueError(f"referral_curve: fractions must lie in [0, 1), got {fractions}")
    out = np.asarray(outputs, dtype=np.float64)
    y = np.asarray(y_true)
    if task_name != "multi_label":
        y = y.reshape(-1)
    if out.ndim == 1:
        out = out.reshape(-1, 1)
    if len(y) != len(out):
        raise ValueError(f"referral_curve: {len(y)} labels but {len(out)} outputs")
    n = len(out)
    certainty, name, score = _certainty(y, out, task_name, thresholds, num_classes)
    order = np.argsort(certainty, kind="stable")
    metric, kept = [], []
    for f in fractions:
        keep = order[int(math.floor(float(f) * n + 1e-9)):]
        kept.append(int(len(keep)))
        metric.append(score(keep) if len(keep) else math.nan)
    return {"fraction": [float(f) for f in fractions], "metric": metric, "metric_name": name, "kept": kept}
