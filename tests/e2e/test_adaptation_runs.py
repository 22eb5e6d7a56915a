"""--adaptation lp / lora / lp --lp_cached_features and --dataratio through main_finetune.py, on a tiny ViT
started from a checkpoint (--finetune), so every weight's starting value is known: what a run's checkpoints
hold is compared with it key by key."""
from __future__ import annotations

import csv
import os

import numpy as np
import paddle

import engine_finetune
import main_finetune
from helpers import TINY_ARGS, make_checkpoint, run_cli
from models import create_model
from models.checkpoint_io import read_checkpoint
from models.pretrained import load_state_dict_strict
from util.adaptation import LORA_KEYS, add_lora, merged_state_dict

HEAD = ("head.weight", "head.bias")


def _args(data, out, task, source, *extra, epochs=2):
    return [*TINY_ARGS, "--data_path", data, "--nb_classes", "3", "--epochs", str(epochs), "--output_dir", str(out),
            "--task", task, "--finetune", source, *extra]


def _source(tmp_path):
    return make_checkpoint(tmp_path / "source.pdparams", model="vit_test", input_size=32, seed=3)


def _model(path):
    return {k: np.asarray(v) for k, v in read_checkpoint(str(path))["model"].items()}


def _rows(path):
    with open(path, encoding="utf8", newline="") as f:
        return list(csv.DictReader(f))


def _plain(state):
    model = create_model("vit_test", num_classes=3, input_size=32)
    load_state_dict_strict(model, state, "checkpoint")  # every key of the plain model, nothing more
    model.eval()
    return model


def test_lp_run_changes_the_head_only(class_folders, tmp_path):
    source = _source(tmp_path)
    assert main_finetune.cli(_args(class_folders, tmp_path, "lp", source, "--adaptation", "lp")) == 0
    start, state = _model(source), read_checkpoint(str(tmp_path / "lp" / "checkpoint-last.pdparams"))
    last = {k: np.asarray(v) for k, v in state["model"].items()}
    assert set(last) == set(start)
    assert [k for k in start if not np.array_equal(start[k], last[k])] == ["head.weight", "head.bias"]
    # the optimizer held the head alone: its state names no other parameter
    assert {k.split("::")[0] for k in state["optimizer"] if "::" in k} == set(HEAD)


def test_lora_run_resumes_exactly_and_saves_a_merged_best_checkpoint(class_folders, tmp_path, monkeypatch):
    source = _source(tmp_path)
    lora = ["--adaptation", "lora", "--lora_rank", "2", "--lora_alpha", "4", "--lora_dropout", "0.1"]
    assert main_finetune.cli(_args(class_folders, tmp_path, "full", source, *lora, epochs=3)) == 0

    real_evaluate, calls = engine_finetune.evaluate, {"n": 0}

    def crash_in_second_validation(*a, **k):
        if k.get("header") == "Val":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(engine_finetune, "evaluate", crash_in_second_validation)
    assert main_finetune.cli(_args(class_folders, tmp_path, "part", source, *lora, epochs=3)) == 130
    monkeypatch.setattr(engine_finetune, "evaluate", real_evaluate)
    part = tmp_path / "part" / "checkpoint-last.pdparams"
    assert main_finetune.cli(["--resume", str(part)]) == 0

    full, resumed = _model(tmp_path / "full" / "checkpoint-last.pdparams"), _model(part)
    assert set(full) == set(resumed)
    for k in full:
        np.testing.assert_allclose(resumed[k], full[k], atol=1e-6, err_msg=k)
    # checkpoint-last keeps the adapters; only they and the head moved away from the starting weights
    start = _model(source)
    adapters = {k for k in full if k.rsplit(".", 1)[-1] in LORA_KEYS}
    assert len(adapters) == 8 and set(full) == set(start) | adapters
    assert {k for k in start if not np.array_equal(start[k], full[k])} == set(HEAD)
    # checkpoint-best is the plain model: the plain architecture loads it strictly
    best = _model(tmp_path / "full" / "checkpoint-best.pdparams")
    assert set(best) == set(start)
    assert np.abs(best["blocks.1.attn.qkv.weight"] - start["blocks.1.attn.qkv.weight"]).max() > 0
    _plain(best)
    # the adapted model of checkpoint-last and its merged plain form compute the same outputs
    adapted = create_model("vit_test", num_classes=3, input_size=32)
    add_lora(adapted, 2, 4.0, 0.1)
    load_state_dict_strict(adapted, full, "checkpoint-last")
    adapted.eval()
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype("float32"))
    np.testing.assert_allclose(_plain(merged_state_dict(adapted))(x).numpy(), adapted(x).numpy(), atol=1e-5)


def test_cached_feature_lp_writes_a_full_checkpoint_that_eval_scores_the_same(class_folders, tmp_path, capsys):
    source = _source(tmp_path)
    args = _args(class_folders, tmp_path, "cached", source, "--adaptation", "lp", "--lp_cached_features",
                 "--blr", "0.5", epochs=6)
    assert main_finetune.cli(args) == 0
    out = capsys.readouterr().out
    assert "frozen features of train 24, val 12 images (32-d" in out
    run = tmp_path / "cached"
    assert [r["epoch"] for r in _rows(run / "metrics_val.csv")] == [str(e) for e in range(6)]
    start, best = _model(source), _model(run / "checkpoint-best.pdparams")
    assert set(best) == set(start)
    assert [k for k in start if not np.array_equal(start[k], best[k])] == list(HEAD)
    saved = read_checkpoint(str(run / "checkpoint-best.pdparams"))
    assert saved["epoch"] == int(_rows(run / "metrics_test.csv")[0]["checkpoint_epoch"])
    assert read_checkpoint(str(run / "checkpoint-last.pdparams"))["epoch"] == 5
    # --eval of the run's checkpoint-best (the full model on the test images) gives the run's test numbers
    assert main_finetune.cli(["--eval", "--resume", str(run), "--output_dir", str(tmp_path), "--task", "ev",
                              "--num_workers", "0"]) == 0
    trained, evaluated = _rows(run / "metrics_test.csv")[0], _rows(tmp_path / "ev" / "metrics_test.csv")[0]
    for k in ("val_loss", "accuracy", "roc_auc", "kappa"):
        assert abs(float(trained[k]) - float(evaluated[k])) < 1e-5, k


def test_dataratio_trains_on_a_stratified_share_of_the_train_split(class_folders, tmp_path, capsys):
    args = _args(class_folders, tmp_path, "half", _source(tmp_path), "--dataratio", "0.5", "--stratified",
                 epochs=1)
    assert main_finetune.cli(args) == 0
    out = capsys.readouterr().out
    assert "subsampled stratified by class to 12 of 24 samples" in out and "(3 steps each)" in out  # 12 / batch 4
    assert "image check: 39 image files" in out  # 12 train + 12 val + 15 test
    config = (tmp_path / "half" / "config.yaml").read_text()
    assert "dataratio: '0.5'" in config and "stratified: true" in config


def test_a_dataratio_list_runs_once_per_ratio_and_keeps_finished_ratios(class_folders, tmp_path):
    args = _args(class_folders, tmp_path, "sweep", _source(tmp_path), "--dataratio", "0.5,1.0", epochs=1)
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent = tmp_path / "sweep"
    for ratio in ("0.5", "1"):
        sub = parent / f"sweep_ratio{ratio}"
        assert f"dataratio: '{ratio}'" in (sub / "config.yaml").read_text()
        assert (sub / "metrics_test.csv").is_file()
    assert "(3 steps each)" in proc.stdout and "(6 steps each)" in proc.stdout
    rows = _rows(parent / "dataratio_summary.csv")
    assert [(r["ratio"], r["run"], r["status"]) for r in rows] == [("0.5", "sweep_ratio0.5", "done"),
                                                                   ("1", "sweep_ratio1", "done")]
    assert rows[1]["accuracy"] == _rows(parent / "sweep_ratio1" / "metrics_test.csv")[0]["accuracy"]
    stamp = os.path.getmtime(parent / "sweep_ratio1" / "metrics_test.csv")
    again = run_cli(args)  # the same command again: both ratios finished, nothing is trained
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, kept") == 2 and "Start training" not in again.stdout
    assert os.path.getmtime(parent / "sweep_ratio1" / "metrics_test.csv") == stamp
