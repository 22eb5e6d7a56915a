"""``--patience N``: early stopping on the validation metric that picks the best checkpoint.

The runs train the tiny ViT at an LR too small to move a float32 weight, so the validation metrics of every
epoch equal the first epoch's and no later epoch is a new best (model selection wants strictly greater).
"""
from __future__ import annotations

import csv
import json

import main_finetune
from helpers import TINY_ARGS
from util.outputs.checkpoint import load_checkpoint

FROZEN = ["--lr", "1e-30", "--min_lr", "0"]


def _args(data, out, *extra, epochs=4):
    return [*TINY_ARGS, "--data_path", data, "--nb_classes", "3", "--epochs", str(epochs), "--output_dir", str(out),
            "--task", "t", *FROZEN, *extra]


def _log(run):
    return [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]


def _test_row(run):
    with open(run / "metrics_test.csv", newline="", encoding="utf8") as f:
        return list(csv.DictReader(f))[-1]


def _stop_lines(out):
    return [line for line in out.splitlines() if line.startswith("Early stopping")]


def test_patience_stops_after_epochs_without_a_new_best_and_tests_the_best(class_folders, tmp_path, capsys):
    assert main_finetune.cli(_args(class_folders, tmp_path, "--patience", "1")) == 0
    out = capsys.readouterr().out
    run = tmp_path / "t"
    log = _log(run)
    assert [r["epoch"] for r in log] == [0, 1]                     # 4 epochs asked, stopped after epoch 1
    assert log[1]["val_score"] == log[0]["val_score"]              # equal is no improvement
    lines = _stop_lines(out)
    assert len(lines) == 1, out[-2000:]
    assert lines[0].startswith("Early stopping at epoch 1:") and "--patience 1" in lines[0]
    assert f"best score {log[0]['val_score']:.4f} at epoch 0" in lines[0]
    assert "Test on the best checkpoint (epoch 0)" in out
    row = _test_row(run)
    assert (row["epoch"], row["checkpoint_epoch"]) == ("1", "0")
    last = load_checkpoint(str(run / "checkpoint-last.pdparams"))
    assert (last["epoch"], last["epochs_without_improvement"], last["stopped_early"]) == (1, 1, True)


def test_patience_0_trains_every_epoch_and_still_counts(class_folders, tmp_path, capsys):
    assert main_finetune.cli(_args(class_folders, tmp_path, "--patience", "0", epochs=3)) == 0
    out = capsys.readouterr().out
    run = tmp_path / "t"
    assert [r["epoch"] for r in _log(run)] == [0, 1, 2]
    assert not _stop_lines(out)
    last = load_checkpoint(str(run / "checkpoint-last.pdparams"))
    assert (last["epochs_without_improvement"], last["stopped_early"]) == (2, False)


def test_resume_after_an_early_stop_stops_at_once_or_counts_on(class_folders, tmp_path, capsys):
    run = tmp_path / "t"
    last = str(run / "checkpoint-last.pdparams")
    assert main_finetune.cli(_args(class_folders, tmp_path, "--patience", "1")) == 0
    capsys.readouterr()

    # the same patience: nothing more to train, one line says so, and the best checkpoint is tested again
    assert main_finetune.cli(_args(class_folders, tmp_path, "--patience", "1", "--resume", last)) == 0
    out = capsys.readouterr().out
    lines = _stop_lines(out)
    assert len(lines) == 1 and "had already gone 1 epoch(s) without a new best val score" in lines[0], out[-2000:]
    assert "Epoch 2" not in out and [r["epoch"] for r in _log(run)] == [0, 1]
    assert _test_row(run)["checkpoint_epoch"] == "0"

    # a larger patience counts on from the saved state (1 epoch without): epochs 2 and 3 make it 3
    assert main_finetune.cli(_args(class_folders, tmp_path, "--patience", "3", "--resume", last, epochs=8)) == 0
    out = capsys.readouterr().out
    assert "trains on from epoch 2" in out
    lines = _stop_lines(out)
    assert len(lines) == 1 and lines[0].startswith("Early stopping at epoch 3:") and "for 3 epoch(s)" in lines[0]
    assert [r["epoch"] for r in _log(run)] == [0, 1, 2, 3]
    assert (_test_row(run)["epoch"], _test_row(run)["checkpoint_epoch"]) == ("3", "0")
