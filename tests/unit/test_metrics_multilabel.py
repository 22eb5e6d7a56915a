"""util.metrics.multi_label against scikit-learn called directly, the ODIR score against its definition
(random data and a hand-worked example), F1 threshold tuning against brute force, and degenerate inputs
(NaN + exactly one MetricWarning, never an exception)."""
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from helpers import call_quietly, call_with_one_warning
from util.metrics import MetricWarning
from util.metrics.multi_label import (
    MULTILABEL_COLUMNS,
    binarize,
    compute_multilabel_metrics,
    odir_score,
    tune_thresholds_f1,
)


def _case(seed, n, num_labels, signal=1.5, rate=0.3):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, num_labels)) < rate).astype(np.int64)
    y[:2] = [[1] * num_labels, [0] * num_labels]               # every label has a positive and a negative
    logits = rng.normal(size=(n, num_labels)) + signal * (2 * y - 1)
    return y, 1 / (1 + np.exp(-logits))


def _quiet(fn, *a, **kw):
    return call_quietly(fn, *a, **kw)


def _one_warning(fn, *a, **kw):
    return call_with_one_warning(fn, MetricWarning, *a, **kw)


def _odir_definition(gt, pr):
    """The ODIR challenge code: flatten, threshold 0.5, scikit-learn."""
    gt, pr = gt.flatten(), pr.flatten()
    kappa = skm.cohen_kappa_score(gt, pr > 0.5)
    f1 = skm.f1_score(gt, pr > 0.5, average='micro')
    auc = skm.roc_auc_score(gt, pr)
    return {'kappa': kappa, 'f1': f1, 'auc': auc, 'final': (kappa + f1 + auc) / 3.0}


def test_columns():
    assert MULTILABEL_COLUMNS[0] == 'val_loss'
    assert MULTILABEL_COLUMNS == ['val_loss', 'f1_macro', 'f1_micro', 'precision_macro', 'recall_macro', 'roc_auc',
                                  'map', 'hamming', 'subset_accuracy', 'odir_kappa', 'odir_f1', 'odir_auc',
                                  'odir_final', 'f1_macro_tuned', 'f1_micro_tuned']


@pytest.mark.parametrize('seed,n,num_labels', [(0, 60, 4), (1, 300, 8), (2, 25, 2), (3, 150, 1)])
def test_matches_sklearn(seed, n, num_labels):
    y, p = _case(seed, n, num_labels)
    thr = np.linspace(0.3, 0.7, num_labels)
    got = _quiet(compute_multilabel_metrics, y, p, thr)
    pred, pred_t = (p > 0.5).astype(int), (p > thr).astype(int)
    ref = _sklearn_reference(y, p, pred, pred_t)
    ref.update({f"odir_{k}": v for k, v in _odir_definition(y, p).items()})
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert set(MULTILABEL_COLUMNS[1:]) <= set(got) and all(isinstance(got[c], float) for c in MULTILABEL_COLUMNS[1:])
    assert len(got['per_class']) == num_labels
    for c, row in enumerate(got['per_class']):
        assert set(row) == {'class', 'support', 'precision', 'recall', 'f1', 'auroc', 'ap', 'threshold', 'f1_tuned'}
        assert row['class'] == str(c) and row['support'] == y[:, c].sum()
        assert row['auroc'] == pytest.approx(skm.roc_auc_score(y[:, c], p[:, c]), rel=1e-12)
        assert row['ap'] == pytest.approx(skm.average_precision_score(y[:, c], p[:, c]), rel=1e-12)
        assert row['precision'] == pytest.approx(skm.precision_score(y[:, c], pred[:, c], zero_division=0), rel=1e-12)
        assert row['recall'] == pytest.approx(skm.recall_score(y[:, c], pred[:, c], zero_division=0), rel=1e-12)
        assert row['f1'] == pytest.approx(skm.f1_score(y[:, c], pred[:, c], zero_division=0), rel=1e-12)
        assert row['f1_tuned'] == pytest.approx(skm.f1_score(y[:, c], pred_t[:, c], zero_division=0), rel=1e-12)
        assert row['threshold'] == thr[c]
    assert got['notes'] == [] and got['undefined_labels'] == []


def _sklearn_reference(y, p, pred, pred_t):
    if y.shape[1] == 1:
        # scikit-learn reads an [N, 1] matrix as binary classes 0/1, not as one label; a duplicated column
        # leaves every macro/micro/hamming/subset value of a single label unchanged
        y, p, pred, pred_t = (np.hstack([a, a]) for a in (y, p, pred, pred_t))
    kw = dict(zero_division=0)
    return {'f1_macro': skm.f1_score(y, pred, average='macro', **kw),
           'f1_micro': skm.f1_score(y, pred, average='micro', **kw),
           'precision_macro': skm.precision_score(y, pred, average='macro', **kw),
           'recall_macro': skm.recall_score(y, pred, average='macro', **kw),
           'roc_auc': skm.roc_auc_score(y, p, average='macro'),
           'map': skm.average_precision_score(y, p, average='macro'),
           'hamming': skm.hamming_loss(y, pred), 'subset_accuracy': skm.accuracy_score(y, pred),
           'f1_macro_tuned': skm.f1_score(y, pred_t, average='macro', **kw),
           'f1_micro_tuned': skm.f1_score(y, pred_t, average='micro', **kw)}


def test_without_thresholds_tuned_are_nan():
    y, p = _case(4, 40, 3)
    got = _quiet(compute_multilabel_metrics, y, p, class_names=['N', 'D', 'G'])
    assert math.isnan(got['f1_macro_tuned']) and math.isnan(got['f1_micro_tuned'])
    assert [r['class'] for r in got['per_class']] == ['N', 'D', 'G']
    assert all(math.isnan(r['threshold']) and math.isnan(r['f1_tuned']) for r in got['per_class'])


def test_hand_worked_example():
    # 3 patients x 2 labels. Flattened: gt = [1,0, 0,1, 1,1], pr = [.9,.2, .6,.7, .4,.8],
    # pr > 0.5 = [1,0, 1,1, 0,1] -> TP 3 (entries 0,3,5), FN 1 (entry 4), FP 1 (entry 2), TN 1 (entry 1).
    # ODIR f1 = scikit-learn micro F1 of two 1-D 0/1 vectors = accuracy = 4/6 = 2/3 (not 2TP/(2TP+FP+FN) = 3/4).
    # kappa: po = 4/6; pe = P(gt=1)P(pr=1) + P(gt=0)P(pr=0) = (4/6)(4/6) + (2/6)(2/6) = 20/36 = 5/9;
    #        kappa = (2/3 - 5/9) / (1 - 5/9) = (1/9) / (4/9) = 1/4.
    # auc: positives {.9,.7,.4,.8} vs negatives {.2,.6}: 8 pairs, only .4 < .6 is mis-ordered -> 7/8.
    # final = (1/4 + 2/3 + 7/8) / 3 = (6 + 16 + 21) / 24 / 3 = 43/72.
    y = np.array([[1, 0], [0, 1], [1, 1]])
    p = np.array([[0.9, 0.2], [0.6, 0.7], [0.4, 0.8]])
    assert _quiet(odir_score, y, p) == pytest.approx({'kappa': 0.25, 'f1': 2 / 3, 'auc': 0.875, 'final': 43 / 72},
                                                     rel=1e-12)
    # Label 0: gt [1,0,1], pred [1,1,0] -> P = R = F1 = 1/2; label 1: gt [0,1,1], pred [0,1,1] -> 1.
    # micro over positives: TP 3, FP 1, FN 1 -> 6/8. hamming 2/6; exact rows: only patient 0 -> 1/3.
    # AUROC label 0: positives {.9,.4} vs {.6} -> 1/2; label 1 -> 1; macro 3/4.
    # AP label 0: ranking .9(+) .6(-) .4(+) -> 1/2 * 1 + 1/2 * 2/3 = 5/6; label 1 -> 1; mAP 11/12.
    # Tuned threshold label 0: all positive (t below .4, middle of the gap to 0 = .2) -> F1 = 4/5; label 1
    # is already perfect at 0.5, which wins the tie.
    thr = _quiet(tune_thresholds_f1, y, p)
    np.testing.assert_allclose(thr, [0.2, 0.5])
    got = _quiet(compute_multilabel_metrics, y, p, thr)
    want = {'f1_macro': 0.75, 'f1_micro': 0.75, 'hamming': 1 / 3, 'subset_accuracy': 1 / 3, 'roc_auc': 0.75,
            'map': 11 / 12, 'odir_final': 43 / 72, 'f1_macro_tuned': 0.9, 'f1_micro_tuned': 8 / 9}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12), k


@pytest.mark.parametrize('seed', range(4))
def test_odir_score_matches_definition_on_random_data(seed):
    y, p = _case(seed, 90, 8, signal=0.8)
    got = _quiet(odir_score, y, p)
    assert got == pytest.approx(_odir_definition(y, p), rel=1e-12, abs=1e-12)
    assert got['f1'] == pytest.approx(1 - skm.hamming_loss(y, (p > 0.5).astype(int)), rel=1e-12)


def test_threshold_is_strictly_greater():
    p = np.array([[0.5, 0.5000001]])
    np.testing.assert_array_equal(binarize(p), [[0, 1]])
    np.testing.assert_array_equal(binarize(p, [0.4, 0.6]), [[1, 0]])
    np.testing.assert_array_equal(binarize(np.array([[np.nan, 0.9]])), [[0, 1]])


def test_rare_label_macro_over_defined_labels_with_one_warning():
    y, p = _case(5, 50, 4)
    y[:, 2] = 0                                                  # no positive in this split
    got, msg = _one_warning(compute_multilabel_metrics, y, p, class_names=['N', 'D', 'G', 'C'])
    assert "2 ('G')" in msg and got['undefined_labels'] == [2]
    assert math.isnan(got['per_class'][2]['auroc']) and math.isnan(got['per_class'][2]['ap'])
    defined = [0, 1, 3]
    assert got['roc_auc'] == pytest.approx(np.mean([skm.roc_auc_score(y[:, c], p[:, c]) for c in defined]), rel=1e-12)
    assert got['map'] == pytest.approx(np.mean([skm.average_precision_score(y[:, c], p[:, c]) for c in defined]),
                                       rel=1e-12)
    assert 'average the other labels' in msg and got['notes'] == [msg]
    # the threshold metrics keep scikit-learn's definition (the absent label counts with F1 0)
    pred = (p > 0.5).astype(int)
    assert got['f1_macro'] == pytest.approx(skm.f1_score(y, pred, average='macro', zero_division=0), rel=1e-12)


def test_all_positive_label_has_ap_but_no_auroc():
    y, p = _case(6, 30, 3)
    y[:, 0] = 1
    got, msg = _one_warning(compute_multilabel_metrics, y, p)
    assert math.isnan(got['per_class'][0]['auroc']) and got['per_class'][0]['ap'] == pytest.approx(1.0)
    assert got['map'] == pytest.approx(np.mean([r['ap'] for r in got['per_class']]), rel=1e-12)
    assert 'and map' not in msg


def test_all_labels_undefined_gives_nan_macro():
    p = np.random.default_rng(0).random((6, 3))
    got, msg = _one_warning(compute_multilabel_metrics, np.zeros((6, 3)), p)
    assert math.isnan(got['roc_auc']) and math.isnan(got['map'])
    assert math.isnan(got['odir_auc']) and math.isnan(got['odir_final'])
    assert got['hamming'] == pytest.approx(np.mean(p > 0.5))
    assert 'macro roc_auc and map are NaN' in msg and 'odir' in msg


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_non_finite_probabilities_give_nan_and_one_warning(bad):
    y, p = _case(7, 20, 3)
    p[3, 1] = bad
    got, msg = _one_warning(compute_multilabel_metrics, y, p, [0.5, 0.5, 0.5])
    assert 'non-finite' in msg and '1 of 20' in msg
    assert all(math.isnan(got[c]) for c in MULTILABEL_COLUMNS[1:])
    assert [r['support'] for r in got['per_class']] == y.sum(0).tolist()
    out, msg = _one_warning(odir_score, y, p)
    assert all(math.isnan(v) for v in out.values())
    thr, msg = _one_warning(tune_thresholds_f1, y, p)
    assert thr[1] == 0.5 and "1 ('1')" in msg


@pytest.mark.parametrize('y,p', [(np.zeros((0, 3)), np.zeros((0, 3))), (np.zeros((4, 0)), np.zeros((4, 0)))])
def test_empty_input(y, p):
    got, _ = _one_warning(compute_multilabel_metrics, y, p)
    assert all(math.isnan(got[c]) for c in MULTILABEL_COLUMNS[1:])


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match='shape'):
        compute_multilabel_metrics(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match='0/1'):
        compute_multilabel_metrics(np.full((3, 2), 2), np.zeros((3, 2)))
    with pytest.raises(ValueError, match='thresholds'):
        compute_multilabel_metrics(np.zeros((3, 2)), np.zeros((3, 2)), 5)     # e.g. num_classes passed positionally
    with pytest.raises(ValueError, match='class names'):
        compute_multilabel_metrics(np.zeros((3, 2)), np.zeros((3, 2)), class_names=['a'])


# ---------------------------------------------------------------------------------------------------
# threshold tuning

def _f1(y, pred):
    return skm.f1_score(y, pred, zero_division=0)


def test_tuning_finds_known_optimum():
    # positives at .30 .35 .40 .45, negatives at .10 .15 .20 .60: at 0.5 F1 = 0; any t in [.20, .30)
    # predicts the 4 positives + the .60 negative -> F1 = 8/9, the unique best; the middle of the gap is .25.
    p = np.array([0.30, 0.35, 0.40, 0.45, 0.10, 0.15, 0.20, 0.60])[:, None]
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])[:, None]
    thr = _quiet(tune_thresholds_f1, y, p)
    assert thr[0] == pytest.approx(0.25)
    assert _f1(y[:, 0], p[:, 0] > thr[0]) == pytest.approx(8 / 9)
    # on a grid the best grid point in the gap closest to 0.5 wins
    assert tune_thresholds_f1(y, p, grid=np.linspace(0.05, 0.95, 19))[0] == pytest.approx(0.25)


def test_ties_go_to_the_threshold_closest_to_half():
    p = np.array([[0.1], [0.2], [0.7], [0.8]])
    y = np.array([[0], [0], [1], [1]])                           # perfect for every t in [.2, .7): keep 0.5
    assert _quiet(tune_thresholds_f1, y, p)[0] == 0.5
    p2 = np.array([[0.1], [0.2], [0.3], [0.4]])                  # perfect for t in [.2, .3): .25 beats .2x
    assert tune_thresholds_f1(np.array([[0], [0], [1], [1]]), p2)[0] == pytest.approx(0.25)


@pytest.mark.parametrize('seed', range(6))
def test_tuning_is_optimal_and_never_worse_than_half(seed):
    y, p = _case(seed, 80, 5, signal=0.6, rate=0.2)
    p = np.round(p, 2)                                           # ties between probabilities
    y[:, 4] = 0                                                  # no positive: stays 0.5
    thr = _quiet(tune_thresholds_f1, y, p)
    assert thr[4] == 0.5
    grid = np.linspace(-0.0025, 1.0025, 403)                     # brute force: every 0.01 gap is hit
    for c in range(4):
        tuned = _f1(y[:, c], p[:, c] > thr[c])
        assert tuned >= _f1(y[:, c], p[:, c] > 0.5) - 1e-12
        pred = p[:, c][None, :] > grid[:, None]                  # [thresholds, N]
        tp = (pred & (y[:, c] == 1)).sum(1)
        brute = np.max(2 * tp / (y[:, c].sum() + pred.sum(1)))
        assert tuned == pytest.approx(brute, abs=1e-12)
    got, _ = _one_warning(compute_multilabel_metrics, y, p, thr)            # label 4 has no AUROC
    assert got['f1_macro_tuned'] >= got['f1_macro'] - 1e-12


def test_tuning_bad_grid():
    with pytest.raises(ValueError, match='grid'):
        tune_thresholds_f1(np.ones((2, 1)), np.ones((2, 1)), grid=[np.nan])
