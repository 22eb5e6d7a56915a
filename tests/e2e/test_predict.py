"""predict.py applies a checkpoint to every kind of input (a folder, one image, a table of paths with or without
labels, a paired table for dual-eye models), writes one row per input with the decision, the confidence,
every output and an error column, and scores a labelled table exactly as ``main_finetune.py --eval`` scores the
same images. Bad files are rows with their reason (``--strict``: exit 2). Checkpoints are untrained seeded
models (``helpers.make_checkpoint``), so every run takes a fraction of a second."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import main_finetune
import predict
from fixtures_data import (
    ODIR_CLASSES,
    SEED_MULTILABEL_COLUMNS,
    make_grading_csv,
    make_multilabel_csv,
    make_odir_table,
    make_paired_csv,
)
from helpers import make_checkpoint, make_class_folders

GRADES = ("0", "1", "2", "3", "4")


def rows_of(path) -> list[dict]:
    with open(path, newline="", encoding="utf8") as f:
        return list(csv.DictReader(f))


def header_of(path) -> list[str]:
    with open(path, newline="", encoding="utf8") as f:
        return next(csv.reader(f))


def probs_of(rows, names) -> np.ndarray:
    return np.array([[float(r[f"prob_{c}"]) for c in names] for r in rows])


def run(*args) -> int:
    return predict.main([str(a) for a in args])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "single": make_checkpoint(root / "single.pdparams", model="resnet_test"),
        "multi": make_checkpoint(root / "multi.pdparams", model="resnet_test", task_type="multi_label",
                                 class_names=SEED_MULTILABEL_COLUMNS),
        "regression": make_checkpoint(root / "regression.pdparams", model="resnet_test", task_type="regression",
                                      class_names=GRADES),
        "root": root,
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Class folders of 3 + 3 + 3 images (test/a, test/b, test/c), read as a plain folder of images."""
    root = tmp_path_factory.mktemp("images")
    make_class_folders(root, counts={"test": 3})
    return root / "test"


# ------------------------------------------------------------------------------------------ inputs

def test_folder_rows_columns_and_confidence(ckpts, folder, tmp_path, capsys):
    out = tmp_path / "result.csv"
    assert run("--resume", ckpts["single"], "--input", folder, "--output", out, "--batch_size", 4) == 0
    assert header_of(out) == ["file", "prediction", "confidence", "prob_a", "prob_b", "prob_c", "error"]
    rows = rows_of(out)
    assert [r["file"] for r in rows] == [f"{c}/{c}_{i}.png" for c in "abc" for i in range(3)]
    probs = probs_of(rows, "abc")
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert [r["prediction"] for r in rows] == ["abc"[k] for k in probs.argmax(1)]
    assert [float(r["confidence"]) for r in rows] == pytest.approx(probs.max(1).tolist(), abs=1e-12)
    assert all(r["error"] == "" for r in rows)
    stdout = capsys.readouterr().out
    assert "9 predicted" in stdout and "could not be read" not in stdout
    assert not (tmp_path / "result_metrics.json").exists()


def test_single_image_gives_one_row_named_by_the_file(ckpts, folder, tmp_path):
    out = tmp_path / "one.csv"
    assert run("--resume", ckpts["single"], "--input", folder / "b" / "b_1.png", "--output", out) == 0
    rows = rows_of(out)
    assert len(rows) == 1 and rows[0]["file"] == "b_1.png"
    whole = {r["file"]: r for r in rows_of(_folder_result(ckpts, folder, tmp_path))}
    assert rows[0] == whole["b/b_1.png"] | {"file": "b_1.png"}  # same image, same row whatever the input


def _folder_result(ckpts, folder, tmp_path, key="single"):
    out = tmp_path / f"folder_{key}.csv"
    assert run("--resume", ckpts[key], "--input", folder, "--output", out) == 0
    return out


@pytest.mark.parametrize("column, fmt", [("Image", "csv"), ("filename", "csv"), ("path", "xlsx")])
def test_a_table_of_paths_without_labels(ckpts, folder, tmp_path, capsys, column, fmt):
    """Paths relative to the table's folder (an images/ subfolder beside the table found by probing, as the
    dataset formats do); the rows follow the table and equal the folder's rows for the same images."""
    data = tmp_path / "data"
    shutil.copytree(folder, data / "images")
    listed = ["c/c_2.png", "a/a_0.png", "b/b_1.png"]
    df = pd.DataFrame({"id": [7, 8, 9], column: listed, "comment": ["x", "y", "z"]})
    table = data / f"list.{fmt}"
    df.to_csv(table, index=False) if fmt == "csv" else df.to_excel(table, index=False)
    stale = tmp_path / "out_metrics.json"
    stale.write_text("{}")  # an earlier run's metrics: removed, since this table has no labels
    out = tmp_path / "out.csv"
    assert run("--resume", ckpts["single"], "--input", table, "--output", out) == 0
    rows = rows_of(out)
    assert [r["file"] for r in rows] == listed
    whole = {r["file"]: r for r in rows_of(_folder_result(ckpts, folder, tmp_path))}
    for r in rows:
        assert r == whole[r["file"]]
    assert not stale.exists()
    said = capsys.readouterr().out
    assert "metrics on" not in said and "warning" not in said and "removed" in said


def test_table_columns_and_folders_can_be_named(ckpts, folder, tmp_path):
    table = tmp_path / "t.csv"
    pd.DataFrame({"a": ["a_0.png", "a_1.png"], "b": ["x", "y"]}).to_csv(table, index=False)
    out = tmp_path / "o.csv"
    assert run("--resume", ckpts["single"], "--input", table, "--output", out, "--image_col", "a",
               "--image_root", folder / "a") == 0
    assert [r["file"] for r in rows_of(out)] == ["a_0.png", "a_1.png"]
    assert all(r["error"] == "" for r in rows_of(out))


def test_a_table_with_blank_image_cells_or_no_known_paths_is_refused(ckpts, folder, tmp_path, capsys):
    table = tmp_path / "t.csv"
    pd.DataFrame({"image": ["a_0.png", ""], "level": [0, 1]}).to_csv(table, index=False)
    assert run("--resume", ckpts["single"], "--input", table, "--output", tmp_path / "o.csv",
               "--image_root", folder / "a") == 2
    assert "1 row without an image path (row 3" in capsys.readouterr().err
    pd.DataFrame({"image": ["nowhere/x.png", "nowhere/y.png"]}).to_csv(table, index=False)
    assert run("--resume", ckpts["single"], "--input", table, "--output", tmp_path / "o.csv") == 2
    assert "none of the first 2 listed images found" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_output_may_not_overwrite_the_input_table(ckpts, tmp_path, capsys):
    table = tmp_path / "t.csv"
    table.write_text("image\nx.png\n")
    assert run("--resume", ckpts["single"], "--input", table, "--output", table) == 2
    assert "the same file as --input" in capsys.readouterr().err
    assert table.read_text() == "image\nx.png\n"


@pytest.mark.parametrize("model", ["dual_resnet_test", "dual_retfound_test"])
def test_a_paired_table_for_a_dual_eye_model(tmp_path, model, capsys):
    ckpt = make_checkpoint(tmp_path / "dual.pdparams", model=model, task_type="multi_label",
                           class_names=("cataract", "glaucoma", "dr"))
    make_paired_csv(tmp_path / "pairs", n_patients=5)
    pairs = pd.read_csv(tmp_path / "pairs" / "pairs.csv")
    plain = tmp_path / "pairs" / "plain.csv"  # no labels: just the two eyes per patient
    pairs[["left_image", "right_image"]].rename(columns={"left_image": "left", "right_image": "right"}).to_csv(
        plain, index=False)
    out = tmp_path / "result.csv"
    assert run("--resume", ckpt, "--input", plain, "--output", out, "--batch_size", 2) == 0
    rows = rows_of(out)
    assert header_of(out) == ["file", "prediction", "confidence", "prob_cataract", "prob_glaucoma", "prob_dr",
                              "error"]
    assert [r["file"] for r in rows] == [f"img/p{p:03d}_v0_L.png|img/p{p:03d}_v0_R.png" for p in range(5)]
    probs = probs_of(rows, ("cataract", "glaucoma", "dr"))
    assert [float(r["confidence"]) for r in rows] == pytest.approx(probs.max(1).tolist(), abs=1e-12)
    assert [r["prediction"] for r in rows] == [";".join(c for c, p in zip(("cataract", "glaucoma", "dr"), row)
                                                        if p > 0.5) for row in probs]
    assert not (tmp_path / "result_metrics.json").exists()
    # the labelled table: the same rows, and scored
    assert run("--resume", ckpt, "--input", tmp_path / "pairs" / "pairs.csv", "--output", out) == 0
    assert rows_of(out) == rows
    report = json.loads((tmp_path / "result_metrics.json").read_text())
    assert report["images"] == 5 and report["labels"] == "labels cataract, glaucoma, dr"
    # a folder is no input for a dual-eye model
    assert run("--resume", ckpt, "--input", tmp_path / "pairs" / "img", "--output", out) == 2
    assert "a dual-eye model needs a table" in capsys.readouterr().err


def test_an_odir_table_dual_and_per_eye(tmp_path, capsys):
    """The ODIR annotation table: a dual-eye model scores it per patient (its N..O columns), a single-view model
    per eye image (labels from the diagnostic keywords, as --eye_mode per_eye reads them)."""
    table = make_odir_table(tmp_path / "odir", n_patients=6, fmt="xlsx", size=32)
    dual = make_checkpoint(tmp_path / "dual.pdparams", model="dual_resnet_test", task_type="multi_label",
                           class_names=ODIR_CLASSES)
    single = make_checkpoint(tmp_path / "single.pdparams", model="resnet_test", task_type="multi_label",
                             class_names=ODIR_CLASSES)
    assert run("--resume", dual, "--input", table, "--output", tmp_path / "dual.csv") == 0
    assert [r["file"] for r in rows_of(tmp_path / "dual.csv")] == [f"{p}_left.png|{p}_right.png" for p in range(6)]
    report = json.loads((tmp_path / "dual_metrics.json").read_text())
    assert report["images"] == 6 and [c["class"] for c in report["details"]["per_class"]] == list(ODIR_CLASSES)
    assert run("--resume", single, "--input", table, "--output", tmp_path / "eyes.csv") == 0
    assert [r["file"] for r in rows_of(tmp_path / "eyes.csv")] == [f"{p}_{s}.png" for p in range(6)
                                                                   for s in ("left", "right")]
    report = json.loads((tmp_path / "eyes_metrics.json").read_text())
    assert report["images"] == 12 and report["labels"].endswith("per eye")
    assert "metrics on 12 labelled images" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ bad inputs

def _bad_files(root):
    """A folder with two good images and every kind of bad file, and the reason each one must get."""
    make_class_folders(root, classes=("ok",), counts={"x": 2})
    good = root / "x" / "ok" / "ok_0.png"
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("not a picture")
    data = good.read_bytes()
    (root / "cut.png").write_bytes(data[: len(data) // 2])
    buf = root / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, quality=95)
    jpeg = buf.read_bytes()
    (root / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    buf.unlink()
    return {"empty.png": "empty file", "text.jpg": "not an image file", "cut.png": "truncated or corrupt PNG",
            "cut.jpg": "JPEG"}


def test_bad_files_are_rows_with_their_reason_and_the_run_goes_on(ckpts, tmp_path, capsys):
    reasons = _bad_files(tmp_path / "in")
    out = tmp_path / "r.csv"
    assert run("--resume", ckpts["single"], "--input", tmp_path / "in", "--output", out, "--batch_size", 3) == 0
    rows = {r["file"]: r for r in rows_of(out)}
    assert set(rows) == set(reasons) | {"x/ok/ok_0.png", "x/ok/ok_1.png"}
    for name, why in reasons.items():
        assert why in rows[name]["error"], (name, rows[name]["error"])
        assert rows[name]["prediction"] == rows[name]["confidence"] == rows[name]["prob_a"] == ""
    for name in ("x/ok/ok_0.png", "x/ok/ok_1.png"):  # a bad image in the batch does not spoil the good ones
        assert rows[name]["error"] == "" and rows[name]["prediction"] in "abc"
    clean = tmp_path / "clean.csv"
    assert run("--resume", ckpts["single"], "--input", tmp_path / "in" / "x", "--output", clean) == 0
    for r in rows_of(clean):
        assert rows[f"x/{r['file']}"] | {"file": r["file"]} == r
    assert "2 predicted, 4 could not be read (see the error column)" in capsys.readouterr().out


def test_a_table_with_missing_and_outside_paths(ckpts, tmp_path, capsys):
    reasons = _bad_files(tmp_path / "in")
    (tmp_path / "secret.png").write_bytes((tmp_path / "in" / "x" / "ok" / "ok_0.png").read_bytes())
    listed = ["x/ok/ok_0.png", "gone.png", "../secret.png", *reasons]
    table = tmp_path / "in" / "list.csv"
    pd.DataFrame({"image": listed}).to_csv(table, index=False)
    out = tmp_path / "r.csv"
    assert run("--resume", ckpts["single"], "--input", table, "--output", out) == 0
    rows = rows_of(out)
    assert [r["file"] for r in rows] == listed
    assert rows[0]["error"] == ""
    assert rows[1]["error"].startswith("file not found") and rows[1]["error"].endswith("gone.png")
    assert "leads outside" in rows[2]["error"] and "--allow_outside_paths" in rows[2]["error"]
    assert "1 predicted, 6 could not be read (see the error column)" in capsys.readouterr().out
    assert run("--resume", ckpts["single"], "--input", table, "--output", out, "--allow_outside_paths") == 0
    assert rows_of(out)[2]["error"] == "" and rows_of(out)[2]["prob_a"] == rows[0]["prob_a"]  # the same image


def test_strict_stops_at_the_first_bad_file(ckpts, tmp_path, capsys):
    _bad_files(tmp_path / "in")
    out = tmp_path / "r.csv"
    assert run("--resume", ckpts["single"], "--input", tmp_path / "in", "--output", out, "--strict") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cut.jpg: ") and "--strict" in err  # the first in file order
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


# ------------------------------------------------------------------------------------------ decisions

def test_tuned_thresholds_decide_multi_label(ckpts, folder, tmp_path):
    names = SEED_MULTILABEL_COLUMNS
    base = rows_of(_folder_result(ckpts, folder, tmp_path, "multi"))
    probs = probs_of(base, names)
    # cuts between the images' probabilities: label j positive for about half the images, not for all / none
    cuts = [float(np.median(probs[:, j])) + 1e-4 for j in range(len(names))]
    tuned = make_checkpoint(tmp_path / "tuned.pdparams", model="resnet_test", task_type="multi_label",
                            class_names=names, thresholds=cuts)
    out = tmp_path / "tuned.csv"
    assert run("--resume", tuned, "--input", folder, "--output", out) == 0
    rows = rows_of(out)
    np.testing.assert_array_equal(probs_of(rows, names), probs)  # same seed, same weights
    expect = [";".join(c for c, p, t in zip(names, row, cuts) if p > t) for row in probs]
    default = [";".join(c for c, p in zip(names, row) if p > 0.5) for row in probs]
    assert [r["prediction"] for r in rows] == expect and expect != default
    assert [r["prediction"] for r in base] == default
    assert run("--resume", tuned, "--input", folder, "--output", out, "--fixed_thresholds") == 0
    assert [r["prediction"] for r in rows_of(out)] == default


def test_regression_columns_and_grade_cuts(ckpts, folder, tmp_path):
    base_out = _folder_result(ckpts, folder, tmp_path, "regression")
    assert header_of(base_out) == ["file", "prediction", "confidence", "output", "error"]
    base = rows_of(base_out)
    out = np.array([float(r["output"]) for r in base])
    assert all(r["confidence"] == "" for r in base)  # a grade, not a probability
    assert [int(r["prediction"]) for r in base] == np.digitize(out, [0.5, 1.5, 2.5, 3.5]).tolist()
    lo, hi = float(out.min()), float(out.max())
    cuts = [lo + (hi - lo) * q for q in (0.2, 0.4, 0.6, 0.8)]
    tuned = make_checkpoint(tmp_path / "tuned.pdparams", model="resnet_test", task_type="regression",
                            class_names=GRADES, thresholds=cuts)
    res = tmp_path / "tuned.csv"
    assert run("--resume", tuned, "--input", folder, "--output", res) == 0
    grades = [int(r["prediction"]) for r in rows_of(res)]
    assert grades == np.digitize(out, cuts).tolist() and len(set(grades)) >= 3


def test_the_temperature_calibrates_single_label_probabilities(ckpts, folder, tmp_path):
    base = probs_of(rows_of(_folder_result(ckpts, folder, tmp_path)), "abc")
    hot = make_checkpoint(tmp_path / "hot.pdparams", model="resnet_test", temperature=2.5)
    out = tmp_path / "hot.csv"
    assert run("--resume", hot, "--input", folder, "--output", out) == 0
    rows = rows_of(out)
    z = np.log(base) / 2.5
    expect = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(probs_of(rows, "abc"), expect, atol=2e-5)
    assert np.abs(expect - base).max() > 0.01  # the temperature changed them
    assert [r["prediction"] for r in rows] == ["abc"[k] for k in base.argmax(1)]  # not the decisions
    assert [float(r["confidence"]) for r in rows] == pytest.approx(probs_of(rows, "abc").max(1).tolist())


def test_multi_label_temperature_keeps_the_tuned_decisions(ckpts, folder, tmp_path):
    names = SEED_MULTILABEL_COLUMNS
    probs = probs_of(rows_of(_folder_result(ckpts, folder, tmp_path, "multi")), names)
    cuts = [float(np.median(probs[:, j])) + 1e-4 for j in range(len(names))]
    plain = make_checkpoint(tmp_path / "p.pdparams", model="resnet_test", task_type="multi_label",
                            class_names=names, thresholds=cuts)
    hot = make_checkpoint(tmp_path / "h.pdparams", model="resnet_test", task_type="multi_label",
                          class_names=names, thresholds=cuts, temperature=3.0)
    assert run("--resume", plain, "--input", folder, "--output", tmp_path / "p.csv") == 0
    assert run("--resume", hot, "--input", folder, "--output", tmp_path / "h.csv") == 0
    p, h = rows_of(tmp_path / "p.csv"), rows_of(tmp_path / "h.csv")
    expect = 1 / (1 + np.exp(-(np.log(probs) - np.log1p(-probs)) / 3.0))
    np.testing.assert_allclose(probs_of(h, names), expect, atol=2e-5)
    assert [r["prediction"] for r in h] == [r["prediction"] for r in p]


def test_labels_that_do_not_fit_the_model_give_a_warning_not_metrics(ckpts, tmp_path, capsys):
    table = make_multilabel_csv(tmp_path / "ml", n=6)
    out = tmp_path / "r.csv"
    assert run("--resume", ckpts["regression"], "--input", table, "--output", out) == 0
    assert len(rows_of(out)) == 6 and not (tmp_path / "r_metrics.json").exists()
    assert "warning: no metrics" in capsys.readouterr().out


def test_explain_needs_the_dygraph_model(ckpts, folder, tmp_path, capsys, monkeypatch):
    import util.deploy as deploy

    real = deploy.load_predictor

    def exported(*a, **kw):  # what an exported folder gives: no Layer to take gradients through
        return dataclasses.replace(real(*a, **kw), model=None, backend="paddle")

    monkeypatch.setattr(deploy, "load_predictor", exported)
    assert run("--resume", ckpts["single"], "--input", folder, "--output", tmp_path / "r.csv",
               "--explain", "gradcam") == 2
    assert "exported model" in capsys.readouterr().err and not (tmp_path / "r.csv").exists()


# ------------------------------------------------------------------------------------------ --eval parity

def _split_dir(table: str, root) -> str:
    """``table``'s rows as train.csv / val.csv / test.csv beside it (a fifth each to val and test, in a pattern
    that gives the test split every grade of a table whose grades cycle), so that --eval scores test.csv's rows."""
    df = pd.read_csv(table)
    which = np.array([("train", "train", "train", "val", "test")[(i + i // 5) % 5] for i in range(len(df))])
    for split in ("train", "val", "test"):
        df[which == split].to_csv(os.path.join(root, f"{split}.csv"), index=False)
    return str(root)


def _parity_case(kind, tmp_path):
    """(checkpoint, data folder with train/val/test tables, label columns of the test table to keep)."""
    if kind == "multi_label_subset":  # the table labels two of the model's four labels
        data = make_multilabel_csv(tmp_path / "data", n=30, layout="dir", labels=("glaucoma", "normal_fundus"))
        ckpt = make_checkpoint(tmp_path / "c.pdparams", model="resnet_test", task_type="multi_label",
                               class_names=SEED_MULTILABEL_COLUMNS, thresholds=[0.45, 0.5, 0.55, 0.6],
                               temperature=1.7)
    elif kind == "regression":
        data = _split_dir(make_grading_csv(tmp_path / "data", n=30), tmp_path / "data")
        ckpt = make_checkpoint(tmp_path / "c.pdparams", model="efficientnet_test", task_type="regression",
                               class_names=GRADES, thresholds=[-0.2, 0.0, 0.1, 0.3])
    elif kind == "single_label":
        data = _split_dir(make_grading_csv(tmp_path / "data", n=30), tmp_path / "data")
        ckpt = make_checkpoint(tmp_path / "c.pdparams", model="resnet_test", class_names=GRADES, temperature=0.6)
    else:  # dual-eye
        table = make_paired_csv(tmp_path / "data", n_patients=20, per_eye=False, seed=2)
        data = _split_dir(table, tmp_path / "data")
        os.remove(table)
        ckpt = make_checkpoint(tmp_path / "c.pdparams", model="dual_resnet_test", task_type="multi_label",
                               class_names=("cataract", "glaucoma", "dr"), thresholds=[0.4, 0.5, 0.6],
                               temperature=0.7)
    return ckpt, data


@pytest.mark.parametrize("kind", ["multi_label_subset", "regression", "single_label", "dual"])
def test_metrics_and_probabilities_equal_those_of_eval(tmp_path, kind):
    """The key parity: predict.py on test.csv and ``--eval`` on the folder holding train/val/test.csv score the
    same images with the same readers, thresholds, temperature and metric functions."""
    ckpt, data = _parity_case(kind, tmp_path)
    assert main_finetune.cli(["--eval", "--resume", ckpt, "--data_path", data, "--output_dir", str(tmp_path / "out"),
                              "--task", "ev", "--num_workers", "0", "--batch_size", "4"]) == 0
    ev = tmp_path / "out" / "ev"
    out = tmp_path / "result.csv"
    assert run("--resume", ckpt, "--input", os.path.join(data, "test.csv"), "--output", out, "--batch_size", 5) == 0
    report = json.loads((tmp_path / "result_metrics.json").read_text())
    expected = rows_of(ev / "metrics_test.csv")[0]
    compared = [k for k in expected if k not in ("val_loss", "epoch", "checkpoint_epoch", "timestamp")]
    assert set(report["metrics"]) == set(compared)
    for k in compared:
        want, got = float(expected[k]), report["metrics"][k]
        assert (got is None and math.isnan(want)) or got == pytest.approx(want, abs=1e-6), k
    preds = rows_of(ev / "predictions_test.csv")
    mine = {r["file"]: r for r in rows_of(out)}
    assert len(mine) == len(preds) == report["images"]
    for p in preds:
        r = mine[p["file"]]
        for col in (c for c in p if c.startswith("prob_") or c == "output"):
            assert float(r[col]) == pytest.approx(float(p[col]), abs=2e-6), (p["file"], col)
        if kind == "regression":
            assert int(r["prediction"]) == int(p["prediction_tuned"])
        elif kind == "single_label":
            assert r["prediction"] == GRADES[int(p["prediction"])]
        else:
            tuned = [c[len("pred_tuned_"):] for c in p if c.startswith("pred_tuned_") and p[c] == "1"]
            scored = {c[len("pred_tuned_"):] for c in p if c.startswith("pred_tuned_")}
            # (with a subset of the labels, the model's other labels are predicted too)
            assert {c for c in r["prediction"].split(";") if c in scored} == set(tuned)


def test_an_exported_model_gives_the_checkpoints_rows_on_every_backend(ckpts, folder, tmp_path, capsys):
    """``--resume DIR`` (a folder written by export.py) through Paddle Inference and ONNX Runtime writes the rows
    the checkpoint writes: same files, same decisions, probabilities within 1e-5; bf16 (where the CPU has it)
    within a few hundredths, and a CPU without bf16 gets an error saying so."""
    import export
    from util.exported import bf16_support
    from util.onnx_backend import onnx_unavailable

    out_dir = tmp_path / "exported"
    export.export_checkpoint(ckpts["single"], str(out_dir), onnx=onnx_unavailable() is None, say=lambda line: None)
    assert run("--resume", ckpts["single"], "--input", folder, "--output", tmp_path / "ckpt.csv") == 0
    want = rows_of(tmp_path / "ckpt.csv")
    names = ("a", "b", "c")
    backends = [("paddle", "fp32", 1e-5)] + ([("onnxruntime", "fp32", 1e-5)] if onnx_unavailable() is None else [])
    if bf16_support() is None:
        backends.append(("paddle", "bf16", 0.05))
    for backend, precision, tol in backends:
        out = tmp_path / f"{backend}_{precision}.csv"
        assert run("--resume", out_dir, "--backend", backend, "--precision", precision, "--input", folder,
                   "--output", out) == 0, capsys.readouterr().err
        got = rows_of(out)
        assert [r["file"] for r in got] == [r["file"] for r in want]
        diff = np.abs(probs_of(got, names) - probs_of(want, names)).max()
        assert diff <= tol, (backend, precision, diff)
        if precision == "fp32":
            assert [r["prediction"] for r in got] == [r["prediction"] for r in want]
    if bf16_support() is not None:
        assert run("--resume", out_dir, "--precision", "bf16", "--input", folder, "--output",
                   tmp_path / "bf16.csv") == 2
        assert "bf16" in capsys.readouterr().err
    # the checkpoint itself runs in dygraph only; an export runs without the model code
    assert run("--resume", out_dir, "--backend", "dygraph", "--input", folder, "--output", tmp_path / "x.csv") == 2
    assert "dygraph" in capsys.readouterr().err
