"""--eval and --resume take what the checkpoint and its run folder know; flags that contradict them are
errors naming both values; a checkpoint can be scored on data holding a subset of its classes."""
from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

import main_finetune
from helpers import make_class_folders

# a CNN at a non-default input size: what an --eval without flags used to get wrong (ViT-L at 224)
RUN_ARGS = ["--model", "resnet_test", "--input_size", "48", "--batch_size", "4", "--num_workers", "0",
            "--warmup_epochs", "1", "--blr", "1e-2", "--print_freq", "100", "--epochs", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("knows")
    data = make_class_folders(root / "data")
    assert main_finetune.cli([*RUN_ARGS, "--data_path", data, "--output_dir", str(root / "out"), "--task", "r"]) == 0
    return root, data, root / "out" / "r"


def _test_metrics(folder):
    with open(folder / "metrics_test.csv", newline="") as f:
        return list(csv.DictReader(f))[-1]


def _probs(folder):
    with open(folder / "predictions_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return np.array([[float(r[k]) for k in r if k.startswith("prob_")] for r in rows])


def test_eval_takes_model_and_input_size_from_the_checkpoint(run, tmp_path, capsys):
    root, data, folder = run
    ckpt = str(folder / "checkpoint-best.pdparams")
    # nothing but the checkpoint and the data: resnet_test at 48 px, as trained
    assert main_finetune.cli(["--eval", "--resume", ckpt, "--data_path", data, "--num_workers", "0",
                              "--output_dir", str(tmp_path), "--task", "bare"]) == 0
    out = capsys.readouterr().out
    assert "eval: model resnet_test, input 48 px" in out, out
    # the same numbers as an evaluation that spells every flag out
    assert main_finetune.cli(["--eval", "--resume", ckpt, "--data_path", data, "--model", "resnet_test",
                              "--input_size", "48", "--num_workers", "0", "--output_dir", str(tmp_path),
                              "--task", "explicit"]) == 0
    np.testing.assert_allclose(_probs(tmp_path / "bare"), _probs(tmp_path / "explicit"), atol=1e-6)
    assert _test_metrics(tmp_path / "bare")["accuracy"] == _test_metrics(tmp_path / "explicit")["accuracy"]


@pytest.mark.parametrize("flag, value, saved", [("--input_size", 64, 48), ("--model", "vit_test", "resnet_test"),
                                                ("--fundus_crop", "fov", "none")])
def test_eval_flag_that_contradicts_the_checkpoint_is_an_error(run, tmp_path, capsys, flag, value, saved):
    _, data, folder = run
    code = main_finetune.cli(["--eval", "--resume", str(folder / "checkpoint-best.pdparams"), "--data_path", data,
                              flag, str(value), "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{flag} {value!r}" in err and f"the checkpoint's is {saved!r}" in err, err
    assert "Traceback" not in err


def test_eval_of_a_run_folder_uses_its_best_checkpoint_and_its_data(run, tmp_path, capsys):
    _, data, folder = run
    assert main_finetune.cli(["--eval", "--resume", str(folder), "--num_workers", "0", "--output_dir", str(tmp_path),
                              "--task", "folder"]) == 0
    out = capsys.readouterr().out
    assert f"eval: the run's data {data}" in out, out
    np.testing.assert_allclose(_probs(tmp_path / "folder"), _probs(folder), atol=1e-6)


def test_resume_alone_continues_the_run_with_its_config(run, tmp_path, capsys):
    root, _, folder = run
    copy = tmp_path / "out" / "r"
    shutil.copytree(folder, copy)
    # only the checkpoint and a longer schedule: data, model, input size and the run folder come from the run
    assert main_finetune.cli(["--resume", str(copy / "checkpoint-last.pdparams"), "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "resume: the run's config from" in out and "Resumed from" in out, out
    with open(copy / "metrics_val.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)][-1] == "2"  # the third epoch was trained, in that folder
    assert f"outputs: {copy}" in out


@pytest.mark.parametrize("flag, value", [("--blr", 0.5), ("--input_size", 64), ("--model", "vit_test")])
def test_resume_with_a_flag_that_changes_the_run_is_an_error(run, tmp_path, capsys, flag, value):
    _, _, folder = run
    code = main_finetune.cli(["--resume", str(folder / "checkpoint-last.pdparams"), flag, str(value)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{flag} {value!r} (the run used" in err and "--epochs" in err, err


def test_eval_on_a_subset_of_the_checkpoints_classes(run, tmp_path, capsys):
    root, data, folder = run
    sub = tmp_path / "sub"
    for cls in ("a", "c"):  # class b absent
        shutil.copytree(f"{data}/test/{cls}", sub / "test" / cls)
    ckpt = str(folder / "checkpoint-best.pdparams")
    assert main_finetune.cli(["--eval", "--resume", ckpt, "--data_path", str(sub), "--num_workers", "0",
                              "--output_dir", str(tmp_path), "--task", "subset"]) == 0
    out = capsys.readouterr().out
    assert "holds 2 of the checkpoint's 3 classes" in out and "absent: b" in out, out
    # the labels are the checkpoint's indices (a -> 0, c -> 2), the outputs its three classes
    with open(tmp_path / "subset" / "predictions_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["label"] for r in rows}) == ["0", "2"]
    assert [k for k in rows[0] if k.startswith("prob_")] == ["prob_a", "prob_b", "prob_c"]
    # each image keeps the probabilities it has in the run's own test evaluation
    with open(folder / "predictions_test.csv", newline="") as f:
        full = {r["file"].split("/")[-1]: r for r in csv.DictReader(f)}
    assert len(rows) == 10 and len(full) == 15
    for r in rows:
        for k in ("prob_a", "prob_b", "prob_c"):
            assert float(r[k]) == pytest.approx(float(full[r["file"].split("/")[-1]][k]), abs=1e-6)
    m = _test_metrics(tmp_path / "subset")
    assert np.isfinite(float(m["roc_auc"])), m  # over a and c: both have positives and negatives


def test_a_class_the_checkpoint_does_not_know_is_an_error(run, tmp_path, capsys):
    _, data, folder = run
    sub = tmp_path / "sub"
    shutil.copytree(f"{data}/test/a", sub / "test" / "a")
    shutil.copytree(f"{data}/test/b", sub / "test" / "zebra")
    code = main_finetune.cli(["--eval", "--resume", str(folder / "checkpoint-best.pdparams"), "--data_path", str(sub),
                              "--num_workers", "0", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "has classes ['zebra'] the checkpoint does not know" in err, err
