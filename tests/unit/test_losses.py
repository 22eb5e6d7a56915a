"""util.losses against PyTorch / torchvision numbers (tests/fixtures/loss_reference.npz, written by
tools/make_loss_fixture.py), plus gradient sanity at extreme logits, the registry's errors and the
weight helpers."""
import math
import os
import warnings

import numpy as np
import paddle
import pytest

from helpers import FIXTURES
from util.errors import UserError
from util.losses import (
    AUTO_LOSS,
    LOSSES,
    LossWarning,
    build_loss,
    class_weights_from_labels,
    loss_names,
    pos_weight_from_labels,
    soft_cross_entropy,
)

REF = np.load(os.path.join(FIXTURES, 'loss_reference.npz'))
RTOL, ATOL = 1e-5, 1e-6


def _run(loss, logits, target, grad=False):
    x = paddle.to_tensor(logits, stop_gradient=not grad)
    out = loss(x, paddle.to_tensor(target))
    if grad:
        out.backward()
        return out.numpy(), x.grad.numpy()
    return out.numpy()


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('weighted', [False, True])
@pytest.mark.parametrize('s', [0.0, 0.1])
def test_cross_entropy_matches_torch(weighted, s):
    tag = f"ce_{'weight' if weighted else 'noweight'}_s{int(s * 10)}"
    w = REF['ce_weight'] if weighted else None
    for red in ('mean', 'none', 'sum'):
        got = _run(build_loss('single_label', 'ce', reduction=red, smoothing=s, class_weights=w),
                   REF['ce_logits'], REF['ce_target'])
        assert got.shape == REF[f"{tag}_{red}"].shape
        _close(got, REF[f"{tag}_{red}"])
    _, g = _run(build_loss('single_label', smoothing=s, class_weights=w), REF['ce_logits'], REF['ce_target'],
                grad=True)
    _close(g, REF[f"{tag}_grad"])


def test_weighted_mean_is_not_plain_mean():
    # guards the fixture comparison: the weighted mean divides by the targets' summed weights
    w = REF['ce_weight']
    mean = _run(build_loss('single_label', class_weights=w), REF['ce_logits'], REF['ce_target'])
    none = _run(build_loss('single_label', class_weights=w, reduction='none'), REF['ce_logits'], REF['ce_target'])
    assert not np.isclose(mean, none.mean(), rtol=1e-3)
    _close(mean, none.sum() / w[REF['ce_target']].sum())


def test_soft_cross_entropy_keeps_engine_semantics():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 4)).astype(np.float32) * 2
    target = rng.integers(0, 4, 7)
    for s in (0.0, 0.1, 0.3):
        x, t = paddle.to_tensor(logits), paddle.to_tensor(target)
        logp = np.log(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
        nll = -logp[np.arange(7), target]
        want = ((1 - s) * nll - s * logp.mean(1)).mean()     # timm LabelSmoothingCrossEntropy
        _close(soft_cross_entropy(x, t, s).numpy(), want)
        _close(build_loss('single_label', 'ce', smoothing=s)(x, t).numpy(), want)


@pytest.mark.parametrize('tname', ['hard', 'soft'])
@pytest.mark.parametrize('with_pw', [False, True])
def test_bce_matches_torch(tname, with_pw):
    tag = f"bce_{tname}_{'pw' if with_pw else 'nopw'}"
    pw = REF['pos_weight'] if with_pw else None
    target = REF['ml_target'] if tname == 'hard' else REF['ml_soft']
    none = _run(build_loss('multi_label', 'bce', reduction='none', pos_weight=pw), REF['ml_logits'], target)
    assert none.shape == (target.shape[0],)
    _close(none, REF[f"{tag}_none"].mean(axis=1))            # per sample = mean over labels
    mean, g = _run(build_loss('multi_label', 'auto', pos_weight=pw), REF['ml_logits'], target, grad=True)
    _close(mean, REF[f"{tag}_mean"])
    _close(g, REF[f"{tag}_grad"])


@pytest.mark.parametrize('tname', ['hard', 'soft'])
@pytest.mark.parametrize('i', range(5))
def test_focal_matches_torchvision(tname, i):
    alpha, gamma = REF['focal_params'][i]
    target = REF['ml_target'] if tname == 'hard' else REF['ml_soft']
    tag = f"focal_{tname}_{i}"
    loss = build_loss('multi_label', 'focal', focal_alpha=alpha, focal_gamma=gamma)
    mean, g = _run(loss, REF['ml_logits'], target, grad=True)
    _close(mean, REF[f"{tag}_mean"])
    _close(_run(build_loss('multi_label', 'focal', reduction='none', focal_alpha=alpha, focal_gamma=gamma),
                REF['ml_logits'], target), REF[f"{tag}_none"].mean(axis=1))
    if f"{tag}_grad" in REF:
        _close(g, REF[f"{tag}_grad"])
    assert np.isfinite(g).all()


@pytest.mark.parametrize('tname', ['hard', 'soft'])
def test_hybrid_matches_torch(tname):
    target = REF['ml_target'] if tname == 'hard' else REF['ml_soft']
    loss = build_loss('multi_label', 'hybrid', pos_weight=REF['pos_weight'])   # seed defaults alpha 0.3, gamma 2.5
    assert (loss.alpha, loss.gamma) == (0.3, 2.5)
    mean, g = _run(loss, REF['ml_logits'], target, grad=True)
    _close(mean, REF[f"hybrid_{tname}_mean"])
    _close(g, REF[f"hybrid_{tname}_grad"])
    _close(_run(build_loss('multi_label', 'hybrid', reduction='none', pos_weight=REF['pos_weight']),
                REF['ml_logits'], target), REF[f"hybrid_{tname}_none"].mean(axis=1))


def test_focal_defaults():
    f = build_loss('multi_label', 'focal')
    assert (f.alpha, f.gamma) == (0.25, 2.0)
    h = build_loss('multi_label', 'hybrid', focal_alpha=0.25, focal_gamma=2.0)
    assert (h.alpha, h.gamma) == (0.25, 2.0)


@pytest.mark.parametrize('name', ['smooth_l1', 'mse'])
def test_regression_matches_torch(name):
    none = _run(build_loss('regression', name, reduction='none'), REF['reg_logits'], REF['reg_target'])
    assert none.shape == (REF['reg_target'].shape[0],)
    _close(none, REF[f"{name}_none"])
    mean, g = _run(build_loss('regression', name), REF['reg_logits'], REF['reg_target'], grad=True)
    _close(mean, REF[f"{name}_mean"])
    _close(g, REF[f"{name}_grad"])
    # logits [B] are accepted too
    _close(_run(build_loss('regression', name), REF['reg_logits'].reshape(-1), REF['reg_target']), REF[f"{name}_mean"])


def test_auto_names():
    assert AUTO_LOSS == {'single_label': 'ce', 'multi_label': 'bce', 'regression': 'smooth_l1'}
    assert type(build_loss('single_label')).__name__ == 'CrossEntropy'
    assert type(build_loss('multi_label')).__name__ == 'BCEWithLogits'
    assert type(build_loss('regression')).__name__ == 'SmoothL1'


@pytest.mark.parametrize('task,name,k', [('single_label', 'ce', 4), ('multi_label', 'bce', 4),
                                         ('multi_label', 'focal', 4), ('multi_label', 'hybrid', 4),
                                         ('regression', 'smooth_l1', 1), ('regression', 'mse', 1)])
@pytest.mark.parametrize('scale', [50.0, 200.0])
def test_finite_loss_and_grads_at_extreme_logits(task, name, k, scale):
    rng = np.random.default_rng(1)
    logits = (np.sign(rng.normal(size=(8, k))) * scale).astype(np.float32)
    if task == 'single_label':
        target = rng.integers(0, k, 8)
    elif task == 'multi_label':
        target = (rng.random((8, k)) < 0.5).astype(np.float32)
    else:
        target = rng.integers(0, 5, 8).astype(np.float32)
    kw = {'pos_weight': np.full(k, 3.0)} if name in ('bce', 'hybrid') else {}
    if name == 'ce':
        kw = {'smoothing': 0.1, 'class_weights': np.linspace(0.5, 2, k)}
    for extra in ({}, {'focal_gamma': 0.5}) if name == 'focal' else ({},):
        value, g = _run(build_loss(task, name, **kw, **extra), logits, target, grad=True)
        assert np.isfinite(value).all() and np.isfinite(g).all(), (name, extra)
        assert np.abs(g).max() > 0                             # wrong confident predictions still get a gradient


def test_amp_half_logits_are_cast_to_float32():
    x = paddle.to_tensor(np.array([[60000.0, -60000.0, 0.0]], np.float32)).astype('float16')
    out = build_loss('single_label')(x, paddle.to_tensor(np.array([1])))
    assert out.dtype == paddle.float32 and math.isfinite(float(out))
    out = build_loss('multi_label', 'hybrid')(x, paddle.to_tensor(np.array([[1.0, 1.0, 0.0]], np.float32)))
    assert out.dtype == paddle.float32 and math.isfinite(float(out))


def test_wrong_name_lists_the_task_losses():
    with pytest.raises(UserError) as e:
        build_loss('multi_label', 'ce')
    msg = str(e.value)
    assert "'ce' is a single_label loss" in msg
    for n in ('bce', 'focal', 'hybrid', 'auto'):
        assert n in msg
    with pytest.raises(UserError, match="did you mean 'smooth_l1'"):
        build_loss('regression', 'smoothl1')
    with pytest.raises(UserError, match='task'):
        build_loss('segmentation')
    assert loss_names('regression') == ['auto', 'mse', 'smooth_l1']
    assert set(LOSSES) == {'single_label', 'multi_label', 'regression'}


@pytest.mark.parametrize('kwargs,match', [
    (dict(task='multi_label', name='bce', smoothing=0.1), 'smoothing given'),
    (dict(task='single_label', name='ce', pos_weight=[1.0, 2.0]), 'pos_weight applies to'),
    (dict(task='regression', name='mse', class_weights=[1.0]), 'class_weights'),
    (dict(task='single_label', name='ce', reduction='avg'), 'reduction'),
    (dict(task='single_label', name='ce', smoothing=1.0), 'smoothing'),
    (dict(task='multi_label', name='bce', pos_weight=[1.0, -2.0]), 'non-negative'),
    (dict(task='multi_label', name='bce', pos_weight=[1.0, float('nan')]), 'finite'),
    (dict(task='multi_label', name='focal', focal_alpha=1.5), 'focal_alpha'),
    (dict(task='multi_label', name='focal', focal_gamma=-1), 'focal_gamma'),
])
def test_bad_options_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        build_loss(**kwargs)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match='pos_weight'):
        build_loss('multi_label', pos_weight=[1.0, 2.0])(paddle.zeros([2, 3]), paddle.zeros([2, 3]))
    with pytest.raises(ValueError, match=r'\[B, 1\]'):
        build_loss('regression')(paddle.zeros([2, 3]), paddle.zeros([2]))
    with pytest.raises(ValueError, match='class weights'):
        build_loss('single_label', class_weights=[1.0, 2.0])(paddle.zeros([2, 3]), paddle.to_tensor([0, 1]))
    with pytest.raises(ValueError, match=r'\[B, L\]'):
        build_loss('multi_label')(paddle.zeros([2, 3]), paddle.zeros([2, 4]))


def test_repr_names_the_options():
    r = repr(build_loss('multi_label', 'hybrid', pos_weight=[2.0, 0.5]))
    assert 'multi_label/hybrid' in r and '[2, 0.5]' in r and 'alpha=0.3' in r


def test_pos_weight_from_labels():
    Y = np.array([[1, 0, 0, 1], [0, 0, 1, 1], [0, 0, 0, 1], [1, 0, 0, 1]], dtype=np.float32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        pw = pos_weight_from_labels(Y, ['a', 'never', 'c', 'always'])
    assert pw.dtype == np.float32
    np.testing.assert_allclose(pw, [2 / 2, 1.0, 3 / 1, 1.0])
    assert len(rec) == 1 and issubclass(rec[0].category, LossWarning)
    assert "'never'" in str(rec[0].message) and "'always'" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        np.testing.assert_allclose(pos_weight_from_labels(Y[:, [0, 2]]), [1.0, 3.0])


def test_class_weights_from_labels_is_sklearn_balanced():
    from sklearn.utils.class_weight import compute_class_weight
    y = np.array([0, 0, 0, 1, 2, 2, 0, 1, 2, 2, 2])
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        w = class_weights_from_labels(y, 3)
    np.testing.assert_allclose(w, compute_class_weight('balanced', classes=np.arange(3), y=y), rtol=1e-6)
    with pytest.warns(LossWarning, match="3 \\('d'\\)"):
        w = class_weights_from_labels(y, 4, ['a', 'b', 'c', 'd'])
    np.testing.assert_allclose(w, [11 / 16, 11 / 8, 11 / 20, 0.0], rtol=1e-6)
    with pytest.raises(ValueError):
        class_weights_from_labels([0, 4], 3)
