"""Checkpoints are written atomically and carry what a resume needs."""
from __future__ import annotations

import os

import paddle
import pytest

from util.errors import UserError
from util.outputs import checkpoint as ck


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-last.pdparams")
    ck.atomic_save({"epoch": 1, "model": {}}, path)
    good = open(path, "rb").read()
    real_save = paddle.save

    def dies_half_way(obj, target, *a, **k):
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(paddle, "save", dies_half_way)
    with pytest.raises(OSError):
        ck.atomic_save({"epoch": 2, "model": {}}, path)
    monkeypatch.setattr(paddle, "save", real_save)
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
