"""util.metrics.compare and tools/compare_runs.py: DeLong's test against a hand-worked example, against
scikit-learn's AUROC and the O(n^2) structural components written out here, and against simulation (its
standard error is the spread of the AUROC difference over repeated samples); the paired bootstrap against a
direct loop with the same draws; the tool's row matching and its errors."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from helpers import ROOT
from util.metrics.compare import delong_test, midranks, paired_bootstrap, placement_values

TOOL = os.path.join(ROOT, "tools", "compare_runs.py")
_spec = importlib.util.spec_from_file_location("compare_runs", TOOL)
compare_runs = sys.modules["compare_runs"] = importlib.util.module_from_spec(_spec)  # its dataclass needs it there
_spec.loader.exec_module(compare_runs)


def _psi(s: float, t: float) -> float:
    """DeLong's kernel: 1 when the positive's score is above the negative's, 1/2 for a tie."""
    return 1.0 if s > t else 0.5 if s == t else 0.0


def _components(scores, pos):
    """Structural components by their definition (O(n^2)): V10 over the positives, V01 over the negatives."""
    p, q = np.flatnonzero(pos), np.flatnonzero(~pos)
    v10 = np.array([np.mean([_psi(scores[i], scores[j]) for j in q]) for i in p])
    v01 = np.array([np.mean([_psi(scores[i], scores[j]) for i in p]) for j in q])
    return v10, v01


def _reference_binary(y, a, b):
    """DeLong et al. 1988, as printed: S = S10 / m + S01 / n with the sample covariance matrices of the
    components, Var(A - B) = S_AA + S_BB - 2 S_AB."""
    pos = np.asarray(y) == 1
    a10, a01 = _components(a, pos)
    b10, b01 = _components(b, pos)
    s = np.cov(np.vstack([a10, b10])) / pos.sum() + np.cov(np.vstack([a01, b01])) / (~pos).sum()
    return a10.mean(), b10.mean(), s[0, 0] + s[1, 1] - 2 * s[0, 1], s[0, 0]


def _reference_macro(pos_masks, a, b, strata):
    """The macro estimate of util.metrics.compare written out with O(n^2) components: each row's influence
    mean_c (V10_c - AUC_c) / m_c (a positive of c) or (V01_c - AUC_c) / n_c, A minus B; variance
    sum_g N_g / (N_g - 1) sum (h - mean_g h)^2 over the strata g."""
    n = len(strata)
    h = np.zeros(n)
    aucs_a, aucs_b = [], []
    for c, pos in enumerate(pos_masks):
        for scores, sign, aucs in ((a[:, c], 1.0, aucs_a), (b[:, c], -1.0, aucs_b)):
            v10, v01 = _components(scores, pos)
            auc = v10.mean()
            aucs.append(auc)
            h[pos] += sign * (v10 - auc) / pos.sum() / len(pos_masks)
            h[~pos] += sign * (v01 - auc) / (~pos).sum() / len(pos_masks)
    var = 0.0
    for g in set(strata.tolist()):
        rows = h[strata == g]
        var += len(rows) / (len(rows) - 1) * np.sum((rows - rows.mean()) ** 2)
    return np.mean(aucs_a), np.mean(aucs_b), var


def test_midranks_are_scipys_average_ranks():
    rng = np.random.default_rng(0)
    for x in (np.round(rng.normal(size=40), 1), np.array([3.0, 3.0, 3.0]), np.array([2.0]), np.arange(5)[::-1]):
        assert np.array_equal(midranks(x), rankdata(x, method="average"))


def test_placement_values_are_the_structural_components_and_their_mean_the_auroc():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 50)
    s = np.round(rng.random(50) + 0.4 * y, 1)  # rounded: many ties
    v10, v01, auc = placement_values(s[y == 1], s[y == 0])
    r10, r01 = _components(s, y == 1)
    assert np.allclose(v10, r10, atol=1e-12) and np.allclose(v01, r01, atol=1e-12)
    assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-12) == pytest.approx(v01.mean(), abs=1e-12)


def test_hand_worked_binary_example():
    # A: positives 0.8 0.6 0.4, negatives 0.6 0.2 -> V10 = 1, 3/4, 1/2 (0.6 ties 0.6), V01 = 1/2, 1; AUC 3/4
    # B: positives 0.7 0.3 0.5, negatives 0.4 0.1 -> V10 = 1, 1/2, 1, V01 = 2/3, 1; AUC 5/6
    # A - B: V10 0, 1/4, -1/2 (sample variance 7/48), V01 -1/6, 0 (1/72); Var = 7/48 / 3 + 1/72 / 2 = 1/18
    # Var(AUC_A) = 1/16 / 3 + 1/8 / 2 = 1/12; z = (-1/12) / sqrt(1/18) = -sqrt(2)/4; p = erfc(1/4)
    y = np.array([1, 1, 1, 0, 0])
    a = np.array([0.8, 0.6, 0.4, 0.6, 0.2])
    b = np.array([0.7, 0.3, 0.5, 0.4, 0.1])
    d = delong_test(y, a, b)
    assert d["auc_a"] == pytest.approx(0.75, abs=1e-12) and d["auc_b"] == pytest.approx(5 / 6, abs=1e-12)
    assert d["diff"] == pytest.approx(-1 / 12, abs=1e-12)
    assert d["se"] ** 2 == pytest.approx(1 / 18, abs=1e-12) and d["se_a"] ** 2 == pytest.approx(1 / 12, abs=1e-12)
    assert d["z"] == pytest.approx(-math.sqrt(2) / 4, abs=1e-12)
    assert d["p"] == pytest.approx(math.erfc(0.25), abs=1e-12)
    half = 1.959963984540054 * math.sqrt(1 / 18)
    assert d["ci"] == pytest.approx((-1 / 12 - half, -1 / 12 + half), abs=1e-9)
    assert d["classes"] == [1] and d["left_out"] == []


def test_binary_delong_matches_the_papers_formula_on_tied_scores():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 70)
    a = np.round(rng.random(70) + 0.5 * y, 2)
    b = np.round(0.6 * a + 0.4 * rng.random(70) + 0.1 * y, 2)  # correlated with A
    d = delong_test(y, a, b)
    auc_a, auc_b, var, var_a = _reference_binary(y, a, b)
    assert d["auc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12) == pytest.approx(auc_a, abs=1e-12)
    assert d["auc_b"] == pytest.approx(roc_auc_score(y, b), abs=1e-12) == pytest.approx(auc_b, abs=1e-12)
    assert d["se"] ** 2 == pytest.approx(var, rel=1e-10) and d["se_a"] ** 2 == pytest.approx(var_a, rel=1e-10)
    z = (auc_a - auc_b) / math.sqrt(var)
    assert d["z"] == pytest.approx(z, rel=1e-10) and d["p"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-9)
    # the same as a two-column single-label problem whose columns sum to one: the macro over both classes
    two = delong_test(y, np.stack([1 - a, a], 1), np.stack([1 - b, b], 1), "single_label")
    assert two["diff"] == pytest.approx(d["diff"], abs=1e-12) and two["se"] == pytest.approx(d["se"], rel=1e-10)


def test_macro_one_vs_rest_against_sklearn_and_the_written_out_components():
    rng = np.random.default_rng(3)
    n, k = 45, 3
    y = rng.integers(0, k, n)
    z = rng.normal(size=(n, k))
    z[np.arange(n), y] += 1.0
    a = np.round(np.exp(z) / np.exp(z).sum(1, keepdims=True), 2)
    zb = z + rng.normal(0, 0.8, z.shape)
    b = np.round(np.exp(zb) / np.exp(zb).sum(1, keepdims=True), 2)
    d = delong_test(y, a, b, "single_label")
    for got, scores in ((d["auc_a"], a), (d["auc_b"], b)):  # macro one-vs-rest: the mean of the classes' AUROCs
        assert got == pytest.approx(np.mean([roc_auc_score(y == c, scores[:, c]) for c in range(k)]), abs=1e-12)
    _, _, var = _reference_macro([y == c for c in range(k)], a, b, y)
    assert d["se"] ** 2 == pytest.approx(var, rel=1e-10) and d["classes"] == [0, 1, 2]


def test_multi_label_macro_against_sklearn_and_the_written_out_components():
    rng = np.random.default_rng(4)
    n = 60
    y = (rng.random((n, 3)) < 0.4).astype(np.int64)
    y[:3, 2] = 1  # every label has positives
    a = np.round(rng.random((n, 3)) + 0.5 * y, 2)
    b = np.round(rng.random((n, 3)) + 0.3 * y, 2)
    d = delong_test(y, a, b, "multi_label", strata=np.zeros(n))  # one stratum: every row an independent draw
    assert d["auc_a"] == pytest.approx(roc_auc_score(y, a, average="macro"), abs=1e-12)
    _, _, var = _reference_macro([y[:, c] == 1 for c in range(3)], a, b, np.zeros(n))
    assert d["se"] ** 2 == pytest.approx(var, rel=1e-10)
    # a label without positives is left out of the macro average, as the toolkit's roc_auc leaves it out
    y0 = y.copy()
    y0[:, 1] = 0
    d0 = delong_test(y0, a, b, "multi_label")
    assert d0["classes"] == [0, 2] and d0["left_out"] == [1]
    assert d0["auc_a"] == pytest.approx(np.mean([roc_auc_score(y0[:, c], a[:, c]) for c in (0, 2)]), abs=1e-12)


@pytest.mark.parametrize("task", ["single_label", "multi_label"])
def test_standard_error_is_the_spread_of_the_difference_over_samples(task):
    # two correlated models of equal skill: over repeated test sets the estimated SE matches the SD of the
    # AUROC difference, and p < 0.05 about 5% of the time
    rng = np.random.default_rng(5)
    diffs, ses, ps = [], [], []
    for _ in range(200):
        if task == "single_label":
            y = rng.integers(0, 3, 120)
            z = rng.normal(size=(120, 3))
            z[np.arange(120), y] += 1.0
        else:
            y = (rng.random((120, 3)) < 0.35).astype(np.int64)
            z = rng.normal(size=(120, 3)) + y
        d = delong_test(y, z + rng.normal(0, 0.7, z.shape), z + rng.normal(0, 0.7, z.shape), task)
        diffs.append(d["diff"])
        ses.append(d["se"])
        ps.append(d["p"])
    assert 0.85 < np.mean(ses) / np.std(diffs, ddof=1) < 1.15
    assert 0.01 <= np.mean(np.array(ps) < 0.05) <= 0.10


def test_identical_models_and_undefined_auroc():
    y = np.array([0, 1, 0, 1, 1])
    s = np.array([0.1, 0.9, 0.4, 0.3, 0.8])
    d = delong_test(y, s, s)
    assert d["diff"] == 0 and d["p"] == 1.0 and d["se"] == 0
    none = delong_test(np.ones(4, dtype=int), np.linspace(0, 1, 4), np.linspace(0, 1, 4))
    assert math.isnan(none["auc_a"]) and math.isnan(none["p"]) and none["left_out"] == [1]
    with pytest.raises(ValueError, match="NaN or infinite"):
        delong_test(y, np.array([0.1, np.nan, 0.4, 0.3, 0.8]), s)


def _accuracy(y, p):
    return {"accuracy": float(np.mean(p.argmax(1) == y))}


def _two_models(n=80, seed=6):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    z = rng.normal(size=(n, 3))
    z[np.arange(n), y] += 1.2
    return y, z, z + rng.normal(0, 1.5, z.shape)


def test_paired_bootstrap_equals_a_direct_loop_with_the_same_draws():
    y, a, b = _two_models()
    got = paired_bootstrap(_accuracy, y, a, b, strata=y, n_resamples=300, seed=9)["accuracy"]
    rng = np.random.default_rng(9)
    diffs = []
    classes = sorted(set(y.tolist()))
    for _ in range(300):  # per resample, per class in sorted order, n_c draws among that class's rows
        rows = np.empty(len(y), dtype=int)
        for c in classes:
            members = np.flatnonzero(y == c)
            rows[members] = members[rng.integers(0, len(members), len(members))]
        diffs.append(np.mean(a[rows].argmax(1) == y) - np.mean(b[rows].argmax(1) == y))
    diffs = np.sort(diffs)
    below, above = int((diffs <= 0).sum()), int((diffs >= 0).sum())
    assert got["p"] == pytest.approx(min(1.0, 2 * (1 + min(below, above)) / 301), abs=1e-12)
    lo_pos, hi_pos = 0.025 * 299, 0.975 * 299  # numpy's linear percentile: position q (R - 1)
    lo = diffs[int(lo_pos)] + (lo_pos % 1) * (diffs[int(lo_pos) + 1] - diffs[int(lo_pos)])
    hi = diffs[int(hi_pos)] + (hi_pos % 1) * (diffs[int(hi_pos) + 1] - diffs[int(hi_pos)])
    assert got["ci"] == pytest.approx((lo, hi), abs=1e-12)
    assert got["diff"] == pytest.approx(np.mean(a.argmax(1) == y) - np.mean(b.argmax(1) == y), abs=1e-12)
    assert got["resamples"] == 300 and got["ci"][0] < got["diff"] < got["ci"][1]


def test_paired_bootstrap_p_values_at_the_extremes():
    y, a, b = _two_models(n=200)
    same = paired_bootstrap(_accuracy, y, a, a, n_resamples=200, seed=0)["accuracy"]
    assert same["p"] == 1.0 and same["ci"] == (0.0, 0.0) and same["diff"] == 0.0
    perfect = np.eye(3)[y] + 0.0
    wrong = np.eye(3)[(y + 1) % 3] + 0.0
    far = paired_bootstrap(_accuracy, y, perfect, wrong, n_resamples=200, seed=0)["accuracy"]
    assert far["diff"] == 1.0 and far["p"] == pytest.approx(2 / 201)  # no resample with A no better than B
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap(_accuracy, y, a, b, n_resamples=0)


# ------------------------------------------------------------------------------------- tools/compare_runs.py

def _write_predictions(folder, files, y, probs, names=("a", "b", "c")):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "predictions_test.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "file", "label", "prediction", *(f"prob_{c}" for c in names)])
        for i, (name, label, p) in enumerate(zip(files, y, probs)):
            w.writerow([i, name, int(label), int(np.argmax(p)), *(f"{v:.6f}" for v in p)])
    return str(folder)


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _tool(capsys, *args):
    """``python tools/compare_runs.py ARGS`` in this process (its main), with what it printed."""
    capsys.readouterr()
    code = compare_runs.main([str(a) for a in args])
    out = capsys.readouterr()
    return _Result(code, out.out, out.err)


def test_compare_runs_matches_rows_by_file_and_reports_both_tests(tmp_path, capsys):
    y, za, zb = _two_models(n=60, seed=7)
    pa = np.round(np.exp(za) / np.exp(za).sum(1, keepdims=True), 6)
    pb = np.round(np.exp(zb) / np.exp(zb).sum(1, keepdims=True), 6)
    files = [f"{'abc'[c]}/img_{i}.png" for i, c in enumerate(y)]
    run_a = _write_predictions(tmp_path / "A", files, y, pa)
    order = np.random.default_rng(0).permutation(len(y))  # B lists the same images in another order
    run_b = _write_predictions(tmp_path / "B", [files[i] for i in order], y[order], pb[order])
    res = _tool(capsys, run_a, run_b, "--metric", "roc_auc,accuracy", "--resamples", "300", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["n"] == 60 and out["task"] == "single_label"
    by = {(r["metric"], r["test"]): r for r in out["results"]}
    auc_a, auc_b = (roc_auc_score(y, p, multi_class="ovr") for p in (pa, pb))
    for test in ("paired bootstrap", "DeLong"):
        r = by[("roc_auc", test)]
        assert r["a"] == pytest.approx(auc_a, abs=1e-9) and r["b"] == pytest.approx(auc_b, abs=1e-9)
        assert r["ci"][0] < r["diff"] < r["ci"][1] and 0 < r["p"] <= 1
    _, _, var = _reference_macro([y == c for c in range(3)], pa, pb, y)
    z = (auc_a - auc_b) / math.sqrt(var)
    assert by[("roc_auc", "DeLong")]["p"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-9)
    acc = by[("accuracy", "paired bootstrap")]
    assert acc["diff"] == pytest.approx(np.mean(pa.argmax(1) == y) - np.mean(pb.argmax(1) == y), abs=1e-12)
    assert acc["resamples"] == 300
    table = _tool(capsys, run_a, run_b, "--resamples", "50").stdout
    assert "60 test images in both, matched by file" in table and "DeLong, macro one-vs-rest over 3 classes" in table


def test_compare_runs_refuses_different_test_sets_and_labels(tmp_path, capsys):
    y, za, _ = _two_models(n=12, seed=8)
    p = np.exp(za) / np.exp(za).sum(1, keepdims=True)
    files = [f"img_{i}.png" for i in range(12)]
    run_a = _write_predictions(tmp_path / "A", files, y, p)
    run_b = _write_predictions(tmp_path / "B", files[:10] + ["other_1.png", "other_2.png"], y, p)
    res = _tool(capsys, run_a, run_b)
    assert res.returncode == 2 and res.stdout == ""
    assert "were tested on different images: 2 only in A (e.g. img_10.png, img_11.png), 2 only in B" in res.stderr
    run_c = _write_predictions(tmp_path / "C", files, (y + 1) % 3, p)
    res = _tool(capsys, run_a, run_c)
    assert res.returncode == 2 and "the labels of 12 matched images differ" in res.stderr
    res = _tool(capsys, run_a, run_a, "--metric", "mae")
    assert res.returncode == 2 and "--metric mae: not a test metric of the single_label task" in res.stderr
    res = _tool(capsys, run_a, tmp_path / "missing")
    assert res.returncode == 2 and "no predictions_test.csv" in res.stderr
