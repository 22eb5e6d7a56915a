"""util.metrics.calibration (ECE, Brier, temperature scaling, referral curve) against their definitions worked
by hand, engine.evaluate with a temperature, and the --calibrate step of util/training.py."""
from __future__ import annotations

import json
import math

import numpy as np
import paddle
import pytest

import engine_finetune as engine
from util.metrics.calibration import (
    apply_temperature,
    apply_temperature_to_thresholds,
    calibration_summary,
    fit_temperature,
    negative_log_likelihood,
    referral_curve,
)


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# ---------------------------------------------------------------------------------------------------
# ECE and Brier, worked by hand


def test_single_label_ece_brier_and_bins_by_hand():
    p = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.85, 0.1, 0.05]])
    y = np.array([0, 1, 1, 0, 1])
    # top-class confidence / right?: 0.9 yes, 0.6 no, 0.7 yes, 0.4 no, 0.85 no; five bins of width 0.2:
    # (0.2, 0.4]: {0.4 wrong}  (0.4, 0.6]: {0.6 wrong}  (0.6, 0.8]: {0.7 right}  (0.8, 1]: {0.9 right, 0.85 wrong}
    ece = (1 / 5) * abs(0 - 0.4) + (1 / 5) * abs(0 - 0.6) + (1 / 5) * abs(1 - 0.7) + (2 / 5) * abs(0.5 - 0.875)
    brier = ((0.1 ** 2 + 0.05 ** 2 + 0.05 ** 2) + (0.6 ** 2 + 0.7 ** 2 + 0.1 ** 2) + (0.2 ** 2 + 0.3 ** 2 + 0.1 ** 2)
             + (0.7 ** 2 + 0.3 ** 2 + 0.4 ** 2) + (0.85 ** 2 + 0.9 ** 2 + 0.05 ** 2)) / 5
    got = calibration_summary(y, p, "single_label", n_bins=5)
    assert got["ece"] == pytest.approx(ece, abs=1e-12) and ece == pytest.approx(0.41)
    assert got["brier"] == pytest.approx(brier, abs=1e-12) and brier == pytest.approx(0.658)
    assert [b["count"] for b in got["bins"]] == [0, 1, 1, 1, 2]
    assert [b["lo"] for b in got["bins"]] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    top = got["bins"][4]
    assert top["confidence"] == pytest.approx(0.875) and top["accuracy"] == pytest.approx(0.5)
    assert math.isnan(got["bins"][0]["confidence"]) and math.isnan(got["bins"][0]["accuracy"])


def test_multi_label_ece_and_brier_count_every_entry():
    p = np.array([[0.9, 0.2], [0.3, 0.7]])
    y = np.array([[1, 0], [1, 1]])
    # entries (p, y): (0.9, 1) (0.2, 0) (0.3, 1) (0.7, 1); bins (0, 0.5] and (0.5, 1]
    ece = 0.5 * abs(0.5 - 0.25) + 0.5 * abs(1.0 - 0.8)
    brier = (0.1 ** 2 + 0.2 ** 2 + 0.7 ** 2 + 0.3 ** 2) / 4
    got = calibration_summary(y, p, "multi_label", n_bins=2)
    assert got["ece"] == pytest.approx(ece, abs=1e-12) and got["brier"] == pytest.approx(brier, abs=1e-12)
    assert [b["count"] for b in got["bins"]] == [2, 2]


def test_regression_has_no_calibration_and_its_outputs_are_left_alone():
    out = np.array([[0.2], [3.7]])
    assert calibration_summary(np.array([0, 4]), out, "regression") == {}
    assert apply_temperature(out, 2.0, "regression") is out


# ---------------------------------------------------------------------------------------------------
# temperature scaling


def _overconfident(task, n=4000, k=4, factor=3.0, seed=0):
    """Labels drawn from a calibrated model (logits z), outputs of a model whose logits are factor * z."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, k))
    if task == "single_label":
        true_p = _softmax(z)
        y = (rng.random(n)[:, None] > np.cumsum(true_p, axis=1)).sum(axis=1)
        return y, _softmax(factor * z)
    y = (rng.random((n, k)) < _sigmoid(z)).astype(np.int64)
    return y, _sigmoid(factor * z)


@pytest.mark.parametrize("task", ["single_label", "multi_label"])
def test_fitted_temperature_recovers_the_overconfidence_and_lowers_ece_and_nll(task):
    y, p = _overconfident(task)
    t = fit_temperature(y, p, task)
    assert t == pytest.approx(3.0, rel=0.08)
    calibrated = apply_temperature(p, t, task)
    before, after = calibration_summary(y, p, task)["ece"], calibration_summary(y, calibrated, task)["ece"]
    assert after < before / 3
    assert negative_log_likelihood(y, calibrated, task) < negative_log_likelihood(y, p, task)
    # the fit is the NLL minimum: a little either side is worse
    for other in (t * 0.9, t * 1.1):
        assert negative_log_likelihood(y, apply_temperature(p, other, task), task) > \
            negative_log_likelihood(y, calibrated, task)


def test_perfectly_separated_validation_outputs_warn_that_the_fit_hit_the_range():
    from util.metrics.common import MetricWarning

    y = np.array([0, 1, 0, 1])
    p = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])  # every case right: sharper is always better
    with pytest.warns(MetricWarning, match="edge of the search range"):
        t = fit_temperature(y, p, "single_label")
    assert t == pytest.approx(0.01, rel=0.01)


def test_apply_temperature_divides_the_logits():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, size=(50, 5))
    np.testing.assert_allclose(apply_temperature(_softmax(z), 2.5, "single_label"), _softmax(z / 2.5), atol=1e-12)
    np.testing.assert_allclose(apply_temperature(_sigmoid(z), 2.5, "multi_label"), _sigmoid(z / 2.5), atol=1e-12)
    p = _softmax(z)
    assert apply_temperature(p, 1.0, "single_label") is p
    # a float32 sigmoid saturated at exactly 1 or 0 still gets a finite, softened probability
    soft = apply_temperature(np.array([[1.0, 0.0]]), 3.0, "multi_label")
    assert np.isfinite(soft).all() and 0.99 < soft[0, 0] < 1.0 and 0.0 < soft[0, 1] < 0.01
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(p, 0.0, "single_label")


def test_thresholds_move_with_the_probabilities_so_decisions_stay():
    rng = np.random.default_rng(2)
    p = rng.random((500, 4))
    t = np.array([0.2, 0.35, 0.5, 0.8])
    for temperature in (0.4, 2.0, 3.5):
        moved = apply_temperature_to_thresholds(t, temperature, "multi_label")
        assert np.array_equal(apply_temperature(p, temperature, "multi_label") > moved, p > t)
        assert moved[2] == pytest.approx(0.5)  # logit 0 is a fixed point
    assert apply_temperature_to_thresholds([0.5, 1.5], 2.0, "regression") == [0.5, 1.5]
    assert apply_temperature_to_thresholds(None, 2.0, "multi_label") is None


# ---------------------------------------------------------------------------------------------------
# referral curve


def test_referring_the_least_confident_cases_raises_accuracy():
    # ten cases; the four least confident (0.4, 0.45, 0.5, 0.55) are the wrong ones
    conf = np.array([0.95, 0.4, 0.9, 0.45, 0.85, 0.8, 0.5, 0.75, 0.55, 0.7])
    right = conf > 0.6
    p = np.stack([conf, (1 - conf) / 2, (1 - conf) / 2], axis=1)  # class 0 predicted with confidence conf
    y = np.where(right, 0, 1)
    got = referral_curve(y, p, "single_label", 3, fractions=[0.0, 0.2, 0.4])
    assert got["metric_name"] == "accuracy" and got["kept"] == [10, 8, 6]
    assert got["metric"] == pytest.approx([6 / 10, 6 / 8, 6 / 6])


def test_referral_regression_refers_outputs_near_a_cut_and_multilabel_near_the_threshold():
    y = np.array([0, 1, 2, 1])
    out = np.array([[0.1], [1.45], [2.0], [0.52]])  # grades at the cuts 0.5, 1.5: all right
    got = referral_curve(y, out, "regression", 3, fractions=[0.0, 0.25, 0.5])
    # nearest-cut distances: 0.4, 0.05, 0.5, 0.02 -> refer case 3, then case 1
    assert got["kept"] == [4, 3, 2] and got["metric"] == pytest.approx([1.0, 1.0, 1.0])
    out[3, 0] = 0.48  # now wrong (grade 0) and still the nearest a cut
    assert referral_curve(y, out, "regression", 3, fractions=[0.0, 0.25])["metric"] == pytest.approx([0.75, 1.0])
    yl = np.array([[1, 0], [0, 1], [1, 1]])
    pl = np.array([[0.9, 0.1], [0.55, 0.45], [0.8, 0.9]])  # case 1: both labels wrong and close to 0.5
    got = referral_curve(yl, pl, "multi_label", 2, fractions=[0.0, 0.4])
    # all three: label 0 F1 2*2 / (2*2 + 1) = 0.8, label 1 F1 2*1 / (2*1 + 1); case 1 referred: both 1
    assert got["metric_name"] == "f1_macro" and got["kept"] == [3, 2]
    assert got["metric"] == pytest.approx([(0.8 + 2 / 3) / 2, 1.0])


# ---------------------------------------------------------------------------------------------------
# engine.evaluate(temperature=...)


class _Logits(paddle.nn.Layer):
    """The model's logits are its input (so the test chooses them)."""

    def forward(self, x):
        return x


def _loader(z, y, batch=16):
    return [(paddle.to_tensor(z[i:i + batch].astype(np.float32)), paddle.to_tensor(y[i:i + batch]))
            for i in range(0, len(z), batch)]


def test_evaluate_with_temperature_scores_the_calibrated_single_label_model():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 4, size=(40, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=40).astype(np.int64)
    task = engine.get_task("single_label")
    plain, _, out_plain = engine.evaluate(_Logits(), _loader(z, y), task, 3)
    stats, _, out = engine.evaluate(_Logits(), _loader(z, y), task, 3, temperature=2.0)
    np.testing.assert_allclose(out, _softmax(z.astype(np.float64) / 2.0), atol=1e-6)
    np.testing.assert_allclose(out_plain, _softmax(z.astype(np.float64)), atol=1e-6)
    log_p = np.log(_softmax(z.astype(np.float64) / 2.0))
    assert stats["val_loss"] == pytest.approx(-log_p[np.arange(40), y].mean(), abs=1e-5)  # CE of logits / T
    assert stats["accuracy"] == plain["accuracy"] and stats["kappa"] == plain["kappa"]
    # regression: a temperature does not apply and changes nothing
    g = rng.normal(2, 1, size=(40, 1)).astype(np.float32)
    grades = rng.integers(0, 5, size=40).astype(np.float32)
    reg = engine.get_task("regression")
    a, _, oa = engine.evaluate(_Logits(), _loader(g, grades), reg, 5)
    b, _, ob = engine.evaluate(_Logits(), _loader(g, grades), reg, 5, temperature=2.0)
    assert np.array_equal(oa, ob) and a["val_loss"] == b["val_loss"] and a["kappa_quadratic"] == b["kappa_quadratic"]


def test_evaluate_with_temperature_keeps_multilabel_decisions_at_the_tuned_thresholds():
    rng = np.random.default_rng(4)
    z = rng.normal(0, 3, size=(64, 4)).astype(np.float32)
    y = (rng.random((64, 4)) < 0.4).astype(np.float32)
    task = engine.get_task("multi_label")
    thresholds = [0.3, 0.45, 0.6, 0.7]  # as tuned on the uncalibrated validation outputs
    plain, _, out_plain = engine.evaluate(_Logits(), _loader(z, y), task, 4, thresholds=thresholds)
    stats, _, out = engine.evaluate(_Logits(), _loader(z, y), task, 4, thresholds=thresholds, temperature=2.5)
    np.testing.assert_allclose(out, _sigmoid(z.astype(np.float64) / 2.5), atol=1e-6)
    moved = _sigmoid(np.log(np.array(thresholds) / (1 - np.array(thresholds))) / 2.5)
    assert stats["thresholds"] == pytest.approx(moved.tolist(), abs=1e-12)
    assert np.array_equal(task.predict(out, 4, stats["thresholds"]), task.predict(out_plain, 4, thresholds))
    assert np.array_equal(task.predict(out, 4, None), task.predict(out_plain, 4, None))
    for key in ("f1_macro", "f1_macro_tuned", "f1_micro_tuned", "roc_auc", "map", "odir_final"):
        assert stats[key] == pytest.approx(plain[key], abs=1e-9), key
    assert stats["val_loss"] != plain["val_loss"]


# ---------------------------------------------------------------------------------------------------
# --calibrate in util/training.py


def test_calibrate_on_val_fits_and_reports_one_line():
    from util.training import calibrate_on_val

    y, p = _overconfident("single_label", n=600, k=3, seed=5)
    z = np.log(p)  # logits of the over-confident model (up to a per-row constant)
    lines = []
    got = calibrate_on_val(_Logits(), _loader(z, y, 128), engine.get_task("single_label"), 3, None, None,
                           eval_loss=None, amp=None, print_freq=100, say=lines.append)
    assert got["temperature"] == pytest.approx(3.0, rel=0.2)
    assert got["nll"][1] < got["nll"][0] and got["ece"][1] < got["ece"][0]
    assert lines == [f"calibration: temperature {got['temperature']:.4g} fitted on val (NLL {got['nll'][0]:.4f} -> "
                     f"{got['nll'][1]:.4f}, ECE {got['ece'][0]:.4f} -> {got['ece'][1]:.4f})"]
    lines.clear()
    assert calibrate_on_val(None, None, engine.get_task("regression"), 5, None, None, eval_loss=None, amp=None,
                            print_freq=100, say=lines.append) is None
    assert len(lines) == 1 and "does not apply to regression" in lines[0] and "skipped" in lines[0]


def test_store_temperature_rewrites_the_best_checkpoint_and_thresholds_json(tmp_path):
    from models import create_model
    from util.outputs.checkpoint import load_checkpoint, save_checkpoint
    from util.outputs.reports import save_thresholds_json
    from util.training import store_temperature

    paddle.seed(0)
    model = create_model("resnet_test", num_classes=2, input_size=32)
    best, record = str(tmp_path / "checkpoint-best.pdparams"), str(tmp_path / "thresholds.json")
    save_checkpoint(best, model=model, epoch=3, best_score=0.7, meta={"model": "resnet_test"},
                    extra={"thresholds": [0.3, 0.6]})
    save_thresholds_json(record, "multi_label", ["a", "b"], [0.3, 0.6], "tuned on the validation split at epoch 3")
    before = load_checkpoint(best)
    store_temperature(before, model, best, record, engine.get_task("multi_label"), 2.0)
    after = load_checkpoint(best)
    assert after["temperature"] == 2.0 and after["thresholds"] == [0.3, 0.6] and after["epoch"] == 3
    assert sorted(after["model"]) == sorted(before["model"])
    assert all(np.array_equal(after["model"][k], before["model"][k]) for k in before["model"])
    assert paddle.load(best)["temperature"] == 2.0  # still a plain Paddle checkpoint
    saved = json.loads(open(record, encoding="utf8").read())
    assert saved["thresholds"] == [0.3, 0.6] and saved["temperature"] == 2.0
    assert saved["thresholds_calibrated"] == pytest.approx(
        list(apply_temperature_to_thresholds([0.3, 0.6], 2.0, "multi_label")))
