"""main_finetune.py with the task types, table formats and training options of issue 3: what a user sees
for mistakes, thresholds carried from training to --eval, frozen backbones, per-eye and dual-eye data."""
from __future__ import annotations

import csv
import json

import numpy as np
import paddle
import pytest

from fixtures_data import make_multilabel_csv, make_odir_table
from helpers import make_class_folders, run_cli

SHORT = ["--input_size", "32", "--batch_size", "4", "--num_workers", "0", "--warmup_epochs", "0", "--epochs", "1",
         "--print_freq", "100", "--aa", "none", "--reprob", "0", "--smoothing", "0"]


def last_row(path):
    with open(path, newline="", encoding="utf8") as f:
        return list(csv.DictReader(f))[-1]


def test_unknown_val_metric_lists_the_task_metrics(tmp_path):
    data = make_class_folders(tmp_path / "data")
    res = run_cli(["--data_path", data, "--model", "resnet_test", *SHORT, "--val_metric", "aucroc",
                   "--output_dir", tmp_path / "out"])
    assert res.returncode == 2
    assert "--val_metric 'aucroc': not a single_label metric" in res.stderr and "roc_auc" in res.stderr


def test_options_of_another_task_are_errors(tmp_path):
    data = make_multilabel_csv(tmp_path / "ml", n=30)
    res = run_cli(["--data_path", data, "--model", "resnet_test", *SHORT, "--class_weights",
                   "--output_dir", tmp_path / "out"])
    assert res.returncode == 2 and "--class_weights: applies to single-label" in res.stderr
    res = run_cli(["--data_path", data, "--model", "resnet_test", *SHORT, "--loss", "smooth_l1",
                   "--output_dir", tmp_path / "out"])
    assert res.returncode == 2 and "smooth_l1" in res.stderr and "multi_label" in res.stderr


def test_multilabel_eval_reuses_the_thresholds_tuned_on_val(tmp_path):
    data = make_multilabel_csv(tmp_path / "ml", n=40)
    out = tmp_path / "out"
    res = run_cli(["--data_path", data, "--model", "resnet_test", *SHORT, "--epochs", "2", "--lr", "1e-3",
                   "--pos_weight", "--balanced_sampler", "--output_dir", out, "--task", "ml"])
    assert res.returncode == 0, res.stderr[-3000:]
    run = out / "ml"
    thresholds = json.loads((run / "thresholds.json").read_text())["thresholds"]
    state = paddle.load(str(run / "checkpoint-best.pdparams"))
    assert state["thresholds"] == pytest.approx(thresholds)
    trained = last_row(run / "metrics_test.csv")

    res = run_cli(["--eval", "--resume", run / "checkpoint-best.pdparams", "--data_path", data, "--model",
                   "resnet_test", *SHORT, "--output_dir", out, "--task", "ml_eval"])
    assert res.returncode == 0, res.stderr[-3000:]
    evaluated = last_row(out / "ml_eval" / "metrics_test.csv")
    # the same model, data and thresholds give the same test numbers, tuned columns included
    for k in ("f1_macro", "roc_auc", "f1_macro_tuned", "f1_micro_tuned", "odir_final"):
        assert float(evaluated[k]) == pytest.approx(float(trained[k]), abs=1e-6), k
    assert "test thresholds (tuned on val)" in res.stdout


def test_freeze_backbone_trains_only_the_head(tmp_path):
    data = make_class_folders(tmp_path / "data")
    out = tmp_path / "out"

    def run(flag, task):
        res = run_cli(["--data_path", data, "--model", "resnet_test", *SHORT, "--lr", "1e-2", "--layer_decay", "1",
                       "--output_dir", out, "--task", task, *flag])
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout, paddle.load(str(out / task / "checkpoint-last.pdparams"))["model"]

    stdout, frozen = run(["--freeze_backbone"], "frozen")
    assert "backbone parameter tensors frozen" in stdout
    _, free = run([], "free")
    paddle.seed(0)  # main seeds paddle with --seed (+ rank 0) before it builds the model
    from models import create_model

    init = create_model("resnet_test", num_classes=3, drop_path_rate=0.2, input_size=32)
    params = {n for n, p in init.named_parameters() if not p.stop_gradient}
    head = {n for n in params if n.startswith("backbone.fc.")}
    assert head and len(params) > len(head)
    for n in params:
        start = init.state_dict()[n].numpy()
        moved_frozen = not np.array_equal(frozen[n].numpy(), start)
        moved_free = not np.array_equal(free[n].numpy(), start)
        assert moved_frozen == (n in head), n
        assert moved_free, n  # without the flag every parameter trains (so the init above is the real one)


def test_odir_table_dual_and_per_eye(tmp_path):
    table = make_odir_table(tmp_path / "odir", n_patients=20, fmt="csv")
    out = tmp_path / "out"
    # a single-view model on dual-eye data is refused with the two ways out
    res = run_cli(["--data_path", table, "--model", "resnet_test", *SHORT, "--output_dir", out])
    assert res.returncode == 2 and "dual_" in res.stderr and "--eye_mode per_eye" in res.stderr
    # per-eye: one sample per eye image, labels from the diagnostic keywords
    res = run_cli(["--data_path", table, "--model", "resnet_test", *SHORT, "--eye_mode", "per_eye",
                   "--output_dir", out, "--task", "per_eye"])
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out / "per_eye" / "predictions_test.csv", newline="", encoding="utf8") as f:
        rows = list(csv.DictReader(f))
    assert rows and all("|" not in r["file"] for r in rows)
    assert [k for k in rows[0] if k.startswith("label_")] == [f"label_{c}" for c in "NDGCAHMO"]
    # dual: the same table with a dual-eye model
    res = run_cli(["--data_path", table, "--model", "dual_resnet_test", *SHORT, "--output_dir", out,
                   "--task", "dual"])
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out / "dual" / "predictions_test.csv", newline="", encoding="utf8") as f:
        rows = list(csv.DictReader(f))
    assert rows and all("|" in r["file"] for r in rows)
