"""Mistakes a user can make on the command line are reported before Paddle is even imported: the check
runs in a process where importing Paddle fails, so any path that reaches Paddle first shows up."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT

_NO_PADDLE = ("import sys; sys.modules['paddle'] = None; sys.path.insert(0, {root!r}); import main_finetune; "
              "sys.exit(main_finetune.cli({args!r}))")


def _run_without_paddle(args):
    return subprocess.run([sys.executable, "-c", _NO_PADDLE.format(root=ROOT, args=list(args))], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, expected", [
    (["--data_path", "d", "--model", "resnet_test", "--finetune", "ResNet18_pretrained.pdparams",
      "--weights_dir", "/nonexistent"], "PaddleClas"),
    (["--data_path", "d", "--finetune", "RETFound_mae_meh", "--weights_dir", "/nonexistent"], "RETFound_mae_meh"),
    (["--data_path", "d", "--epochs", "0"], "--epochs 0"),
    (["--data_path", "d", "--epoch", "3"], "did you mean --epochs"),
])
def test_flag_and_missing_weights_errors_come_before_paddle(args, expected):
    proc = _run_without_paddle(args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
