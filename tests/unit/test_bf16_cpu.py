"""bfloat16 training on the CPU (``--amp --amp_dtype bfloat16``): what ``select_device`` decides on CPUs with
and without bf16 instructions, and that a bf16 step really runs in lower precision, trains, keeps float32
parameters and stays close to float32 (util/inference.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import paddle
import pytest

import engine_finetune as engine
import util.inference as inference
from helpers import ROOT
from models import create_model
from util.errors import UserError
from util.exported import bf16_support
from util.inference import AmpConfig, select_device

NO_BF16 = bf16_support()
needs_bf16 = pytest.mark.skipif(NO_BF16 is not None, reason=f"bf16 training needs bf16 instructions: {NO_BF16}")
LACKING = "the CPU (Test CPU) has no native bfloat16 instructions (neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo flags)"

# Tolerance of the bf16 loss against float32. bf16 keeps 8 significant bits: each value entering a bf16
# product is rounded by up to 2^-9 relative, so a logit carries errors of order 2^-8 (0.4%) per layer, summed
# over the few layers of the tiny models (and, for training, a few steps on slightly different weights). 2%
# of the loss allows about five such roundings; a float32 path differs by ~1e-6, a broken one by far more.
LOSS_RTOL = 0.02


def _select(monkeypatch, amp, dtype, reason):
    monkeypatch.setattr(inference, "_bf16_support", lambda: reason)
    said = []
    device, config = select_device("cpu", amp, dtype, said.append)
    return device, config, said


# ------------------------------------------------------------------------------------ select_device
def test_bf16_on_a_cpu_with_bf16_enables_cpu_amp(monkeypatch):
    device, config, said = _select(monkeypatch, True, "bfloat16", None)
    assert device == "cpu"
    assert (config.enabled, config.dtype, config.device, config.cpu_bf16) == (True, "bfloat16", "cpu", True)
    assert len(said) == 1 and said[0].startswith("AMP: bfloat16 on the CPU")


def test_bf16_on_a_cpu_without_bf16_is_an_error_that_says_why_and_what_to_do(monkeypatch):
    with pytest.raises(UserError) as err:
        _select(monkeypatch, True, "bfloat16", LACKING)
    msg = str(err.value)
    assert msg.startswith("--amp --amp_dtype bfloat16 on the CPU: ")
    assert "Test CPU" in msg and "avx512_bf16" in msg  # why: the reason bf16_support gives
    assert "slower than float32" in msg and "drop --amp" in msg  # why it is refused, what to do


def test_bf16_on_the_cpu_with_several_processes_is_an_error(monkeypatch):
    monkeypatch.setattr(inference, "get_world_size", lambda: 2)
    with pytest.raises(UserError, match="2 processes were launched.*run a single process"):
        _select(monkeypatch, True, "bfloat16", None)


@pytest.mark.parametrize("reason", [None, LACKING])
def test_float16_amp_on_cpu_stays_off_with_one_line(monkeypatch, reason):
    _, config, said = _select(monkeypatch, True, "float16", reason)
    assert not config.enabled and not config.cpu_bf16
    assert len(said) == 1 and said[0].startswith("AMP: off") and "float32" in said[0]
    # the hint names bf16 only where it can run
    assert ("--amp_dtype bfloat16" in said[0]) == (reason is None)


def test_no_amp_on_cpu_says_nothing(monkeypatch):
    _, config, said = _select(monkeypatch, False, "bfloat16", None)
    assert not config.enabled and said == []


def test_cpu_bf16_autocast_is_not_paddles_gpu_guard():
    # Paddle's dygraph auto_cast on a CPU place warns "amp_guard can only be enabled on CUDAPlace..." and
    # does nothing; the CPU path casts in its static program instead
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with AmpConfig(enabled=True, dtype="bfloat16", device="cpu").autocast():
            pass
    assert not [w for w in caught if "amp_guard" in str(w.message)]


# ------------------------------------------------------------------------------------ training steps
def _vit(seed=0):
    paddle.seed(seed)
    return create_model("vit_test", num_classes=3, drop_path_rate=0.0, input_size=32)


def _batch(n=4, size=32, seed=1):
    rng = np.random.default_rng(seed)
    return (paddle.to_tensor(rng.normal(size=(n, 3, size, size)).astype(np.float32)),
            paddle.to_tensor(rng.integers(0, 3, size=n).astype(np.int64)))


def _losses(model, amp, batches, lr=1e-3):
    opt = paddle.optimizer.AdamW(learning_rate=lr, parameters=model.parameters(), weight_decay=0.05)
    model.train()
    out = []
    for x, y in batches:
        with amp.autocast():
            loss = paddle.nn.functional.cross_entropy(amp.forward(model, x), y)
        out.append(float(loss))
        loss.backward()
        opt.step()
        opt.clear_grad()
    return out


def test_float32_forward_is_the_model_itself():
    model, (x, _) = _vit(), _batch()
    model.eval()
    np.testing.assert_array_equal(AmpConfig().forward(model, x).numpy(), model(x).numpy())


@needs_bf16
def test_bf16_steps_train_close_to_float32_and_keep_float32_parameters():
    batches = [_batch(seed=s) for s in range(3)]
    ref = _losses(_vit(), AmpConfig(), batches)
    model = _vit()
    amp = AmpConfig(enabled=True, dtype="bfloat16", device="cpu")
    got = _losses(model, amp, batches)
    assert all(np.isfinite(got))
    np.testing.assert_allclose(got, ref, rtol=LOSS_RTOL)
    assert got != ref  # rounded somewhere: the bf16 kernels ran
    assert {str(p.dtype) for p in model.parameters()} == {"paddle.float32"}  # checkpoints stay float32
    assert {str(v.dtype) for v in model.state_dict().values()} == {"paddle.float32"}


@needs_bf16
def test_bf16_forward_rounds_like_bf16_and_returns_float32_logits_for_any_batch():
    model, (x, _) = _vit(), _batch(n=4)
    model.eval()
    amp = AmpConfig(enabled=True, dtype="bfloat16", device="cpu")
    ref = model(x).numpy()
    with paddle.no_grad():
        got = amp.forward(model, x)
        three = amp.forward(model, x[:3]).numpy()  # another batch size: the same program (free batch dim)
    assert got.dtype == paddle.float32
    diff = np.abs(got.numpy() - ref).max()
    assert 1e-5 < diff < LOSS_RTOL * np.abs(ref).max()  # not float32, and within bf16's rounding
    np.testing.assert_allclose(three, got.numpy()[:3], atol=1e-2 * np.abs(ref).max())


@needs_bf16
def test_bf16_batchnorm_cnn_trains_a_step():
    # BatchNorm has no bf16 CPU kernel and its inplace op escapes AMP's casts: its input is cast to float32
    paddle.seed(0)
    model = create_model("resnet_test", num_classes=3, input_size=32)
    batches = [_batch(seed=s) for s in range(2)]
    got = _losses(model, AmpConfig(enabled=True, dtype="bfloat16", device="cpu"), batches)
    assert all(np.isfinite(got))


@needs_bf16
def test_engine_trains_and_evaluates_in_bf16():
    class Schedule:
        def adjust(self, optimizer, e):
            return optimizer.get_lr()

    model = _vit()
    amp = AmpConfig(enabled=True, dtype="bfloat16", device="cpu")
    loader = [_batch(seed=s) for s in range(2)]
    opt = paddle.optimizer.AdamW(learning_rate=1e-3, parameters=model.parameters())
    stats, steps = engine.train_one_epoch(model, paddle.nn.functional.cross_entropy, loader, opt, 0,
                                          schedule=Schedule(), amp=amp)
    assert steps == 2 and np.isfinite(stats["loss"])
    task = engine.get_task("single_label")
    metrics, y_true, outputs = engine.evaluate(model, loader, task, 3, amp=amp)
    ref, _, ref_out = engine.evaluate(model, loader, task, 3)
    assert outputs.shape == (8, 3) and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-5)
    assert abs(metrics["val_loss"] - ref["val_loss"]) < LOSS_RTOL * ref["val_loss"]
    assert model.training  # evaluate hands the model back in train mode


@needs_bf16
@pytest.mark.slow  # a child process
def test_bf16_with_frozen_layers_does_not_crash():
    # oneDNN's bf16 matmul_grad writes both gradients: a trainable head on frozen features (dx unwanted) used to
    # end the process with a segmentation fault, so the check runs in a child process
    code = textwrap.dedent("""
        import numpy as np, paddle
        from models import create_model
        from util.inference import AmpConfig
        paddle.seed(0)
        model = create_model("vit_test", num_classes=3, drop_path_rate=0.0, input_size=32)
        for name, p in model.named_parameters():
            p.stop_gradient = not name.startswith("head")
        amp = AmpConfig(enabled=True, dtype="bfloat16", device="cpu")
        x = paddle.to_tensor(np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype("float32"))
        loss = paddle.nn.functional.cross_entropy(amp.forward(model, x), paddle.to_tensor([0, 1, 2, 0]))
        loss.backward()
        print("grads", sum(p.grad is not None for p in model.parameters()))
    """)
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "grads 2" in done.stdout  # the head's weight and bias, nothing frozen
