"""bash run.sh: presets per dataset, absent datasets skipped with a line, a summary table at the end; the demo
path with a tiny model and one epoch."""
from __future__ import annotations

import os
import subprocess
import sys

from helpers import ROOT, make_class_folders

TINY = ["--model", "vit_test", "--input_size", "32", "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0",
        "--num_workers", "0", "--finetune", "", "--nb_classes", "3"]


def run_sh(args, env_extra, timeout=600):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", **env_extra)
    return subprocess.run(["bash", os.path.join(ROOT, "run.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_benchmark_presets_skip_absent_and_summarise(tmp_path):
    make_class_folders(tmp_path / "data" / "OCTID")
    res = run_sh(["octid", "retina", "--", *TINY],
                 {"DATA_ROOT": str(tmp_path / "data"), "OUTPUT_DIR": str(tmp_path / "out")})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "skipping retina" in res.stdout and "Retina" in res.stdout
    table = res.stdout.split("Test metrics per dataset:")[1].strip().splitlines()
    assert table[0].split()[:4] == ["run", "accuracy", "f1", "roc_auc"]
    row = table[1].split()
    assert row[0] == "RETFound_mae_meh-OCTID" and 0.0 <= float(row[1]) <= 1.0
    # the preset's recipe reached the run (flags after -- override only what they name)
    cfg = (tmp_path / "out" / "RETFound_mae_meh-OCTID" / "config.yaml").read_text()
    assert "layer_decay: 0.65" in cfg and "drop_path: 0.2" in cfg and "model: vit_test" in cfg


def test_unknown_dataset_name_is_an_error(tmp_path):
    res = run_sh(["octdi"], {"DATA_ROOT": str(tmp_path)})
    assert res.returncode == 2 and "unknown dataset 'octdi'" in res.stderr


def test_demo_path_compares_with_published_numbers(tmp_path):
    res = run_sh(["demo", "--", "--model", "resnet_test", "--input_size", "28", "--epochs", "1", "--warmup_epochs", "0",
                  "--num_workers", "0"], {"OUTPUT_DIR": str(tmp_path)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "ResNet-18 (28)             0.717    0.524" in res.stdout
    verdict = [ln for ln in res.stdout.splitlines() if ln.startswith("This run ")]
    assert len(verdict) == 1 and "the published ResNet-18 (28) result" in verdict[0]
    assert (tmp_path / "demo_retinamnist" / "metrics_test.csv").is_file()
