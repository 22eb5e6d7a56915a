"""Every seed preset runs end to end through ``bash run.sh <preset>`` for one short epoch, with its ``*_test``
model substituted, on synthesized data laid out where run.sh looks for it; the test reads the files a user
would read (metrics CSVs with the task's columns, per-class tables, confusion matrices, thresholds)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from fixtures_data import make_eye_folders, make_grading_csv, make_multilabel_csv, make_odir_table, make_paired_csv
from helpers import ROOT

pytestmark = pytest.mark.slow

SHORT = ["--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--finetune", "", "--input_size", "32",
         "--print_freq", "100"]


def run_preset(name, model, data_root, out, *extra):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", DATA_ROOT=str(data_root),
               OUTPUT_DIR=str(out), WEIGHTS_DIR=str(data_root / "weights"))
    res = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), name, "--", "--model", model, *SHORT, *extra],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res.stdout, out / f"{name}-{model}"


def rows(path):
    with open(path, newline="", encoding="utf8") as f:
        return list(csv.DictReader(f))


def header(path):
    with open(path, newline="", encoding="utf8") as f:
        return next(csv.reader(f))


def resolved(run):
    with open(run / "config.yaml", encoding="utf8") as f:
        return yaml.safe_load(f)


def check_common(run, columns):
    """metrics_val/test CSVs carry exactly the task's columns with finite, in-range values."""
    for name in ("metrics_val.csv", "metrics_test.csv"):
        assert header(run / name)[:len(columns)] == columns, name
    test = rows(run / "metrics_test.csv")[-1]
    assert float(test["val_loss"]) > 0
    for name in ("checkpoint-best.pdparams", "training_curves.png", "confusion_matrix_test.png",
                 "predictions_test.csv", "per_class_test.csv", "per_class_val.csv"):
        assert (run / name).is_file(), name
    return test


MULTILABEL_COLS = ["val_loss", "f1_macro", "f1_micro", "precision_macro", "recall_macro", "roc_auc", "map",
                   "hamming", "subset_accuracy", "odir_kappa", "odir_f1", "odir_auc", "odir_final",
                   "f1_macro_tuned", "f1_micro_tuned"]


def check_thresholds(run, n, task):
    data = json.loads((run / "thresholds.json").read_text())
    assert data["task"] == task and len(data["thresholds"]) == n
    assert "validation" in data["source"]
    return data["thresholds"]


def test_multilabel_effb4(tmp_path):
    make_multilabel_csv(tmp_path / "data" / "multilabel_fundus", n=40)
    out, run = run_preset("multilabel_effb4", "efficientnet_test", tmp_path / "data", tmp_path / "out",
                          "--batch_size", "8")
    cfg = resolved(run)
    assert (cfg["opt"], cfg["sched"], cfg["plateau_metric"], cfg["loss"]) == ("adam", "plateau", "roc_auc", "bce")
    assert "best checkpoint by val roc_auc" in out
    test = check_common(run, MULTILABEL_COLS)
    assert 0.0 <= float(test["odir_final"]) <= 1.0
    labels = ["cataract", "glaucoma", "diabetic_retinopathy", "normal_fundus"]
    per_class = rows(run / "per_class_test.csv")
    assert [r["class"] for r in per_class] == labels
    assert {"precision", "recall", "f1", "auroc", "threshold", "f1_tuned"} <= set(per_class[0])
    thr = check_thresholds(run, 4, "multi_label")
    assert [float(r["threshold"]) for r in per_class] == pytest.approx(thr, abs=1e-5)
    pred = header(run / "predictions_test.csv")
    assert pred[:2] == ["index", "file"] and "prob_glaucoma" in pred and "pred_tuned_glaucoma" in pred
    assert (run / "confusion_matrix_test_tuned.png").is_file()
    assert "Test metrics per dataset:" in out and "f1_macro" in out.split("Test metrics per dataset:")[1]


def test_external_eye_effb4_reports_per_class_each_epoch(tmp_path):
    make_eye_folders(tmp_path / "data" / "external_eye")
    out, run = run_preset("external_eye_effb4", "efficientnet_test", tmp_path / "data", tmp_path / "out",
                          "--epochs", "2", "--batch_size", "5")
    classes = ["cataract", "conjunctivitis", "eyelid", "normal", "uveitis"]
    # the per-class table is printed after every epoch and kept in the run folder
    assert out.count("class") >= 2 and all(out.count(f"\n{c} ") >= 2 for c in classes)
    val = rows(run / "per_class_val.csv")
    assert [r["epoch"] for r in val] == ["0"] * 5 + ["1"] * 5
    assert [r["class"] for r in val[:5]] == classes
    assert {"precision", "recall", "f1", "support"} <= set(val[0])
    assert all(int(r["support"]) == 3 for r in val)
    test = check_common(run, ["val_loss", "accuracy", "f1", "roc_auc", "hamming", "jaccard", "precision", "recall",
                              "average_precision", "kappa", "kappa_quadratic", "score"])
    assert 0.0 <= float(test["accuracy"]) <= 1.0
    assert "validation" in out.lower() and "test" in out.lower()


def test_dr_regression_effv2m_and_predict(tmp_path):
    make_grading_csv(tmp_path / "data" / "dr_grading", n=50, name="labels.csv", size=48)
    cache = tmp_path / "cache"
    out, run = run_preset("dr_regression_effv2m", "efficientnet_test", tmp_path / "data", tmp_path / "out",
                          "--batch_size", "6", "--preprocess_size", "40", "--cache_dir", str(cache))
    cfg = resolved(run)
    assert (cfg["loss"], cfg["sched"], cfg["opt"], cfg["fundus_crop"], cfg["balanced_sampler"]) == \
        ("smooth_l1", "step", "adamw", "fov", True)
    test = check_common(run, ["val_loss", "accuracy", "f1", "kappa_quadratic", "kappa", "mae", "accuracy_tuned",
                              "f1_tuned", "kappa_quadratic_tuned"])
    assert float(test["mae"]) >= 0
    cuts = check_thresholds(run, 4, "regression")
    assert all(a < b for a, b in zip(cuts, cuts[1:]))
    assert (run / "confusion_matrix_test_tuned.png").is_file()
    assert [r["class"] for r in rows(run / "per_class_test.csv")] == ["0", "1", "2", "3", "4"]
    assert header(run / "predictions_test.csv") == ["index", "file", "label", "output", "prediction",
                                                    "prediction_tuned"]
    # every image read was preprocessed once into the cache: all val/test images, the train ones the balanced
    # sampler drew (with replacement, so not necessarily all)
    cached = {p.name.rsplit("-", 1)[0] for p in cache.rglob("*.png")}
    tested = {os.path.splitext(os.path.basename(r["file"]))[0] for r in rows(run / "predictions_test.csv")}
    assert tested <= cached and len(tested) < len(cached) <= 50

    # the seed's predict step: a folder of images -> result.csv (image name, predicted grade)
    result = tmp_path / "result.csv"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), "--resume",
                          str(run / "checkpoint-best.pdparams"), "--input", str(tmp_path / "data" / "dr_grading" /
                                                                                  "images"),
                          "--output", str(result)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    got = rows(result)
    assert len(got) == 50 and list(got[0])[:2] == ["file", "prediction"]
    assert got[0]["file"] == "eye_000.png" and all(0 <= int(r["prediction"]) <= 4 for r in got)
    # predict.py applies the tuned cuts to the same outputs the test report shows
    by_file = {r["file"].split("/")[-1]: r for r in rows(run / "predictions_test.csv")}
    for r in got:
        if r["file"] in by_file:
            assert float(r["output"]) == pytest.approx(float(by_file[r["file"]]["output"]), abs=1e-4)
            assert int(r["prediction"]) == int(by_file[r["file"]]["prediction_tuned"])


@pytest.mark.parametrize("preset, model", [("odir_dual_convnext", "dual_convnext_test"),
                                           ("odir_dual_resnet50", "dual_resnet_test"),
                                           ("odir_dual_retfound", "dual_retfound_test")])
def test_odir_dual_presets(tmp_path, preset, model):
    make_odir_table(tmp_path / "data" / "ODIR-5K", n_patients=24, fmt="xlsx", image_dir="Training Images",
                    name="data", size=40)
    extra = ["--cache_dir", str(tmp_path / "cache"), "--preprocess_size", "36"] if preset == "odir_dual_resnet50" \
        else []
    out, run = run_preset(preset, model, tmp_path / "data", tmp_path / "out", *extra)
    test = check_common(run, MULTILABEL_COLS)
    per_class = rows(run / "per_class_test.csv")
    assert [r["class"] for r in per_class] == list("NDGCAHMO")
    check_thresholds(run, 8, "multi_label")
    # the official ODIR score is the mean of its three parts
    parts = [float(test[k]) for k in ("odir_kappa", "odir_f1", "odir_auc")]
    assert float(test["odir_final"]) == pytest.approx(sum(parts) / 3, abs=1e-4)
    pred = rows(run / "predictions_test.csv")
    assert "|" in pred[0]["file"]  # left|right images of one patient
    cfg = resolved(run)
    if preset != "odir_dual_resnet50":
        assert (cfg["loss"], cfg["focal_alpha"], cfg["focal_gamma"], cfg["pos_weight"]) == ("hybrid", 0.3, 2.5, True)
        assert cfg["test_ratio"] == 0.0 and cfg["amp"] is True and cfg["clip_grad"] == 1.0
        assert "AMP: off" in out  # requested by the preset, CPU trains in float32 and says so
    if preset == "odir_dual_convnext":
        assert (cfg["batch_size"], cfg["accum_iter"], cfg["backbone_lr_scale"]) == (6, 2, 0.1)
        assert "backbone LR x0.1" in out
    if preset == "odir_dual_resnet50":
        assert (cfg["opt"], cfg["fundus_crop"], cfg["loss"]) == ("sgd", "fov_circle", "bce")
        assert len(list((tmp_path / "cache").rglob("*.png"))) == 48  # 24 patients x 2 eyes


def test_predict_on_a_paired_table_for_a_dual_eye_model(tmp_path):
    """predict.py reads a dual-eye model's input through the odir format's column detection and path
    resolution: the generic paired table (left_image/right_image) gives one row per patient."""
    import main_finetune
    import predict

    table = make_paired_csv(tmp_path / "pairs", n_patients=20)
    args = ["--model", "dual_resnet_test", "--input_size", "32", "--batch_size", "4", "--num_workers", "0",
            "--epochs", "1", "--warmup_epochs", "0", "--data_path", table, "--output_dir", str(tmp_path / "out"),
            "--task", "dual"]
    assert main_finetune.cli(args) == 0
    out = tmp_path / "result.csv"
    assert predict.main(["--resume", str(tmp_path / "out" / "dual" / "checkpoint-best.pdparams"), "--input", table,
                         "--output", str(out)]) == 0
    rows = list(csv.DictReader(open(out, newline="")))
    assert len(rows) == 20 and rows[0]["file"] == "img/p000_v0_L.png|img/p000_v0_R.png"
    assert set(rows[0]) == {"file", "prediction", "confidence", "prob_cataract", "prob_glaucoma", "prob_dr", "error"}
    bad = tmp_path / "pairs" / "bad.csv"
    bad.write_text("left,right\nimg/p000_v0_L.png,\n")
    assert predict.main(["--resume", str(tmp_path / "out" / "dual" / "checkpoint-best.pdparams"), "--input",
                         str(bad), "--output", str(tmp_path / "r2.csv")]) == 2
