"""Matching a checkpoint's classes to evaluation data; macro averages over the classes present; the
constant-output warning; what a resume may change."""
from __future__ import annotations

import argparse

import numpy as np
import paddle
import pytest

import util.run_config as rc
from util.errors import UserError
from util.metrics.common import constant_output_warning
from util.metrics.single_label import compute_metrics


class _Data:
    def __init__(self, task_type, class_names, targets):
        self.task_type, self.class_names, self.targets = task_type, list(class_names), np.asarray(targets)


def _meta(names):
    return {"class_names": list(names), "inference": {}}


def test_single_label_subset_is_relabelled_into_the_checkpoints_indices(monkeypatch):
    monkeypatch.setattr(rc, "checkpoint_meta", lambda path: _meta(["dme", "normal", "cnv", "drusen"]))
    ds = _Data("single_label", ["cnv", "normal"], [0, 1, 1, 0])  # the data's own indices: cnv 0, normal 1
    lines = []
    got = rc.eval_classes({"test": ds}, "x.pdparams", "ext", lines.append)
    assert ds.targets.tolist() == [2, 1, 1, 2] and ds.class_names == ["dme", "normal", "cnv", "drusen"]
    assert got.macro_over == [1, 2] and got.columns is None and got.num_classes == 4
    assert "absent: dme, drusen" in lines[0]


def test_multi_label_subset_keeps_the_output_columns_and_thresholds(monkeypatch):
    monkeypatch.setattr(rc, "checkpoint_meta", lambda path: _meta(["dr", "amd", "glaucoma"]))
    ds = _Data("multi_label", ["glaucoma", "dr"], [[1, 0], [0, 1]])
    got = rc.eval_classes({"test": ds}, "x.pdparams", "ext", lambda s: None)
    assert got.columns == [2, 0] and got.class_names == ["glaucoma", "dr"]
    model, thr, names, k = got.apply(paddle.nn.Identity(), [0.1, 0.2, 0.3])
    assert thr == [0.3, 0.1] and names == ["glaucoma", "dr"] and k == 2
    out = model(paddle.to_tensor([[1.0, 2.0, 3.0]])).numpy()
    assert out.tolist() == [[3.0, 1.0]]


def test_same_classes_change_nothing_and_unknown_ones_are_an_error(monkeypatch):
    monkeypatch.setattr(rc, "checkpoint_meta", lambda path: _meta(["a", "b"]))
    assert rc.eval_classes({"test": _Data("single_label", ["a", "b"], [0, 1])}, "x.pdparams", "d", print) is None
    with pytest.raises(UserError, match=r"classes \['z'\] the checkpoint does not know"):
        rc.eval_classes({"test": _Data("single_label", ["a", "z"], [0, 1])}, "x.pdparams", "d", print)
    with pytest.raises(UserError, match="grades a different scale"):
        rc.eval_classes({"test": _Data("regression", ["a"], [0.0])}, "x.pdparams", "d", print)


def test_macro_averages_over_the_classes_present():
    y = np.array([1, 1, 2, 2, 2])
    probs = np.array([[0.1, 0.8, 0.1, 0.0], [0.3, 0.3, 0.4, 0.0], [0.1, 0.1, 0.8, 0.0], [0.0, 0.2, 0.7, 0.1],
                      [0.6, 0.2, 0.2, 0.0]])
    with pytest.warns(Warning):  # over all four classes, 0 and 3 have no sample: macro AUROC undefined
        assert np.isnan(compute_metrics(y, probs, 4)["roc_auc"])
    sub = compute_metrics(y, probs, 4, classes=[1, 2])
    # by hand: predictions 1, 2, 2, 2, 0; class 1: tp 1 fp 0 fn 1 -> f1 2/3; class 2: tp 2 fp 1 fn 1 -> f1 2/3
    assert sub["f1"] == pytest.approx(2 / 3) and sub["accuracy"] == pytest.approx(3 / 5)
    # AUROC by hand: class 1, positives 0.8, 0.3 vs negatives 0.1, 0.2, 0.2 -> 6/6 pairs; class 2, positives
    # 0.8, 0.7, 0.2 vs negatives 0.1, 0.4 -> 5/6 pairs; the macro over the two present classes 11/12
    assert sub["per_class_auroc"][1] == pytest.approx(1.0) and sub["per_class_auroc"][2] == pytest.approx(5 / 6)
    assert sub["roc_auc"] == pytest.approx(11 / 12)
    assert np.isfinite(sub["score"])


def test_constant_outputs_are_named_and_varied_ones_are_not():
    same = np.tile([[0.2, 0.5, 0.3]], (6, 1))
    assert "same output for all 6 test images" in constant_output_warning(same)[0]
    assert constant_output_warning(same + np.linspace(0, 1e-3, 6)[:, None]) == []
    assert constant_output_warning(same[:1]) == []


def test_a_run_folder_stands_for_its_checkpoint(tmp_path):
    (tmp_path / "checkpoint-best.pdparams").write_bytes(b"")
    assert rc.resolve_checkpoint_path(str(tmp_path), eval_only=True).endswith("checkpoint-best.pdparams")
    with pytest.raises(UserError, match="no checkpoint-last.pdparams .found: checkpoint-best.pdparams"):
        rc.resolve_checkpoint_path(str(tmp_path), eval_only=False)


def test_resume_may_change_the_schedule_length_but_not_the_recipe(tmp_path):
    ckpt = tmp_path / "run" / "checkpoint-last.pdparams"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    saved = {"epochs": 10, "blr": 5e-3, "data_path": "/d", "output_dir": "/elsewhere", "task": "old"}
    cfg = argparse.Namespace(resume=str(ckpt), eval=False, epochs=50, blr=1e-3, data_path=None, output_dir="x",
                             task="")
    rc.restore_run(cfg, {"resume": str(ckpt), "epochs": 50}, saved)
    assert (cfg.epochs, cfg.blr, cfg.data_path) == (50, 5e-3, "/d")
    assert (cfg.output_dir, cfg.task) == (str(tmp_path), "run")  # the folder the checkpoint is in
    with pytest.raises(UserError, match=r"--blr 0.001 \(the run used 0.005\)"):
        rc.restore_run(argparse.Namespace(**{**vars(cfg), "resume": str(ckpt)}), {"blr": 1e-3}, saved)


def test_the_references_dinov2_spelling_names_the_same_model():
    """``--model Dinov2 --model_arch dinov2_vitl14`` (the reference's spelling) is the model a checkpoint records
    as dinov2_vitl14, so it does not clash with it; another arch does."""
    assert rc._same("model", "Dinov2", "dinov2_vitl14", "dinov2_vitl14")
    assert not rc._same("model", "Dinov2", "dinov2_vitl14", "dinov2_vitb14")
    assert rc._same("model", "RETFound_dinov2", "retfound_dinov2")
