"""An interrupted run resumed from checkpoint-last ends exactly where the uninterrupted run ends."""
from __future__ import annotations

import numpy as np
import paddle

import engine_finetune
import main_finetune
from helpers import TINY_ARGS


def _args(data, out, task):
    return [*TINY_ARGS, "--data_path", data, "--nb_classes", "3", "--epochs", "3", "--output_dir", str(out),
            "--task", task, "--drop_path", "0.1", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25"]


def test_resume_after_interruption_matches_uninterrupted(class_folders, tmp_path, monkeypatch):
    assert main_finetune.cli(_args(class_folders, tmp_path, "full")) == 0
    full = paddle.load(str(tmp_path / "full" / "checkpoint-last.pdparams"))

    real_evaluate = engine_finetune.evaluate
    calls = {"n": 0}

    def crash_in_second_validation(*a, **k):
        if k.get("header") == "Val":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # a crash after epoch 0 was checkpointed, during epoch 1
        return real_evaluate(*a, **k)

    monkeypatch.setattr(engine_finetune, "evaluate", crash_in_second_validation)
    assert main_finetune.cli(_args(class_folders, tmp_path, "part")) == 130
    part_ckpt = tmp_path / "part" / "checkpoint-last.pdparams"
    assert paddle.load(str(part_ckpt))["epoch"] == 0
    monkeypatch.setattr(engine_finetune, "evaluate", real_evaluate)

    assert main_finetune.cli(_args(class_folders, tmp_path, "part") + ["--resume", str(part_ckpt)]) == 0
    resumed = paddle.load(str(part_ckpt))
    assert resumed["epoch"] == full["epoch"] == 2
    assert resumed["model"].keys() == full["model"].keys()
    for k in full["model"]:
        np.testing.assert_allclose(resumed["model"][k].numpy(), full["model"][k].numpy(), atol=1e-6, err_msg=k)
    # the val metrics CSV has one row per epoch actually evaluated (0, then 1 and 2 after resuming)
    rows = (tmp_path / "part" / "metrics_val.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3
