"""util.exported: a model saved as a static program runs in Paddle Inference with the dygraph model's numbers
(oneDNN on and off), whatever the batch size; an interrupted save leaves nothing; bf16 is offered only on CPUs
with bf16 instructions, and the CPU's flags are read from /proc/cpuinfo."""
from __future__ import annotations

import os

import numpy as np
import paddle
import pytest

from models import create_model
from util import exported
from util.errors import UserError


def _dygraph(model, x):
    with paddle.no_grad():
        return model(paddle.to_tensor(x)).numpy()


@pytest.fixture(scope="module")
def saved_vit(tmp_path_factory):
    paddle.seed(3)
    model = create_model("vit_test", num_classes=4, input_size=32)
    model.eval()
    for p in model.head.parameters():   # logits of order 1 (the head starts near 0): a real comparison
        p.set_value(paddle.randn(p.shape) * 0.5)
    prefix = str(tmp_path_factory.mktemp("vit") / "net")
    exported.save_static(model, prefix, exported.input_shape_of(model, 32))
    return model, prefix


def test_save_static_writes_the_program_and_weights_only(saved_vit):
    _, prefix = saved_vit
    assert sorted(os.listdir(os.path.dirname(prefix))) == ["net.json", "net.pdiparams"]   # no temporary folder


@pytest.mark.parametrize("onednn", [True, False])
def test_paddle_runner_matches_dygraph_at_any_batch_size(saved_vit, onednn):
    model, prefix = saved_vit
    run = exported.paddle_runner(prefix, threads=1, onednn=onednn)
    rng = np.random.default_rng(0)
    for n in (1, 5, 2):   # the program's batch dimension is free
        x = rng.standard_normal([n, 3, 32, 32]).astype(np.float32)
        ref = _dygraph(model, x)
        out = run(x)
        assert out.dtype == np.float32 and out.shape == (n, 4)
        assert np.abs(ref).max() > 0.1
        assert np.abs(out - ref).max() <= 1e-5
    empty = run(np.zeros([0, 3, 32, 32], np.float32))   # Paddle Inference itself crashes the process on it
    assert empty.shape == (0, 4) and empty.dtype == np.float32


class ChannelsFirstNorm(paddle.nn.Layer):
    """ConvNeXt's channels-first LayerNorm: ``x - mean`` read by two ops, one of which can run in place."""

    def __init__(self):
        super().__init__()
        self.weight = self.create_parameter([3], default_initializer=paddle.nn.initializer.Constant(1.5))

    def forward(self, x):
        d = x - x.mean(1, keepdim=True)
        return self.weight[:, None, None] * (d / paddle.sqrt(d.pow(2).mean(1, keepdim=True) + 1e-6))


def test_onednn_keeps_values_that_two_ops_read(tmp_path):
    # With Paddle's inplace_pass, pow(d, 2) overwrote d (handed on by oneDNN's layout op without a copy) before
    # the division read it: the output differed by 12.8; paddle_runner deletes that pass when oneDNN is on.
    paddle.seed(0)
    model = ChannelsFirstNorm()
    model.eval()
    prefix = str(tmp_path / "norm")
    exported.save_static(model, prefix, [None, 3, 8, 8])
    x = np.random.default_rng(0).standard_normal([3, 3, 8, 8]).astype(np.float32) * 2 + 0.5
    out = exported.paddle_runner(prefix, threads=1, onednn=True)(x)
    ref = _dygraph(model, x)
    assert np.abs(ref).max() > 1.0
    assert np.abs(out - ref).max() <= 1e-5


def test_dual_eye_input_shape():
    dual = create_model("dual_resnet_test", num_classes=2, input_size=32)
    single = create_model("resnet_test", num_classes=2, input_size=32)
    assert exported.input_shape_of(dual, 32) == [None, 2, 3, 32, 32]
    assert exported.input_shape_of(single, 48) == [None, 3, 48, 48]


def test_save_static_rejects_a_shape_without_channels(tmp_path):
    with pytest.raises(ValueError, match="input_shape"):
        exported.save_static(create_model("resnet_test", num_classes=2), str(tmp_path / "m"), [None, 32, 32])


def test_an_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    def fail(layer, path, **kw):
        with open(path + ".pdiparams", "wb") as f:   # half a save, then the crash
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(paddle.jit, "save", fail)
    with pytest.raises(KeyboardInterrupt):
        exported.save_static(create_model("resnet_test", num_classes=2, input_size=32), str(tmp_path / "m"),
                             [None, 3, 32, 32])
    assert os.listdir(tmp_path) == []


def test_missing_program_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"m\.json: not found.*export"):
        exported.paddle_runner(str(tmp_path / "m"))


def test_unknown_precision_and_threads(saved_vit):
    _, prefix = saved_vit
    with pytest.raises(UserError, match="fp16"):
        exported.paddle_runner(prefix, precision="fp16")
    with pytest.raises(UserError, match="--threads 0"):
        exported.paddle_runner(prefix, threads=0)


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni {extra}

processor\t: 1
model name\t: second processor, not read
flags\t\t: amx_bf16
"""


def _fake_cpuinfo(monkeypatch, tmp_path, extra=""):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra=extra))
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: real_open(path if f == "/proc/cpuinfo" else f, *a, **k))


def test_cpu_features_from_cpuinfo(monkeypatch, tmp_path):
    _fake_cpuinfo(monkeypatch, tmp_path, "avx512_bf16")
    features = exported.cpu_features()
    assert features["cpu"] == "AMD EPYC 9R14 96-Core Processor"
    assert features["avx2"] and features["avx512f"] and features["avx512_bf16"]
    assert not features["amx_bf16"] and not features["amx_tile"]   # the first processor's flags only
    assert exported.bf16_support(features) is None
    line = exported.describe_cpu(features)
    assert line.startswith("AMD EPYC 9R14 96-Core Processor: sse4_2 avx avx2 fma avx512f") and "(no amx_bf16)" in line


def test_no_bf16_without_the_instructions(monkeypatch, tmp_path):
    _fake_cpuinfo(monkeypatch, tmp_path)
    reason = exported.bf16_support()
    assert "no native bfloat16" in reason and "avx512_bf16" in reason and "AMD EPYC 9R14" in reason
    assert exported.bf16_support({"cpu": "x", "amx_bf16": True}) is None
    assert "could not be read" in exported.bf16_support({"cpu": "unknown"})


def test_bf16_refused_with_the_reason(saved_vit, monkeypatch):
    _, prefix = saved_vit
    monkeypatch.setattr(exported, "bf16_support", lambda: "the CPU has no bf16 (test)")
    with pytest.raises(UserError, match=r"--precision bf16: the CPU has no bf16 \(test\); run with --precision fp32"):
        exported.paddle_runner(prefix, precision="bf16")


def test_bf16_needs_onednn(saved_vit, monkeypatch):
    _, prefix = saved_vit
    monkeypatch.setattr(exported, "bf16_support", lambda: None)
    with pytest.raises(UserError, match="oneDNN"):
        exported.paddle_runner(prefix, precision="bf16", onednn=False)


def test_default_threads(monkeypatch):
    monkeypatch.setattr(exported, "_THREADS_BEFORE_PADDLE", None)   # this module was imported after Paddle
    monkeypatch.setattr(exported, "cores_per_process", lambda: 3)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")   # what Paddle writes at import: not taken as the user's
    assert exported.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert exported.default_threads() == 5
    monkeypatch.setattr(exported, "_THREADS_BEFORE_PADDLE", 1)   # read before Paddle: the user's 1 holds
    assert exported.default_threads() == 1
