"""util.metrics.regression against scikit-learn called directly, cut semantics, the QWK threshold search
(never worse than its start, recovers shifted cuts, no single-cut move on a fine grid improves it) and
degenerate inputs (NaN + exactly one MetricWarning, never an exception)."""
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from helpers import call_quietly, call_with_one_warning
from util.metrics import MetricWarning
from util.metrics.regression import (
    CUT_RESOLUTION,
    DEFAULT_GRADE_THRESHOLDS,
    REGRESSION_COLUMNS,
    compute_regression_metrics,
    cut_grades,
    default_grade_thresholds,
    optimise_thresholds_qwk,
)


def _case(seed, n, g, noise=0.6, shift=0.0):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(g), rng.integers(0, g, n - g)])
    return y, y + shift + rng.normal(0, noise, n)


def _qwk(y, pred, g):
    return skm.cohen_kappa_score(y, pred, weights='quadratic', labels=np.arange(g))


def _quiet(fn, *a, **kw):
    return call_quietly(fn, *a, **kw)


def _one_warning(fn, *a, **kw):
    return call_with_one_warning(fn, MetricWarning, *a, **kw)


def test_columns_and_defaults():
    assert REGRESSION_COLUMNS == ['val_loss', 'accuracy', 'f1', 'kappa_quadratic', 'kappa', 'mae', 'accuracy_tuned',
                                  'f1_tuned', 'kappa_quadratic_tuned']
    assert DEFAULT_GRADE_THRESHOLDS == (0.5, 1.5, 2.5, 3.5) == default_grade_thresholds(5)
    assert default_grade_thresholds(3) == (0.5, 1.5) and default_grade_thresholds(2) == (0.5,)


def test_cut_grades_digitize_semantics():
    out = np.array([-3.0, 0.49, 0.5, 0.51, 1.5, 3.49, 3.5, 9.0, np.inf, -np.inf, np.nan])
    got = cut_grades(out, DEFAULT_GRADE_THRESHOLDS)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [0, 0, 1, 1, 2, 3, 4, 4, 4, 0, -1])
    np.testing.assert_array_equal(cut_grades(out[:8].reshape(-1, 1), [0.0, 1.0]), [0, 1, 1, 1, 2, 2, 2, 2])
    for bad in ([1.5, 0.5], [0.5, 0.5], [0.5, np.nan]):
        with pytest.raises(ValueError, match='strictly increasing'):
            cut_grades(out, bad)


@pytest.mark.parametrize('seed,n,g', [(0, 100, 5), (1, 400, 5), (2, 50, 3), (3, 60, 2), (4, 200, 7)])
def test_matches_sklearn(seed, n, g):
    y, out = _case(seed, n, g)
    tuned = np.array(default_grade_thresholds(g)) + 0.1
    got = _quiet(compute_regression_metrics, y, out, g, tuned_thresholds=tuned)
    pred = np.clip(np.floor(out + 0.5), 0, g - 1).astype(int)       # the midpoint cuts, written differently
    pred_t = np.clip(np.floor(out + 0.4), 0, g - 1).astype(int)
    labels = np.arange(g)
    ref = {'accuracy': skm.accuracy_score(y, pred),
           'f1': skm.f1_score(y, pred, labels=labels, average='macro', zero_division=0),
           'kappa_quadratic': _qwk(y, pred, g), 'kappa': skm.cohen_kappa_score(y, pred),
           'mae': skm.mean_absolute_error(y, out), 'accuracy_tuned': skm.accuracy_score(y, pred_t),
           'f1_tuned': skm.f1_score(y, pred_t, labels=labels, average='macro', zero_division=0),
           'kappa_quadratic_tuned': _qwk(y, pred_t, g)}
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
    assert all(isinstance(got[c], float) for c in REGRESSION_COLUMNS[1:])
    np.testing.assert_array_equal(got['confusion'], skm.confusion_matrix(y, pred, labels=labels))
    np.testing.assert_array_equal(got['confusion_tuned'], skm.confusion_matrix(y, pred_t, labels=labels))
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    assert [row['class'] for row in got['per_class']] == [str(i) for i in range(g)]
    np.testing.assert_allclose([row['precision'] for row in got['per_class']], p, rtol=1e-12)
    np.testing.assert_allclose([row['recall'] for row in got['per_class']], r, rtol=1e-12)
    np.testing.assert_allclose([row['f1'] for row in got['per_class']], f, rtol=1e-12)
    assert [row['support'] for row in got['per_class']] == s.tolist()
    assert got['thresholds'] == list(default_grade_thresholds(g)) and got['tuned_thresholds'] == tuned.tolist()
    assert got['notes'] == []


def test_explicit_thresholds_and_no_tuned():
    y, out = _case(5, 80, 5)
    cuts = [0.2, 1.4, 2.7, 3.3]
    got = _quiet(compute_regression_metrics, y.astype(np.float32), out.reshape(-1, 1), 5, thresholds=cuts,
                 class_names=['none', 'mild', 'moderate', 'severe', 'pdr'])
    assert got['accuracy'] == pytest.approx(np.mean(np.digitize(out, cuts) == y))
    assert all(math.isnan(got[k]) for k in ('accuracy_tuned', 'f1_tuned', 'kappa_quadratic_tuned'))
    assert got['confusion_tuned'] is None and got['per_class'][4]['class'] == 'pdr'


def test_quadratic_kappa_uses_full_grade_range():
    y = np.array([0, 1, 3, 4, 1, 3, 0, 4])                           # grade 2 absent
    out = np.array([0.0, 3.0, 1.0, 4.0, 1.0, 3.0, 0.0, 4.0])
    got = _quiet(compute_regression_metrics, y, out, 5)
    pred = out.astype(int)
    assert got['kappa_quadratic'] == pytest.approx(_qwk(y, pred, 5), rel=1e-12)
    assert got['kappa_quadratic'] != pytest.approx(skm.cohen_kappa_score(y, pred, weights='quadratic'))


def test_single_grade_everywhere_gives_nan_kappas_and_one_warning():
    got, msg = _one_warning(compute_regression_metrics, np.zeros(6), np.full(6, 0.1), 5)
    assert math.isnan(got['kappa']) and math.isnan(got['kappa_quadratic']) and 'kappa' in msg
    assert got['accuracy'] == 1.0 and got['mae'] == pytest.approx(0.1)
    assert got['f1'] == pytest.approx(1 / 5)                          # grades 1-4 absent and never predicted: 0


def test_single_grade_in_labels_with_varied_predictions():
    got = _quiet(compute_regression_metrics, np.full(4, 2), np.array([2.0, 2.1, 0.2, 3.9]), 5)
    assert got['kappa'] == pytest.approx(0.0) and got['accuracy'] == 0.5


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_non_finite_outputs_give_nan_and_one_warning(bad):
    y, out = _case(6, 30, 5)
    out[[3, 7]] = bad
    got, msg = _one_warning(compute_regression_metrics, y, out, 5, tuned_thresholds=[1, 2, 3, 4])
    assert 'not finite' in msg and '2 of 30' in msg
    assert all(math.isnan(got[c]) for c in REGRESSION_COLUMNS[1:])
    assert got['confusion'].sum() == 28 and all(math.isnan(r['f1']) for r in got['per_class'])
    assert [r['support'] for r in got['per_class']] == np.bincount(y, minlength=5).tolist()
    t, msg = _one_warning(optimise_thresholds_qwk, y, out, 5)
    np.testing.assert_array_equal(t, DEFAULT_GRADE_THRESHOLDS)


@pytest.mark.parametrize('y,out,g', [(np.zeros(0), np.zeros(0), 5), (np.zeros(3), np.zeros(3), 1)])
def test_empty_or_one_grade(y, out, g):
    got, _ = _one_warning(compute_regression_metrics, y, out, g)
    assert all(math.isnan(got[c]) for c in REGRESSION_COLUMNS[1:])


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match='labels'):
        compute_regression_metrics([0, 5], [0.0, 1.0], 5)
    with pytest.raises(ValueError, match='labels'):
        compute_regression_metrics([0, 1.5], [0.0, 1.0], 5)
    with pytest.raises(ValueError, match='outputs'):
        compute_regression_metrics([0, 1], np.zeros((2, 3)), 5)
    with pytest.raises(ValueError, match='3 thresholds for 5 grades'):
        compute_regression_metrics([0, 1], [0.0, 1.0], 5, tuned_thresholds=[1, 2, 3])
    with pytest.raises(ValueError, match='at least 2'):
        optimise_thresholds_qwk([0, 0], [0.0, 1.0], 1)
    with pytest.raises(ValueError, match='strictly increasing'):
        optimise_thresholds_qwk([0, 1], [0.0, 1.0], 3, init=[1.0, 1.0])


# ---------------------------------------------------------------------------------------------------
# threshold search

def test_recovers_shifted_cuts():
    y, out = _case(7, 2000, 5, noise=0.15, shift=0.7)
    t = _quiet(optimise_thresholds_qwk, y, out, 5)
    np.testing.assert_allclose(t, np.array(DEFAULT_GRADE_THRESHOLDS) + 0.7, atol=0.1)
    assert _qwk(y, cut_grades(out, t), 5) > _qwk(y, cut_grades(out, DEFAULT_GRADE_THRESHOLDS), 5) + 0.1


@pytest.mark.parametrize('seed', range(8))
def test_never_worse_than_start_and_coordinatewise_optimal(seed):
    rng = np.random.default_rng(100 + seed)
    g = int(rng.integers(2, 6))
    y, out = _case(seed, int(rng.integers(20, 120)), g, noise=float(rng.uniform(0.3, 1.2)), shift=rng.normal(0, 0.5))
    out = np.round(out, 1)                                            # many equal outputs
    init = np.sort(rng.uniform(-0.5, g - 0.5, g - 1)) if seed % 2 else None
    if init is not None and (np.diff(init) <= 0).any():
        init = None
    start = np.array(default_grade_thresholds(g) if init is None else init)
    t = _quiet(optimise_thresholds_qwk, y, out, g, init=init)
    assert t.shape == (g - 1,) and (np.diff(t) > 0).all()
    q = _qwk(y, cut_grades(out, t), g)
    assert q >= _qwk(y, cut_grades(out, start), g) - 1e-12
    np.testing.assert_array_equal(optimise_thresholds_qwk(y, out, g, init=init), t)   # deterministic
    # no single cut moved anywhere on a fine grid between its neighbours does better (the search is exact)
    for j in range(g - 1):
        lo = t[j - 1] if j else out.min() - 1
        hi = t[j + 1] if j < g - 2 else out.max() + 1
        for c in np.arange(lo + 0.025, hi, 0.05):
            trial = t.copy()
            trial[j] = c
            assert _qwk(y, cut_grades(out, trial), g) <= q + 1e-12, (j, c)


def test_keeps_init_when_nothing_improves():
    y = np.array([0, 1, 2, 3, 4])
    out = y.astype(float)                                             # already perfect at the midpoints
    np.testing.assert_array_equal(_quiet(optimise_thresholds_qwk, y, out, 5), DEFAULT_GRADE_THRESHOLDS)
    assert optimise_thresholds_qwk([], [], 5).tolist() == list(DEFAULT_GRADE_THRESHOLDS)


def test_tuned_cuts_keep_a_margin_from_outputs_that_differ_by_rounding():
    # a nearly constant model (the tiny test models): outputs equal up to float rounding must not be split
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 60)
    # grades 0-3 differ by 1e-9 only (a split there would be perfect on val and meaningless); grade 4 really differs
    out = 0.0530408 + np.minimum(y, 3) * 1e-9 + (y == 4) * 0.3
    t = _quiet(optimise_thresholds_qwk, y, out, 5)
    gaps = np.abs(t[:, None] - out[None, :]).min(axis=1)
    assert (gaps >= CUT_RESOLUTION / 2).all(), (t, gaps)
    assert (np.diff(t) >= CUT_RESOLUTION / 4).all(), t
    # the same outputs moved by float32 rounding get the same grades
    jitter = out.astype(np.float32).astype(np.float64) + rng.normal(0, 1e-7, out.size)
    np.testing.assert_array_equal(cut_grades(jitter, t), cut_grades(out, t))
    # and the one real separation is still found
    assert (cut_grades(out, t)[y == 4] > cut_grades(out, t)[y != 4].max()).all()


@pytest.mark.parametrize('seed', range(4))
def test_tuned_cuts_never_sit_within_half_the_resolution_of_an_output(seed):
    rng = np.random.default_rng(seed)
    y, out = _case(seed, 200, 5, noise=0.4)
    # clusters finer than the resolution whose members have different grades
    out = np.concatenate([out, out[:80] + rng.uniform(-3e-5, 3e-5, 80)])
    y = np.concatenate([y, rng.integers(0, 5, 80)])
    t = _quiet(optimise_thresholds_qwk, y, out, 5)
    assert np.abs(t[:, None] - out[None, :]).min() >= CUT_RESOLUTION / 2
