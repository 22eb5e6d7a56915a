"""GPU-only paths: AMP with dynamic loss scaling and multi-GPU launch. Skipped, with the reason shown, on a
machine without CUDA (the CPU suite covers the same code with AMP off and gloo processes)."""
from __future__ import annotations

import os
import subprocess
import sys

import paddle
import pytest

from helpers import ROOT, TINY_ARGS, run_cli

N_GPUS = paddle.device.cuda.device_count() if paddle.device.is_compiled_with_cuda() else 0
needs_gpu = pytest.mark.skipif(N_GPUS < 1, reason="needs a CUDA GPU and paddlepaddle-gpu")
needs_two_gpus = pytest.mark.skipif(N_GPUS < 2, reason="needs two CUDA GPUs and paddlepaddle-gpu")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_amp_training_on_gpu(class_folders, tmp_path, dtype):
    res = run_cli([*TINY_ARGS, "--data_path", class_folders, "--epochs", "2", "--device", "gpu", "--amp",
                   "--amp_dtype", dtype, "--clip_grad", "1.0", "--accum_iter", "2", "--output_dir", tmp_path,
                   "--task", "amp"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "AMP: off" not in res.stdout
    info = (tmp_path / "amp" / "run_info.json").read_text()
    assert '"amp": true' in info and '"device": "gpu"' in info
    assert (tmp_path / "amp" / "metrics_test.csv").is_file()


@pytest.mark.gpu
@needs_two_gpus
def test_two_gpu_launch(class_folders, tmp_path):
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--gpus", "0,1", "--log_dir", str(tmp_path / "log"),
           os.path.join(ROOT, "main_finetune.py"), *TINY_ARGS, "--data_path", class_folders, "--epochs", "1",
           "--device", "gpu", "--amp", "--output_dir", str(tmp_path), "--task", "ddp"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:]
    assert '"world_size": 2' in (tmp_path / "ddp" / "run_info.json").read_text()
