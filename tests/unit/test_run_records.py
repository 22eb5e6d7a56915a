"""What a run writes about itself: metric names that say their split once (log.txt ``val_loss``, VisualDL
``val/loss``, the console's ``test loss``), the ``epoch`` column of the metrics CSVs (and, for the test, the
tested checkpoint's epoch and a UTC timestamp), and the model-selection counter behind ``--patience``."""
from __future__ import annotations

import csv
import json
import math
import os
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

import main_finetune
from helpers import TINY_ARGS
from util.outputs.checkpoint import load_checkpoint
from util.outputs.plots import _series
from util.outputs.run_log import RunLogger
from util.training import FitOptions, RunState, restore_training

SINGLE_LABEL_COLUMNS = ["val_loss", "accuracy", "f1", "roc_auc", "hamming", "jaccard", "precision", "recall",
                        "average_precision", "kappa", "kappa_quadratic", "score"]


def _csv(path):
    with open(path, newline="", encoding="utf8") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from helpers import make_class_folders

    base = tmp_path_factory.mktemp("records")
    data = make_class_folders(base / "data")
    before = datetime.now(timezone.utc).replace(microsecond=0)
    rc = main_finetune.cli([*TINY_ARGS, "--data_path", data, "--nb_classes", "3", "--epochs", "2",
                            "--output_dir", str(base / "out"), "--task", "t"])
    assert rc == 0
    return {"run": base / "out" / "t", "before": before, "after": datetime.now(timezone.utc)}


def test_log_txt_names_each_metric_once_with_its_split(tiny_run):
    lines = [json.loads(x) for x in (tiny_run["run"] / "log.txt").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]
    for x in lines:
        assert {"train_loss", "train_lr", "val_loss", "val_accuracy", "val_roc_auc", "val_score"} <= set(x)
        assert not [k for k in x if k.startswith("val_val_")], sorted(x)
        assert math.isfinite(x["val_loss"]) and x["val_loss"] > 0


def test_visualdl_val_tags_say_the_split_once(tiny_run):
    from visualdl import LogReader

    run = tiny_run["run"]
    record = [n for n in os.listdir(run) if n.startswith("vdlrecords")][0]
    tags = set(LogReader(file_path=str(run / record)).get_tags()["scalar"])
    assert {"val/loss", "val/roc_auc", "val/score"} <= tags
    assert "val/val_loss" not in tags


def test_metrics_val_csv_has_an_epoch_column(tiny_run):
    rows = _csv(tiny_run["run"] / "metrics_val.csv")
    assert rows[0] == SINGLE_LABEL_COLUMNS + ["epoch"]   # the reference's columns first
    assert [r[-1] for r in rows[1:]] == ["0", "1"]


def test_metrics_test_csv_has_the_epochs_and_a_utc_timestamp(tiny_run):
    rows = _csv(tiny_run["run"] / "metrics_test.csv")
    assert rows[0] == SINGLE_LABEL_COLUMNS + ["epoch", "checkpoint_epoch", "timestamp"]
    assert len(rows) == 2
    row = dict(zip(rows[0], rows[1]))
    best = load_checkpoint(str(tiny_run["run"] / "checkpoint-best.pdparams"))
    assert int(row["epoch"]) == 1                             # the last epoch trained
    assert int(row["checkpoint_epoch"]) == int(best["epoch"])  # the epoch of the weights tested
    stamp = datetime.fromisoformat(row["timestamp"])
    assert stamp.utcoffset() == timedelta(0)                  # UTC, said so in the value
    assert tiny_run["before"] <= stamp <= tiny_run["after"]


def test_format_metrics_says_the_split_once():
    from util.outputs.reports import format_metrics

    stats = {"val_loss": 0.81234, "accuracy": 0.6, "score": 0.25}
    assert format_metrics("test", stats, ["val_loss", "accuracy", "f1", "score"]) == \
        "test loss 0.8123, accuracy 0.6000, score 0.2500"
    # the loss listed twice (--val_metric val_loss among the headline metrics) is printed once
    assert format_metrics("val", stats, ["val_loss", "accuracy", "val_loss"]) == "val loss 0.8123, accuracy 0.6000"


def test_csv_rows_appended_to_an_older_file_keep_its_columns(tmp_path):
    """A run resumed in a folder begun before the epoch column existed appends rows its header describes."""
    old = ["val_loss", "accuracy"]
    (tmp_path / "metrics_val.csv").write_text("val_loss,accuracy\n0.9,0.5\n")
    logger = RunLogger(str(tmp_path))
    try:
        logger.csv_row("metrics_val.csv", old + ["epoch"], {"val_loss": 0.7, "accuracy": 0.6, "epoch": 1})
    finally:
        logger.close()
    assert _csv(tmp_path / "metrics_val.csv") == [old, ["0.9", "0.5"], ["0.7", "0.6"]]


def test_curves_read_log_lines_written_before_and_after_the_rename():
    records = [{"epoch": 0, "val_val_loss": 1.5}, {"epoch": 1, "val_loss": 1.25}]
    assert _series(records, "val_loss", "val_val_loss") == [1.5, 1.25]


@pytest.mark.parametrize("scores, patience, counts, stop_at", [
    ([0.5, 0.4, 0.6, 0.6, 0.55, 0.7], 2, [0, 1, 0, 1, 2, 0], 4),   # equal is not better: 0.6 then 0.6 counts
    ([0.5, 0.4, 0.3], 0, [0, 1, 2], None),                           # 0: never stops
    ([math.nan, -math.inf, 0.1, 0.1], 1, [0, 1, 0, 1], 1),           # a NaN first epoch is kept, then beaten
])
def test_epochs_without_improvement_follow_model_selection(scores, patience, counts, stop_at):
    run = RunState(start_epoch=0)
    got, stops = [], []
    for epoch, score in enumerate(scores):
        improved = run.record(epoch, score)
        assert improved == (run.best_epoch == epoch)
        got.append(run.epochs_without_improvement)
        if run.patience_exhausted(patience):
            stops.append(epoch)
    assert got == counts
    assert (stops[0] if stops else None) == stop_at


def _restore(state):
    training = SimpleNamespace(scaler=None, schedule=None)
    return restore_training(state, training, None, FitOptions(epochs=10, batch_size=4), lambda msg: None)


def test_resume_restores_the_counter_and_the_early_stop():
    run = _restore({"epoch": 5, "best_score": 0.7, "best_epoch": 4, "epochs_without_improvement": 1,
                    "stopped_early": True})
    assert (run.start_epoch, run.best_epoch, run.epochs_without_improvement, run.stopped_early) == (6, 4, 1, True)
    assert run.patience_exhausted(1) and not run.patience_exhausted(2) and not run.patience_exhausted(0)
    # a checkpoint written before the counter existed: every epoch after the best was one without
    run = _restore({"epoch": 5, "best_score": 0.7, "best_epoch": 2})
    assert (run.epochs_without_improvement, run.stopped_early) == (3, False)
