"""util.metrics.bootstrap: percentile intervals against a direct loop with the same draws, stratification,
NaN handling, and the task intervals: of exactly the numbers the task's metric function reports."""
from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest

import engine_finetune as engine
from util.metrics.bootstrap import _NUMPY_METRICS, MIN_STRATUM, bootstrap_cis, task_metric_cis, task_strata


def _percentile(values, q):
    """numpy's default (linear) percentile, written out: position (m - 1) q / 100 in the sorted values."""
    v = sorted(values)
    h = (len(v) - 1) * q / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (h - lo) * (v[hi] - v[lo])


def _accuracy(y, p):
    return {"accuracy": float(np.mean(p.argmax(axis=1) == y))}


def _sample(n=60, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    z = rng.normal(size=(n, k))
    z[np.arange(n), y] += 1.0
    return y, np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


def test_accuracy_interval_equals_a_direct_loop_with_the_same_draws():
    y, p = _sample()
    got = bootstrap_cis(_accuracy, y, p, n_resamples=200, seed=7)["accuracy"]
    # the same draws, written as a plain loop: one resample = n rows drawn with replacement
    rng = np.random.default_rng(7)
    accs = []
    for _ in range(200):
        rows = rng.integers(0, len(y), len(y))
        accs.append(sum(int(p[i].argmax() == y[i]) for i in rows) / len(y))
    assert got == pytest.approx((_percentile(accs, 2.5), _percentile(accs, 97.5)), abs=1e-12)
    point = float(np.mean(p.argmax(axis=1) == y))
    assert got[0] <= point <= got[1] and got[0] < got[1]
    narrow = bootstrap_cis(_accuracy, y, p, n_resamples=200, seed=7, level=0.5)["accuracy"]
    assert got[0] < narrow[0] <= narrow[1] < got[1]


def test_stratified_draws_stay_within_each_stratum_in_order():
    y, p = _sample(n=30)
    strata = y.copy()
    got = bootstrap_cis(_accuracy, y, p, strata=strata, n_resamples=50, seed=3)["accuracy"]
    rng = np.random.default_rng(3)
    accs = []
    for _ in range(50):
        rows = []
        for s in sorted(set(strata.tolist())):  # each stratum in turn, its rows in data order
            members = [i for i in range(len(y)) if strata[i] == s]
            rows += [members[j] for j in rng.integers(0, len(members), len(members))]
        accs.append(sum(int(p[i].argmax() == y[i]) for i in rows) / len(y))
    assert got == pytest.approx((_percentile(accs, 2.5), _percentile(accs, 97.5)), abs=1e-12)


def test_stratification_keeps_the_class_counts_of_every_resample():
    y, p = _sample(n=50, k=4, seed=1)
    counts = np.bincount(y, minlength=4)
    seen = []

    def metric(ys, ps):
        seen.append(np.bincount(ys, minlength=4))
        return _accuracy(ys, ps)

    bootstrap_cis(metric, y, p, strata=y, n_resamples=100, seed=0)
    assert len(seen) == 100 and all(np.array_equal(c, counts) for c in seen)
    seen.clear()
    bootstrap_cis(metric, y, p, n_resamples=100, seed=0)  # without strata the counts vary
    assert any(not np.array_equal(c, counts) for c in seen)


def test_nan_resamples_are_left_out_and_an_all_nan_metric_has_no_interval():
    y, p = _sample(n=40)
    calls = iter(range(10 ** 6))

    def metric(ys, ps):
        i = next(calls)
        warnings.warn("undefined here")  # silenced: it would repeat in every resample
        return {"accuracy": float("nan") if i % 2 else float(np.mean(ps.argmax(axis=1) == ys)),
                "never": float("nan"), "table": [1, 2]}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = bootstrap_cis(metric, y, p, n_resamples=100, seed=2)
    rng = np.random.default_rng(2)
    accs = []
    for b in range(100):
        rows = rng.integers(0, len(y), len(y))
        if b % 2 == 0:
            accs.append(float(np.mean(p[rows].argmax(axis=1) == y[rows])))
    assert got["accuracy"] == pytest.approx((_percentile(accs, 2.5), _percentile(accs, 97.5)), abs=1e-12)
    assert all(math.isnan(v) for v in got["never"]) and "table" not in got


def test_multilabel_strata_are_label_combinations_with_rare_ones_pooled():
    y = np.array([[1, 0]] * MIN_STRATUM + [[0, 1]] * (MIN_STRATUM + 1) + [[1, 1]] * (MIN_STRATUM - 1) + [[0, 0]])
    s = task_strata("multi_label", y)
    assert len(set(s[:MIN_STRATUM])) == 1 and len(set(s[MIN_STRATUM:2 * MIN_STRATUM + 1])) == 1
    assert s[0] != s[MIN_STRATUM] and (s[2 * MIN_STRATUM + 1:] == -1).all()
    assert task_strata("regression", np.array([0.0, 2.0, 1.0])).tolist() == [0, 2, 1]


# ---------------------------------------------------------------------------------------------------
# task intervals


def _task_data(name, n=80, seed=0):
    rng = np.random.default_rng(seed)
    if name == "single_label":
        y, p = _sample(n=n, k=4, seed=seed)
        return y, np.round(p, 2), 4, None  # rounded: tied probabilities
    if name == "multi_label":
        y = (rng.random((n, 3)) < 0.35).astype(np.int64)
        y[:, 2] = 0
        y[:3, 2] = 1  # a rare label, absent from some resamples
        p = np.round(1 / (1 + np.exp(-(rng.normal(size=(n, 3)) + 1.5 * y))), 2)
        return y, p, 3, np.array([0.4, 0.55, 0.3])
    y = rng.integers(0, 5, size=n).astype(np.float64)
    return y, (y + rng.normal(0, 0.8, size=n)).reshape(-1, 1), 5, np.array([0.4, 1.6, 2.5, 3.3])


@pytest.mark.parametrize("name", ["single_label", "multi_label", "regression"])
def test_numpy_metrics_equal_the_task_metric_function_on_resamples(name):
    task = engine.get_task(name)
    y, out, k, thresholds = _task_data(name)
    rng = np.random.default_rng(5)
    keys = [c for c in task.columns if c != "val_loss"]
    for _ in range(15):
        rows = rng.integers(0, len(y), len(y))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = task.metrics(y[rows], out[rows], k, None, thresholds)
        got = _NUMPY_METRICS[name](y[rows], out[rows], k, thresholds)
        for key in keys:
            assert (math.isnan(want[key]) and math.isnan(got[key])) or got[key] == pytest.approx(want[key], abs=1e-9), \
                (key, got[key], want[key])


def test_single_label_numpy_metrics_follow_the_macro_subset():
    task = engine.get_task("single_label")
    y, p, k, _ = _task_data("single_label")
    want = task.metrics(y, p, k, None, None, classes=[0, 2])
    got = _NUMPY_METRICS["single_label"](y, p, k, None, [0, 2])
    for key in ("f1", "roc_auc", "precision", "recall", "jaccard", "average_precision", "accuracy", "score"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


@pytest.mark.parametrize("name", ["single_label", "multi_label", "regression"])
def test_task_intervals_are_those_of_the_task_function(name, monkeypatch):
    task = engine.get_task(name)
    y, out, k, thresholds = _task_data(name)

    def reported(ys, os_):
        return task.metrics(ys, os_, k, None, thresholds)

    calls = []
    numpy_version = _NUMPY_METRICS[name]
    monkeypatch.setitem(_NUMPY_METRICS, name, lambda *a: calls.append(1) or numpy_version(*a))
    got = task_metric_cis(task, y, out, k, thresholds=thresholds, n_resamples=40, seed=1)
    assert len(calls) == 1 + 40  # the check on the data, then every resample: the fast path was taken
    want = bootstrap_cis(reported, y, out, strata=task_strata(name, y), n_resamples=40, seed=1)
    assert list(got) == [c for c in task.columns if c != "val_loss"]
    for key, (lo, hi) in got.items():
        assert (lo, hi) == pytest.approx(want[key], abs=1e-9, nan_ok=True), key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        point = task.metrics(y, out, k, None, thresholds)
    headline = {"single_label": "accuracy", "multi_label": "roc_auc", "regression": "kappa_quadratic"}[name]
    assert got[headline][0] <= point[headline] <= got[headline][1]


def test_a_task_function_the_numpy_version_does_not_match_is_used_itself():
    base = engine.get_task("single_label")

    def shifted(y, p, k, names=None, thresholds=None, classes=None):
        out = base.metrics(y, p, k, names, thresholds)
        return {**out, "accuracy": out["accuracy"] + 0.25}

    task = dataclasses.replace(base, metrics=shifted)
    y, p, k, _ = _task_data("single_label")
    got = task_metric_cis(task, y, p, k, n_resamples=30, seed=0)
    plain = task_metric_cis(base, y, p, k, n_resamples=30, seed=0)
    assert got["accuracy"] == pytest.approx((plain["accuracy"][0] + 0.25, plain["accuracy"][1] + 0.25), abs=1e-12)
    assert got["f1"] == pytest.approx(plain["f1"], abs=1e-12)


def test_task_intervals_of_no_samples_are_empty():
    task = engine.get_task("single_label")
    assert task_metric_cis(task, np.zeros(0, dtype=np.int64), np.zeros((0, 3)), 3, n_resamples=5) == {}
