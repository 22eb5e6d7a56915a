"""Checkpoints are written atomically and carry what a resume needs."""
from __future__ import annotations

import gc
import os
import weakref

import numpy as np
import paddle
import pytest

from helpers import assert_same_tree
from util.errors import UserError
from util.outputs import checkpoint as ck


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-last.pdparams")
    ck.atomic_save({"epoch": 1, "model": {}}, path)
    good = open(path, "rb").read()
    real_write = ck.pickle_checkpoint

    def dies_half_way(obj, target, *a, **k):
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "pickle_checkpoint", dies_half_way)
    with pytest.raises(OSError):
        ck.atomic_save({"epoch": 2, "model": {}}, path)
    monkeypatch.setattr(ck, "pickle_checkpoint", real_write)
    assert open(path, "rb").read() == good
    assert os.listdir(tmp_path) == ["checkpoint-last.pdparams"]  # no temporary file left behind
    assert paddle.load(path)["epoch"] == 1


def test_resume_compatibility_lists_every_difference():
    saved = {"model": "vit_test", "nb_classes": 3, "class_names": ["a", "b", "c"], "input_size": 32,
             "global_pool": True, "data_path": "/d", "task_type": "single_label"}
    now = dict(saved, model="resnet_test", input_size=64)
    with pytest.raises(UserError) as e:
        ck.check_resume_compatible(saved, now, "ckpt.pdparams")
    msg = str(e.value)
    assert "model: checkpoint 'vit_test' vs now 'resnet_test'" in msg and "input_size: checkpoint 32 vs now 64" in msg
    ck.check_resume_compatible(saved, dict(saved), "ckpt.pdparams")  # identical: no error


def test_optimizer_state_survives_different_generated_parameter_names(tmp_path):
    from models import create_model
    from util.lr_decay import build_optimizer

    def trained():
        m = create_model("vit_test", num_classes=3, input_size=32)
        opt = build_optimizer(m, lr=1e-3)
        m(paddle.randn([2, 3, 32, 32])).sum().backward()
        opt.step()
        return m, opt

    m1, o1 = trained()
    state = ck.optimizer_state_by_name(o1, m1)
    assert any(k.startswith("blocks.0.attn.qkv.weight::") for k in state)
    m2, o2 = trained()  # a second model in the same process: other generated names
    assert {p.name for p in m1.parameters()}.isdisjoint({p.name for p in m2.parameters()})
    ck.load_optimizer_state_by_name(o2, m2, state)
    after = ck.optimizer_state_by_name(o2, m2)
    k = next(k for k in state if k.startswith("blocks.0.attn.qkv.weight::moment1"))
    assert (after[k].numpy() == state[k].numpy()).all()


def test_checkpoints_are_written_in_paddle_save_format_one_tensor_at_a_time(tmp_path, monkeypatch):
    """save_checkpoint streams its pickle (no memo: a plain pickler keeps every tensor's copy until the end)
    but writes what paddle.save writes: the same values through the restricted reader and paddle.load."""
    from models import create_model
    from models.checkpoint_io import read_checkpoint
    from util.lr_decay import build_optimizer

    paddle.seed(0)
    m = create_model("vit_test", num_classes=3, input_size=32)
    opt = build_optimizer(m, lr=1e-3)
    m(paddle.randn([2, 3, 32, 32])).sum().backward()
    opt.step()

    def save(path):
        ck.save_checkpoint(str(path), model=m, optimizer=opt, epoch=3, best_score=0.25, meta={"model": "vit_test"},
                           extra={"thresholds": [0.5, 0.5, 0.5]})

    save(tmp_path / "ours.pdparams")
    with monkeypatch.context() as mp:  # the reference: every checkpoint as it was written before
        mp.setattr(ck, "pickle_checkpoint", lambda obj, path: paddle.save(obj, path))
        save(tmp_path / "paddle.pdparams")
    ours, ref = (read_checkpoint(str(tmp_path / f), mmap=False) for f in ("ours.pdparams", "paddle.pdparams"))
    assert_same_tree(ref, ours)
    assert len(ours["model"]) == len(m.state_dict()) and len(ours["optimizer"]) == len(opt.state_dict())
    loaded, ref_loaded = paddle.load(str(tmp_path / "ours.pdparams")), paddle.load(str(tmp_path / "paddle.pdparams"))
    for k, v in ref_loaded["model"].items():  # paddle.load gives tensors back, with their names
        assert isinstance(loaded["model"][k], paddle.Tensor) and loaded["model"][k].name == v.name
        np.testing.assert_array_equal(loaded["model"][k].numpy(), v.numpy())

    # no pickle memo: each tensor's copy is freed once written (a plain pickler keeps them all until the end)
    copies = []
    real = ck._CheckpointPickler.reducer_override

    def spy(self, obj):
        out = real(self, obj)
        if out is not NotImplemented:
            copies.append(weakref.ref(out[1][0][1]))
        return out

    monkeypatch.setattr(ck._CheckpointPickler, "reducer_override", spy)
    with open(tmp_path / "spy.pdparams", "wb") as f:
        pickler = ck._CheckpointPickler(f)
        pickler.dump({"model": m.state_dict()})
        gc.collect()
        assert len(copies) == len(m.state_dict()) and not [c for c in copies if c() is not None]
