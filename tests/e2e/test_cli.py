"""End-to-end CLI runs on synthetic class folders with the tiny ViT: the files and numbers a user reads."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

from helpers import TINY_ARGS, run_cli

COLUMNS = ["val_loss", "accuracy", "f1", "roc_auc", "hamming", "jaccard", "precision", "recall",
           "average_precision", "kappa", "kappa_quadratic", "score"]


def read_csv(path):
    with open(path, newline="", encoding="utf8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from helpers import make_class_folders

    base = tmp_path_factory.mktemp("e2e")
    data = make_class_folders(base / "data")
    out = base / "out"
    res = run_cli([*TINY_ARGS, "--data_path", data, "--nb_classes", "3", "--epochs", "2", "--output_dir", out,
                   "--task", "tiny"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {"data": data, "out": out, "run": out / "tiny", "proc": res}


def test_training_writes_every_output(trained_run):
    run = trained_run["run"]
    for name in ["config.yaml", "run_info.json", "log.txt", "metrics_val.csv", "metrics_test.csv",
                 "confusion_matrix_test.png", "training_curves.png", "checkpoint-best.pdparams", "checkpoint-last.pdparams",
                 "predictions_test.csv"]:
        assert (run / name).is_file(), f"{name} missing; have {sorted(os.listdir(run))}"
    # log.txt: one JSON line per epoch with the reference keys
    lines = [json.loads(x) for x in (run / "log.txt").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]
    for x in lines:
        assert {"epoch", "train_lr", "train_loss", "n_parameters"} <= set(x)
        assert np.isfinite(x["train_loss"]) and x["train_lr"] > 0 and x["n_parameters"] > 0
    # metrics CSVs: the reference's columns first, a row per evaluation
    val_rows = read_csv(run / "metrics_val.csv")
    assert list(val_rows[0].keys()) == COLUMNS + ["epoch"] and len(val_rows) == 2
    assert [r["epoch"] for r in val_rows] == ["0", "1"]
    test_rows = read_csv(run / "metrics_test.csv")
    assert len(test_rows) == 1
    # the plots are real PNGs
    for png in ["confusion_matrix_test.png", "training_curves.png"]:
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    # VisualDL event file
    assert any(n.startswith("vdlrecords") for n in os.listdir(run)), os.listdir(run)


def test_test_metrics_match_sklearn_on_saved_predictions(trained_run):
    run = trained_run["run"]
    rows = read_csv(run / "predictions_test.csv")
    y = np.array([int(r["label"]) for r in rows])
    probs = np.array([[float(r[k]) for k in r if k.startswith("prob_")] for r in rows])
    assert len(y) == 15  # 5 test images x 3 classes, each counted once
    pred = probs.argmax(1)
    m = read_csv(run / "metrics_test.csv")[0]
    onehot = np.eye(3)[y]
    assert float(m["accuracy"]) == pytest.approx(accuracy_score(y, pred), abs=1e-6)
    assert float(m["f1"]) == pytest.approx(f1_score(onehot, np.eye(3)[pred], average="macro", zero_division=0),
                                           abs=1e-6)
    assert float(m["roc_auc"]) == pytest.approx(roc_auc_score(onehot, probs, multi_class="ovr", average="macro"),
                                                abs=1e-4)
    assert float(m["kappa"]) == pytest.approx(cohen_kappa_score(y, pred), abs=1e-6)


def test_eval_resume_reproduces_saved_test_metrics(trained_run, tmp_path):
    run = trained_run["run"]
    res = run_cli([*TINY_ARGS, "--data_path", trained_run["data"], "--nb_classes", "3", "--eval", "--resume",
                   run / "checkpoint-best.pdparams", "--output_dir", tmp_path, "--task", "ev"])
    assert res.returncode == 0, res.stderr[-3000:]
    saved = read_csv(run / "metrics_test.csv")[0]
    again = read_csv(tmp_path / "ev" / "metrics_test.csv")[0]
    assert (tmp_path / "ev" / "config_eval.yaml").is_file() and not (tmp_path / "ev" / "config.yaml").exists()
    for k in COLUMNS:
        assert float(again[k]) == pytest.approx(float(saved[k]), abs=1e-6, nan_ok=True), k


def test_resume_with_other_classes_lists_differences(trained_run, tmp_path):
    from helpers import make_class_folders

    other = make_class_folders(tmp_path / "d4", classes=("a", "b", "c", "d"))
    res = run_cli([*TINY_ARGS, "--data_path", other, "--nb_classes", "4", "--epochs", "3", "--resume",
                   trained_run["run"] / "checkpoint-last.pdparams", "--output_dir", tmp_path])
    assert res.returncode == 2
    # the run folder's config.yaml names the flags that change the run, with both values
    assert "--nb_classes 4 (the run used 3)" in res.stderr and f"--data_path {other!r}" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    # a checkpoint away from its run folder: the identity stored in it lists the differences
    alone = tmp_path / "alone.pdparams"
    alone.write_bytes((trained_run["run"] / "checkpoint-last.pdparams").read_bytes())
    res = run_cli([*TINY_ARGS, "--data_path", other, "--nb_classes", "4", "--epochs", "3", "--resume", alone,
                   "--output_dir", tmp_path / "o2"])
    assert res.returncode == 2
    assert "nb_classes" in res.stderr and "class_names" in res.stderr, res.stderr


@pytest.mark.parametrize("args, needles", [
    (["--data_path", "/nonexistent/OCTID"], ["/nonexistent/OCTID"]),
    (["--model", "retfund_mae"], ["retfound_mae"]),
])
def test_bad_input_is_one_clear_error(class_folders, tmp_path, args, needles):
    base = [*TINY_ARGS, "--data_path", class_folders, "--epochs", "1", "--output_dir", tmp_path]
    res = run_cli(base + args)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in res.stderr


def test_wrong_nb_classes_names_both(class_folders, tmp_path):
    res = run_cli([*TINY_ARGS, "--data_path", class_folders, "--nb_classes", "5", "--epochs", "1",
                   "--output_dir", tmp_path])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "3" in res.stderr and "5" in res.stderr


def test_no_finetune_warns_random_init(trained_run):
    assert "random" in (trained_run["proc"].stderr + trained_run["proc"].stdout).lower()


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_checkpoint(trained_run, tmp_path):
    import shutil

    import paddle

    run = tmp_path / "nan"
    shutil.copytree(trained_run["run"], run)
    before = (run / "checkpoint-last.pdparams").read_bytes()
    # a resumed run keeps its config.yaml's LR; without that file the flags decide, and 1e30 diverges
    (run / "config.yaml").unlink()
    res = run_cli([*TINY_ARGS, "--data_path", trained_run["data"], "--nb_classes", "3", "--epochs", "4",
                   "--lr", "1e30", "--resume", run / "checkpoint-last.pdparams", "--output_dir", tmp_path,
                   "--task", "nan"])
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "epoch 2" in res.stderr and "step" in res.stderr and "Traceback" not in res.stderr
    assert (run / "checkpoint-last.pdparams").read_bytes() == before
    assert paddle.load(str(run / "checkpoint-last.pdparams"))["epoch"] == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_names_its_path(class_folders, tmp_path, workers):
    bad = os.path.join(class_folders, "train", "b", "b_3.png")
    data = open(bad, "rb").read()
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated PNG
    res = run_cli([*TINY_ARGS, "--data_path", class_folders, "--epochs", "1", "--num_workers", workers,
                   "--output_dir", tmp_path], timeout=120)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "b_3.png" in res.stderr
    assert "Traceback" not in res.stderr


def test_finetune_from_mae_checkpoint_name_in_weights_dir(class_folders, tmp_path):
    """--finetune NAME finds weights_dir/NAME.pdparams holding an MAE-layout checkpoint (encoder + norm +
    decoder + mask_token, no head/fc_norm, trained at 32 px), loads it at 48 px and trains."""
    import paddle

    from models import create_model

    enc = {k: v.numpy() for k, v in create_model("vit_test", num_classes=3, input_size=32).state_dict().items()
           if not k.startswith(("head.", "fc_norm."))}
    d = enc["cls_token"].shape[-1]
    enc.update({"norm.weight": np.ones(d, np.float32), "norm.bias": np.zeros(d, np.float32),
                "mask_token": np.zeros((1, 1, 16), np.float32), "decoder_embed.weight": np.ones((d, 16), np.float32),
                "decoder_embed.bias": np.zeros(16, np.float32), "decoder_pos_embed": np.zeros((1, 5, 16), np.float32)})
    weights = tmp_path / "weights"
    weights.mkdir()
    paddle.save({"model": enc, "epoch": 799}, str(weights / "RETFound_mae_tiny.pdparams"))
    res = run_cli([*TINY_ARGS, "--data_path", class_folders, "--epochs", "1", "--input_size", "48",
                   "--finetune", "RETFound_mae_tiny", "--weights_dir", weights, "--output_dir", tmp_path])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "RETFound_mae_tiny.pdparams" in out and "decoder" in out and "mask_token" in out
    assert "random init" not in res.stderr


def test_missing_weights_name_says_where_it_looked(class_folders, tmp_path):
    res = run_cli([*TINY_ARGS, "--data_path", class_folders, "--epochs", "1", "--finetune", "RETFound_mae_meh",
                   "--weights_dir", tmp_path / "w", "--output_dir", tmp_path])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert str(tmp_path / "w" / "RETFound_mae_meh.pth") in res.stderr and "models.convert" in res.stderr


def test_amp_on_cpu_is_reported_off(trained_run, tmp_path):
    res = run_cli([*TINY_ARGS, "--data_path", trained_run["data"], "--epochs", "1", "--amp", "--output_dir", tmp_path])
    assert res.returncode == 0, res.stderr[-2000:]
    assert sum("AMP: off" in line for line in res.stdout.splitlines()) == 1


def test_visualdl_records_loss_and_lr_per_step_and_val_metrics(trained_run):
    from visualdl import LogReader

    run = trained_run["run"]
    record = [n for n in os.listdir(run) if n.startswith("vdlrecords")][0]
    reader = LogReader(file_path=str(run / record))
    tags = reader.get_tags()["scalar"]
    assert {"train/loss", "train/lr", "val/roc_auc", "val/f1", "val/kappa", "val/score"} <= set(tags)
    steps = [r.id for r in reader.get_data("scalar", "train/loss")]
    assert steps == list(range(1, 13))  # 24 train images / batch 4 = 6 optimizer steps x 2 epochs
    lrs = [r.value for r in reader.get_data("scalar", "train/lr")]
    assert len(set(lrs)) > 6  # per-iteration schedule, not a constant
    assert len(reader.get_data("scalar", "val/roc_auc")) == 2


def test_reference_command_line_runs_up_to_the_weights_lookup(class_folders, tmp_path):
    """The README's RETFound command, pasted with python for torchrun (data and class count swapped for the
    synthetic set): every flag is accepted and the absent weights are reported helpfully, before the data is
    scanned and ViT-L is built (so the error comes in seconds)."""
    cmd = ("--model RETFound_mae --savemodel --global_pool --batch_size 16 --world_size 1 --epochs 100 --blr 5e-3 "
           "--layer_decay 0.65 --weight_decay 0.05 --drop_path 0.2 --nb_classes 3 --data_path DATA "
           "--input_size 224 --task RETFound_mae_meh-IDRiD --finetune RETFound_mae_meh").split()
    cmd[cmd.index("DATA")] = class_folders
    res = run_cli(cmd + ["--weights_dir", tmp_path / "weights", "--output_dir", tmp_path], cwd=tmp_path)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert "RETFound_mae_meh" in res.stderr and "hugging face" in res.stderr.lower()
    assert "python -m models.convert" in res.stderr
    assert "Model retfound_mae" not in res.stdout and "folder train" not in res.stdout
