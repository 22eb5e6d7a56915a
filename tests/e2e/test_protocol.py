"""The evaluation protocols end to end (util/protocol): ``--seeds`` (summary, a failed seed reported and redone
on the next run while the finished ones are kept), ``--kfold`` (patient-level folds, every row tested once),
``--external`` (one table over the datasets, classes matched by name), tools/compare_runs.py on two seeds'
runs, and run.sh passing ``--seeds`` through. Tiny ViT, 32 px, one epoch, a handful of images."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats
from sklearn.metrics import roc_auc_score

from helpers import ROOT, make_class_folders, run_cli

TINY = ["--model", "vit_test", "--input_size", "32", "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0",
        "--num_workers", "0", "--print_freq", "100"]
ENV = {"GLOG_minloglevel": "2"}


def _rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf8") as f:
        return list(csv.DictReader(f))


def _mtime(path) -> float:
    return os.path.getmtime(path)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict:
    """--seeds 3 with seed 1's folder taken by another run (so it fails), then again once it is free."""
    tmp = tmp_path_factory.mktemp("protocol")
    data = make_class_folders(tmp / "A", counts={"train": 4, "val": 2, "test": 3})
    make_class_folders(tmp / "B", counts={"test": 3}, seed=1)
    make_class_folders(tmp / "C", classes=("a", "c"), counts={"test": 4}, seed=2)  # a subset of the classes
    out = tmp / "out"
    blocker = out / "s" / "s_seed1" / "log.txt"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("{}\n")
    argv = [*TINY, "--data_path", data, "--output_dir", out, "--task", "s", "--seeds", "3"]
    first = run_cli(argv, env_extra=ENV)
    summary_md_first = (out / "s" / "seeds_summary.md").read_text()
    kept = {k: _mtime(out / "s" / f"s_seed{k}" / "metrics_test.csv") for k in (0, 2)}
    blocker.unlink()
    second = run_cli(argv, env_extra=ENV)
    return {"tmp": tmp, "out": out, "base": out / "s", "first": first, "second": second, "argv": argv,
            "md_first": summary_md_first, "kept": kept}


def test_a_failed_seed_is_reported_and_redone_while_finished_seeds_are_kept(seeds):
    first, second, base = seeds["first"], seeds["second"], seeds["base"]
    assert first.returncode == 1, first.stdout[-2000:] + first.stderr[-2000:]
    assert "=== seed 1: failed with exit status 2" in first.stdout
    assert "already holds a run (log.txt)" in first.stderr  # the sub-run's own message
    assert "Missing (1 of 3): s_seed1 (failed (exit status 2))" in seeds["md_first"]
    assert "2 of 3 seeds of s" in seeds["md_first"]
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "3 sub-runs, 2 finished earlier (kept), 1 to run" in second.stdout
    assert "=== seed 0 (1/3): finished earlier, kept" in second.stdout
    for k, t in seeds["kept"].items():  # not run again
        assert _mtime(base / f"s_seed{k}" / "metrics_test.csv") == t
    # the three runs had seeds 0, 1, 2 (--seed + k), each in its own folder
    for k in range(3):
        cfg = (base / f"s_seed{k}" / "config.yaml").read_text()
        assert f"\nseed: {k}\n" in cfg and "\nseeds: 0\n" in cfg


def test_seeds_summary_holds_each_seed_and_the_t_interval(seeds):
    base = seeds["base"]
    rows = {r["metric"]: r for r in _rows(base / "seeds_summary.csv")}
    per_seed = [_rows(base / f"s_seed{k}" / "metrics_test.csv")[-1] for k in range(3)]
    assert set(rows) >= {"accuracy", "f1", "roc_auc", "kappa", "average_precision"} and "val_loss" not in rows
    for metric in ("accuracy", "roc_auc", "average_precision"):
        values = [float(r[metric]) for r in per_seed]
        row = rows[metric]
        assert [float(row[f"s_seed{k}"]) for k in range(3)] == pytest.approx(values, abs=1e-5)
        mean, sd = np.mean(values), np.std(values, ddof=1)
        assert int(row["n"]) == 3
        assert float(row["mean"]) == pytest.approx(mean, abs=1e-5) and float(row["sd"]) == pytest.approx(sd, abs=1e-5)
        lo, hi = stats.t.interval(0.95, 2, loc=mean, scale=sd / math.sqrt(3)) if sd > 0 else (mean, mean)
        assert float(row["ci_low"]) == pytest.approx(lo, abs=1e-5)
        assert float(row["ci_high"]) == pytest.approx(hi, abs=1e-5)
    md = (base / "seeds_summary.md").read_text().splitlines()
    assert md[0] == "3 of 3 seeds of s, test split"
    assert md[2] == "| sub-run | folder | accuracy | f1 | roc_auc | kappa | kappa_quadratic | average_precision |"
    assert [ln.split(" | ")[0] for ln in md[4:10]] == ["| seed 0", "| seed 1", "| seed 2", "| mean", "| 95% CI", "| SD"]
    assert any("t(0.975, n - 1)" in ln and "n = 3 (t = 4.303)" in ln for ln in md)
    assert f"{float(rows['roc_auc']['mean']):.3f}" == md[7].split(" | ")[4]


def test_compare_runs_on_two_seeds(seeds):
    base = seeds["base"]
    tool = [sys.executable, os.path.join(ROOT, "tools", "compare_runs.py")]
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*tool, base / "s_seed0", base / "s_seed2", "--resamples", "300", "--json"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    preds = [pd.read_csv(base / f"s_seed{k}" / "predictions_test.csv") for k in (0, 2)]
    assert out["n"] == 9 and [r["test"] for r in out["results"]] == ["paired bootstrap", "DeLong"]
    for r in out["results"]:
        for side, p in zip("ab", preds):
            probs = p[["prob_a", "prob_b", "prob_c"]].to_numpy()
            auc = np.mean([roc_auc_score(p["label"] == c, probs[:, c]) for c in range(3)])
            assert r[side] == pytest.approx(auc, abs=1e-9)
        assert r["ci"][0] <= r["ci"][1] and 0 < r["p"] <= 1  # (a percentile interval need not hold the point)
    delong = out["results"][1]
    assert delong["ci"][0] <= delong["diff"] <= delong["ci"][1] and delong["averaged_over"] == [0, 1, 2]


def test_external_validation_table_over_two_datasets(seeds):
    # the training run of this command is seed 0's (finished: kept), then its checkpoint on B and C
    tmp, base = seeds["tmp"], seeds["base"]
    res = run_cli([*TINY, "--data_path", tmp / "A", "--output_dir", base, "--task", "s_seed0", "--external",
                   f"{tmp / 'B'},{tmp / 'C'}"], env_extra=ENV)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "1 sub-runs, 1 finished earlier (kept), 0 to run" in res.stdout
    assert "holds 2 of the checkpoint's 3 classes (matched by name); absent: b" in res.stdout
    run = base / "s_seed0"
    rows = _rows(run / "external_summary.csv")
    assert [(r["dataset"], r["role"], r["n"]) for r in rows] == [("A", "internal", "9"), ("B", "external", "9"),
                                                                 ("C", "external", "8")]
    for r, folder in zip(rows, (run, run / "external" / "B", run / "external" / "C")):
        metrics = _rows(folder / "metrics_test.csv")[-1]
        cis = {c["metric"]: c for c in _rows(folder / "metrics_test_ci.csv")}
        assert float(r["roc_auc"]) == pytest.approx(float(metrics["roc_auc"]), abs=1e-5)
        assert r["roc_auc_ci_low"] == cis["roc_auc"]["ci_low"] and r["roc_auc_ci_high"] == cis["roc_auc"]["ci_high"]
    md = (run / "external_summary.md").read_text().splitlines()
    assert md[2] == "| dataset | role | n | accuracy | f1 | roc_auc | kappa | kappa_quadratic | average_precision |"
    assert md[6].startswith("| C | external | 8 | ")
    # again: everything is kept
    again = run_cli([*TINY, "--data_path", tmp / "A", "--output_dir", base, "--task", "s_seed0", "--external",
                     f"{tmp / 'B'},{tmp / 'C'}"], env_extra=ENV)
    assert again.returncode == 0 and "2 sub-runs, 2 finished earlier (kept), 0 to run" in again.stdout


def _patient_table(root, n_patients=12) -> str:
    """Two eyes per patient, three grades as the red level, a patient_id column."""
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for p in range(n_patients):
        for side in "LR":
            grade = (p + (side == "R")) % 3
            img = np.zeros((32, 32, 3))
            img[..., 0] = 40 + 90 * grade
            img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, "img", f"p{p:02d}{side}.png"))
            rows.append({"image": f"img/p{p:02d}{side}.png", "patient_id": f"P{p:02d}", "grade": grade})
    path = os.path.join(root, "labels.csv")
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_kfold_tests_every_row_once_and_keeps_patients_in_one_fold(tmp_path):
    table = _patient_table(str(tmp_path / "tab"))
    res = run_cli([*TINY, "--data_path", table, "--task_type", "single_label", "--val_ratio", "0.2",
                   "--output_dir", tmp_path / "out", "--task", "kf", "--kfold", "2"], env_extra=ENV)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    base = tmp_path / "out" / "kf"
    assert "grouped by patient column 'patient_id' (12 patients)" in res.stdout
    oof = pd.read_csv(base / "kfold_predictions.csv")
    table_rows = pd.read_csv(table)
    assert sorted(oof["file"]) == sorted(table_rows["image"])  # every row tested exactly once
    patient = dict(zip(table_rows["image"], table_rows["patient_id"]))
    folds_of = oof.groupby(oof["file"].map(patient))["fold"].nunique()
    assert (folds_of == 1).all() and len(folds_of) == 12  # no patient's eyes in two folds
    assert oof["fold"].value_counts().sort_index().tolist() == [12, 12]  # 6 patients a fold
    rows = {r["metric"]: r for r in _rows(base / "kfold_summary.csv")}
    accs = [float(_rows(base / f"kf_fold{k}" / "metrics_test.csv")[-1]["accuracy"]) for k in range(2)]
    assert float(rows["accuracy"]["mean"]) == pytest.approx(np.mean(accs), abs=1e-5)
    assert int(rows["accuracy"]["n"]) == 2
    md = (base / "kfold_summary.md").read_text()
    assert "2 of 2 folds of kf" in md and "not independent samples" in md


FAKE_PYTHON = """#!{python}
import json, os, sys
argv = sys.argv[1:]
if argv[:1] != ["main_finetune.py"]:
    os.execv({python!r}, [{python!r}, *argv])
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
last = lambda flag: [v for k, v in zip(argv, argv[1:]) if k == flag][-1]
run = os.path.join(last("--output_dir"), last("--task"))
os.makedirs(run, exist_ok=True)
with open(os.path.join(run, "seeds_summary.csv"), "w") as f:
    f.write("metric,n,mean,sd,ci_low,ci_high,a_seed0,a_seed1,a_seed2\\n"
            "accuracy,3,0.5,0.1,0.25,0.75,0.4,0.5,0.6\\nroc_auc,3,0.8,0.05,0.7,0.9,0.75,0.8,0.85\\n")
"""


def test_run_sh_passes_seeds_through_and_summarises_the_mean(tmp_path):
    make_class_folders(tmp_path / "data" / "OCTID", counts={"train": 1})
    fake, log = tmp_path / "fake_python", tmp_path / "calls.jsonl"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    log.write_text("")
    env = {**os.environ, "PYTHON": str(fake), "FAKE_LOG": str(log), "DATA_ROOT": str(tmp_path / "data"),
           "OUTPUT_DIR": str(tmp_path / "out")}
    res = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "octid", "--seeds", "3"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 1 and calls[0][-2:] == ["--seeds", "3"]
    row = [ln for ln in res.stdout.splitlines() if ln.startswith("| RETFound_mae_meh-OCTID")]
    assert row == ["| RETFound_mae_meh-OCTID (3 seeds) | 0.500 (0.250\u20130.750) | - | 0.800 (0.700\u20130.900) "
                   "| - | - | - |"]
    assert "95% t-interval of the mean" in res.stdout
    bad = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "octid", "--seeds", "x"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "run.sh: --seeds 'x': not a count of 2 or more" in bad.stderr
