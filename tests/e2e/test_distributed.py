"""Two CPU processes on the gloo backend: evaluation metrics equal the single-process ones, training runs
data-parallel with the LR scaled by the world size, and only rank 0 writes files."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, TINY_ARGS, make_class_folders, run_cli


def launch(args, log_dir, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir),
           os.path.join(ROOT, "main_finetune.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def worker_logs(log_dir):
    return "\n".join(open(os.path.join(log_dir, f), errors="replace").read()[-3000:]
                     for f in sorted(os.listdir(log_dir)) if f.startswith("workerlog"))


def read_row(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))[-1]


@pytest.mark.slow
def test_two_process_gloo_training_and_exact_evaluation(tmp_path):
    # 7 test images per class: 21 is odd, so a padded sampler would duplicate one and change the metrics
    data = make_class_folders(tmp_path / "data", counts={"train": 8, "val": 3, "test": 7})
    res = launch([*TINY_ARGS, "--data_path", data, "--epochs", "1", "--output_dir", tmp_path / "out",
                  "--task", "ddp"], tmp_path / "log")
    assert res.returncode == 0, res.stdout[-2000:] + worker_logs(tmp_path / "log")
    run = tmp_path / "out" / "ddp"
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 2
    assert info["effective_lr"] == pytest.approx(1e-2 * 4 * 2 / 256)
    assert len((run / "log.txt").read_text().splitlines()) == 1  # rank 1 wrote nothing

    ckpt = run / "checkpoint-best.pdparams"
    single = run_cli([*TINY_ARGS, "--data_path", data, "--eval", "--resume", ckpt, "--output_dir", tmp_path / "s",
                      "--task", "ev"])
    assert single.returncode == 0, single.stderr[-2000:]
    res = launch([*TINY_ARGS, "--data_path", data, "--eval", "--resume", ckpt, "--output_dir", tmp_path / "d",
                  "--task", "ev"], tmp_path / "log2")
    assert res.returncode == 0, worker_logs(tmp_path / "log2")
    one = read_row(tmp_path / "s" / "ev" / "metrics_test.csv")
    two = read_row(tmp_path / "d" / "ev" / "metrics_test.csv")
    for k in set(one) - {"timestamp"}:
        assert float(two[k]) == pytest.approx(float(one[k]), abs=1e-5, nan_ok=True), k
    preds = (tmp_path / "d" / "ev" / "predictions_test.csv").read_text().strip().splitlines()
    assert len(preds) == 1 + 21


@pytest.mark.slow
def test_two_process_dual_eye_multilabel_with_balanced_sampler(tmp_path):
    """Multi-label dual-eye data through 2 gloo processes: the weighted sampler shards one stream, label matrices
    and tuned thresholds survive the gather, and --eval in 2 processes equals 1 process."""
    from fixtures_data import make_odir_table

    table = make_odir_table(tmp_path / "odir", n_patients=21, fmt="csv")
    args = ["--model", "dual_resnet_test", "--input_size", "32", "--batch_size", "2", "--num_workers", "0",
            "--warmup_epochs", "0", "--print_freq", "100", "--data_path", table]
    res = launch([*args, "--epochs", "1", "--balanced_sampler", "--output_dir", tmp_path / "out", "--task", "ddp"],
                 tmp_path / "log")
    assert res.returncode == 0, res.stdout[-2000:] + worker_logs(tmp_path / "log")
    ckpt = tmp_path / "out" / "ddp" / "checkpoint-best.pdparams"
    single = run_cli([*args, "--eval", "--resume", ckpt, "--output_dir", tmp_path / "s", "--task", "ev"])
    assert single.returncode == 0, single.stderr[-2000:]
    res = launch([*args, "--eval", "--resume", ckpt, "--output_dir", tmp_path / "d", "--task", "ev"], tmp_path / "l2")
    assert res.returncode == 0, worker_logs(tmp_path / "l2")
    one = read_row(tmp_path / "s" / "ev" / "metrics_test.csv")
    two = read_row(tmp_path / "d" / "ev" / "metrics_test.csv")
    assert one["f1_macro_tuned"] not in ("", "nan")  # the checkpoint's thresholds were applied
    for k in set(one) - {"timestamp"}:
        assert float(two[k]) == pytest.approx(float(one[k]), abs=1e-5, nan_ok=True), k
