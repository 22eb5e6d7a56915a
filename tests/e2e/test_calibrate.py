"""main_finetune.py --calibrate: a temperature fitted on val after training, stored in checkpoint-best and
reported in one line; without the flag nothing of it appears."""
from __future__ import annotations

import csv
import re

import numpy as np
import paddle
import pytest

from helpers import make_class_folders, run_cli

SHORT = ["--model", "resnet_test", "--input_size", "32", "--batch_size", "4", "--num_workers", "0",
         "--warmup_epochs", "0", "--epochs", "2", "--print_freq", "100", "--aa", "none", "--reprob", "0"]
LINE = re.compile(r"^calibration: temperature (\S+) fitted on val \(NLL (\S+) -> (\S+), ECE (\S+) -> (\S+)\)$",
                  re.MULTILINE)


def _test_row(run):
    with open(run / "metrics_test.csv", newline="", encoding="utf8") as f:
        return list(csv.DictReader(f))[-1]


def test_calibrate_stores_the_temperature_and_without_it_nothing_changes(tmp_path):
    data = make_class_folders(tmp_path / "data")
    out = tmp_path / "out"
    res = run_cli(["--data_path", data, *SHORT, "--output_dir", out, "--task", "cal", "--calibrate"])
    assert res.returncode == 0, res.stderr[-3000:]
    found = LINE.findall(res.stdout)
    assert len(found) == 1, res.stdout[-3000:]
    temperature, nll_before, nll_after, ece_before, ece_after = (float(v) for v in found[0])
    assert nll_after <= nll_before + 1e-4 and 0 <= ece_after <= 1 and 0 <= ece_before <= 1
    # the line comes after training, before the test
    assert res.stdout.index("Training time") < res.stdout.index("calibration:") < res.stdout.index("Test on the best")
    state = paddle.load(str(out / "cal" / "checkpoint-best.pdparams"))
    assert state["temperature"] > 0 and f"{state['temperature']:.4g}" == f"{temperature:.4g}"

    res = run_cli(["--data_path", data, *SHORT, "--output_dir", out, "--task", "plain"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "calibration" not in res.stdout
    plain = paddle.load(str(out / "plain" / "checkpoint-best.pdparams"))
    assert "temperature" not in plain
    # the rewritten checkpoint holds the same weights and records; the decisions on test are the same
    assert sorted(plain["model"]) == sorted(state["model"])
    for key in plain["model"]:
        assert np.array_equal(plain["model"][key].numpy(), state["model"][key].numpy()), key
    assert plain["epoch"] == state["epoch"] and plain["val_metrics"] == pytest.approx(state["val_metrics"])
    cal, ref = _test_row(out / "cal"), _test_row(out / "plain")
    for key in ("accuracy", "f1", "kappa"):
        assert float(cal[key]) == float(ref[key]), key
