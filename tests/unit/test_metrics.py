"""util.metrics against scikit-learn called directly the way the RETFound reference evaluate() calls it,
and its behaviour on degenerate inputs (NaN + exactly one warning, never an exception)."""
import math
import os
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from util.metrics import (
    METRIC_COLUMNS,
    MetricWarning,
    compute_metrics,
    confusion_matrix,
    per_class_report,
    selection_value,
)
from util.outputs.plots import save_confusion_matrix_png


def _reference_metrics(y_true, probs):
    """The reference evaluate(): one-hots of labels and argmax predictions fed to scikit-learn."""
    k = probs.shape[1]
    y_pred = probs.argmax(1)
    t_oh, p_oh = np.eye(k)[y_true], np.eye(k)[y_pred]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref = {
            'accuracy': skm.accuracy_score(y_true, y_pred),
            'hamming': skm.hamming_loss(t_oh, p_oh),
            'jaccard': skm.jaccard_score(t_oh, p_oh, average='macro'),
            'average_precision': skm.average_precision_score(t_oh, probs, average='macro'),
            'kappa': skm.cohen_kappa_score(y_true, y_pred),
            'f1': skm.f1_score(t_oh, p_oh, zero_division=0, average='macro'),
            'roc_auc': skm.roc_auc_score(t_oh, probs, multi_class='ovr', average='macro'),
            'precision': skm.precision_score(t_oh, p_oh, zero_division=0, average='macro'),
            'recall': skm.recall_score(t_oh, p_oh, zero_division=0, average='macro'),
            'kappa_quadratic': skm.cohen_kappa_score(y_true, y_pred, weights='quadratic',
                                                     labels=np.arange(k)),
        }
    ref['score'] = (ref['f1'] + ref['roc_auc'] + ref['kappa']) / 3
    return ref


def _random_case(seed, n, k, signal=1.5):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])  # every class present
    rng.shuffle(y)
    logits = rng.normal(size=(n, k)) + signal * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


def _no_metric_warning(fn, *a, **kw):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        out = fn(*a, **kw)
    assert not [w for w in rec if issubclass(w.category, MetricWarning)], [str(w.message) for w in rec]
    assert not rec, [str(w.message) for w in rec]  # scikit-learn's warnings are not leaked either
    return out


@pytest.mark.parametrize('seed,n,k', [(0, 50, 5), (1, 200, 5), (2, 37, 3), (3, 300, 39), (4, 80, 2),
                                      (5, 120, 4)])
def test_matches_sklearn_reference(seed, n, k):
    y, probs = _random_case(seed, n, k)
    got = _no_metric_warning(compute_metrics, y, probs)
    ref = _reference_metrics(y, probs)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert set(METRIC_COLUMNS) - {'val_loss'} <= set(got)
    assert all(isinstance(got[c], float) for c in METRIC_COLUMNS if c != 'val_loss')
    # per-class AUROC is the one-vs-rest binary AUROC
    for c in range(k):
        assert got['per_class_auroc'][c] == pytest.approx(
            skm.roc_auc_score(y == c, probs[:, c]), rel=1e-12)
    assert got['undefined_classes'] == [] and got['notes'] == []


def test_metric_columns_order():
    assert METRIC_COLUMNS[:10] == ['val_loss', 'accuracy', 'f1', 'roc_auc', 'hamming', 'jaccard',
                                   'precision', 'recall', 'average_precision', 'kappa']
    assert METRIC_COLUMNS[10:] == ['kappa_quadratic', 'score']


def test_quadratic_kappa_uses_full_label_range():
    # grade 2 absent: the distance 1 -> 3 must count as 2 grades, not as neighbouring indices.
    y = np.array([0, 1, 3, 4, 1, 3, 0, 4])
    pred = np.array([0, 3, 1, 4, 1, 3, 0, 4])
    probs = np.eye(5)[pred] * 0.9 + 0.02
    with pytest.warns(MetricWarning):                       # class 2 has no AUROC
        got = compute_metrics(y, probs)
    assert got['kappa_quadratic'] == pytest.approx(
        skm.cohen_kappa_score(y, pred, weights='quadratic', labels=np.arange(5)), rel=1e-12)
    assert got['kappa_quadratic'] != pytest.approx(skm.cohen_kappa_score(y, pred, weights='quadratic'))


def test_class_absent_from_y_true_gives_nan_and_one_warning():
    rng = np.random.default_rng(0)
    y = rng.choice([0, 1, 3], size=60)                      # class 2 of 4 never occurs
    probs = rng.dirichlet(np.ones(4), size=60)
    # What the reference does here depends on the scikit-learn version: < 1.6 raises ValueError,
    # newer versions warn and return NaN for the class and the macro.
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try:
            sk_per_class = skm.roc_auc_score(np.eye(4)[y], probs, average=None)
        except ValueError:
            sk_per_class = None
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        got = compute_metrics(y, probs, class_names=['a', 'b', 'glaucoma', 'd'])
    assert len(rec) == 1 and issubclass(rec[0].category, MetricWarning)
    assert "2 ('glaucoma')" in str(rec[0].message)
    assert math.isnan(got['roc_auc']) and math.isnan(got['average_precision']) and math.isnan(got['score'])
    assert got['undefined_classes'] == [2]
    assert math.isnan(got['per_class_auroc'][2]) and math.isnan(got['per_class_ap'][2])
    if sk_per_class is not None:
        np.testing.assert_allclose(got['per_class_auroc'], sk_per_class, rtol=1e-12)
    for c in (0, 1, 3):
        assert got['per_class_auroc'][c] == pytest.approx(skm.roc_auc_score(y == c, probs[:, c]))
        assert got['per_class_ap'][c] == pytest.approx(skm.average_precision_score(y == c, probs[:, c]))
    ref = _reference_metrics_without_auc(y, probs)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert selection_value(got['score']) == -math.inf


def _reference_metrics_without_auc(y, probs):
    k = probs.shape[1]
    pred = probs.argmax(1)
    t_oh, p_oh = np.eye(k)[y], np.eye(k)[pred]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return {'accuracy': skm.accuracy_score(y, pred), 'hamming': skm.hamming_loss(t_oh, p_oh),
                'jaccard': skm.jaccard_score(t_oh, p_oh, average='macro'),
                'kappa': skm.cohen_kappa_score(y, pred),
                'f1': skm.f1_score(t_oh, p_oh, zero_division=0, average='macro'),
                'precision': skm.precision_score(t_oh, p_oh, zero_division=0, average='macro'),
                'recall': skm.recall_score(t_oh, p_oh, zero_division=0, average='macro')}


def test_single_class_in_y_true():
    probs = np.random.default_rng(1).dirichlet(np.ones(3), size=10)
    y = np.full(10, 1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        got = compute_metrics(y, probs)
    assert len(rec) == 1
    assert got['undefined_classes'] == [0, 1, 2]
    assert math.isnan(got['roc_auc']) and math.isnan(got['score'])
    # AP of the all-positive class is defined (1.0 precision everywhere), the others are not
    assert got['per_class_ap'][1] == pytest.approx(1.0)
    assert math.isnan(got['per_class_ap'][0])
    assert got['accuracy'] == pytest.approx(np.mean(probs.argmax(1) == 1))


def test_all_predictions_one_class():
    rng = np.random.default_rng(2)
    y = np.concatenate([np.arange(4), rng.integers(0, 4, 36)])
    probs = rng.dirichlet(np.ones(4), size=40) * 0.5
    probs[:, 2] += 0.5                                      # argmax is always class 2
    got = _no_metric_warning(compute_metrics, y, probs)
    ref = _reference_metrics(y, probs)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert got['kappa'] == 0.0


def test_two_classes():
    y, probs = _random_case(7, 60, 2)
    got = _no_metric_warning(compute_metrics, y, probs)
    assert got['roc_auc'] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]), rel=1e-12)
    assert got['per_class_auroc'][0] == pytest.approx(got['per_class_auroc'][1], rel=1e-12)


def test_perfect_single_class_agreement_kappa_nan():
    # labels and predictions all the same class: kappa is 0/0
    y = np.zeros(5, dtype=int)
    probs = np.tile([0.9, 0.1], (5, 1))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        got = compute_metrics(y, probs)
    assert len(rec) == 1 and 'kappa' in str(rec[0].message)
    assert math.isnan(got['kappa']) and got['accuracy'] == 1.0


@pytest.mark.parametrize('y,probs', [(np.zeros(0, int), np.zeros((0, 5))), (np.zeros(4, int), np.ones((4, 1))),
                                     ([], [])])
def test_empty_or_one_class_input_is_nan(y, probs):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        got = compute_metrics(y, probs)
    assert len(rec) == 1 and issubclass(rec[0].category, MetricWarning)
    assert all(math.isnan(got[c]) for c in METRIC_COLUMNS if c != 'val_loss')


def test_non_finite_probabilities():
    y, probs = _random_case(3, 30, 3)
    probs[4] = np.nan
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        got = compute_metrics(y, probs)
    assert len(rec) == 1 and 'non-finite' in str(rec[0].message)
    assert math.isnan(got['roc_auc']) and math.isnan(got['score'])
    assert not math.isnan(got['accuracy'])


def test_bad_shapes_raise_value_error():
    with pytest.raises(ValueError):
        compute_metrics([0, 1], np.ones((3, 2)))
    with pytest.raises(ValueError):
        compute_metrics([0, 5], np.ones((2, 3)))
    with pytest.raises(ValueError):
        compute_metrics([0, 1], np.ones((2, 3)), num_classes=4)


def test_selection_value():
    assert selection_value(0.5) == 0.5
    assert selection_value(float('nan')) < selection_value(-1e9)


def test_confusion_matrix_matches_sklearn():
    rng = np.random.default_rng(4)
    y, p = rng.integers(0, 6, 100), rng.integers(0, 6, 100)
    y[y == 5] = 4                                           # class 5 absent from y_true
    cm = confusion_matrix(y, p, 6)
    assert cm.dtype == np.int64 and cm.shape == (6, 6)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y, p, labels=np.arange(6)))
    with pytest.raises(ValueError):
        confusion_matrix([0, 6], [0, 1], 6)


def test_per_class_report():
    y, p = np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0])
    rep = per_class_report(y, p, 4)
    assert rep['precision'] == pytest.approx([0.5, 0.5, 1.0, 0.0])
    assert rep['recall'] == pytest.approx([0.5, 1.0, 0.5, 0.0])
    assert rep['support'] == [2, 1, 2, 0]


@pytest.mark.parametrize('k', [3, 39])
def test_save_confusion_matrix_png(tmp_path, k):
    from PIL import Image
    rng = np.random.default_rng(k)
    cm = confusion_matrix(rng.integers(0, k, 400), rng.integers(0, k, 400), k)
    cm[0] = 0                                               # an empty row must not warn or crash
    path = str(tmp_path / 'sub' / 'cm.png')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        out = save_confusion_matrix_png(cm, [f'class_{i}' for i in range(k)], path, title='test')
    assert out == path and os.path.getsize(path) > 1000
    with Image.open(path) as img:
        assert img.format == 'PNG' and min(img.size) >= 400
    assert [f for f in os.listdir(tmp_path / 'sub')] == ['cm.png']   # no temp file left behind
