"""models/cpu_kernels.py: the compiled GELU, LayerNorm, softmax, bias-add (with a residual, or fused with GELU),
attention and depthwise-convolution kernels against Paddle's own.

Every kernel is checked against Paddle's kernels on the same inputs: the forward against Paddle's float32
result (within 1e-6, or exactly where the kernel is Paddle's or an exact add), the gradients against Paddle's
float64 result (the kernel must be at least about as accurate as Paddle's float32 gradient is). The fallbacks
(turned off, no compiler) run in a child interpreter, which decides for itself.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from models import cpu_kernels

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

needs_build = pytest.mark.skipif(cpu_kernels._load() is None and not os.environ.get("CI"),
                                 reason=f"the kernels did not build here: {cpu_kernels.status()}")


def _run(fn, arrays, dtype, grad):
    """Output and input gradients of ``fn`` on ``arrays`` cast to ``dtype``, backpropagating ``grad``."""
    ins = [paddle.to_tensor(a.astype(dtype), stop_gradient=False) for a in arrays]
    out = fn(*ins)
    out.backward(paddle.to_tensor(grad.astype(dtype)))
    return out.numpy().astype(np.float64), [i.grad.numpy().astype(np.float64) for i in ins]


def _max_rel(a, ref):
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def _channels_first_plain(x, w, b, eps):
    """PaddleClas ConvNeXt's ``ChannelsFirstLayerNorm.forward``, as Paddle ops."""
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    return w[:, None, None] * ((x - u) / paddle.sqrt(s + eps)) + b[:, None, None]


CASES = {
    "gelu": (lambda x: cpu_kernels.gelu(x), lambda x: F.gelu(x, approximate=False),
             lambda rng: [rng.standard_normal((3, 37, 256)) * 3], 1e-6),
    "layer_norm": (lambda x, w, b: cpu_kernels.layer_norm(x, w, b, 1e-6),
                   lambda x, w, b: F.layer_norm(x, [x.shape[-1]], w, b, 1e-6),
                   lambda rng: [rng.standard_normal((2, 51, 192)) * 4 + 2, rng.standard_normal(192),
                                rng.standard_normal(192)], 1e-6),
    "patch_embed": (lambda x, w, b: cpu_kernels.patch_embed(x, w, b),
                    lambda x, w, b: F.conv2d(x, w, b, stride=4).flatten(2).transpose([0, 2, 1]),
                    lambda rng: [rng.standard_normal((2, 3, 16, 12)), rng.standard_normal((40, 3, 4, 4)) * 0.2,
                                 rng.standard_normal(40)], 1e-6),
    "softmax": (lambda x: cpu_kernels.softmax(x), lambda x: F.softmax(x, axis=-1),
                lambda rng: [rng.standard_normal((2, 3, 50, 50)) * 5], 1e-6),
    "bias_add": (lambda x, b: cpu_kernels.bias_add(x, b), lambda x, b: x + b,
                 lambda rng: [rng.standard_normal((4, 33, 300)), rng.standard_normal(300)], 0.0),
    "bias_residual_add": (lambda x, b, r: cpu_kernels.bias_add(x, b, r), lambda x, b, r: r + (x + b),
                          lambda rng: [rng.standard_normal((4, 33, 300)), rng.standard_normal(300),
                                       rng.standard_normal((4, 33, 300))], 0.0),
    "linear_gelu": (lambda x, w, b: cpu_kernels.linear_gelu(x, w, b),
                    lambda x, w, b: F.gelu(paddle.matmul(x, w) + b, approximate=False),
                    lambda rng: [rng.standard_normal((3, 29, 48)), rng.standard_normal((48, 200)) * 0.3,
                                 rng.standard_normal(200)], 1e-6),
    "channels_first_layer_norm": (lambda x, w, b: cpu_kernels.channels_first_layer_norm(x, w, b, 1e-6),
                                  lambda x, w, b: _channels_first_plain(x, w, b, 1e-6),
                                  lambda rng: [rng.standard_normal((3, 24, 5, 7)) * 2 + 1, rng.standard_normal(24),
                                               rng.standard_normal(24)], 1e-6),
    "depthwise_conv_7x7": (lambda x, w, b: cpu_kernels.depthwise_conv(x, w, b),
                           lambda x, w, b: F.conv2d(x, w, b, padding=3, groups=x.shape[1]),
                           lambda rng: [rng.standard_normal((2, 6, 13, 11)), rng.standard_normal((6, 1, 7, 7)),
                                        rng.standard_normal(6)], 1e-5),
    "depthwise_conv_3x3_tiny_map": (lambda x, w, b: cpu_kernels.depthwise_conv(x, w, b),
                                    lambda x, w, b: F.conv2d(x, w, b, padding=1, groups=x.shape[1]),
                                    lambda rng: [rng.standard_normal((3, 4, 2, 5)), rng.standard_normal((4, 1, 3, 3)),
                                                 rng.standard_normal(4)], 1e-5),
    "depthwise_conv_5x5_no_bias": (lambda x, w: cpu_kernels.depthwise_conv(x, w, None),
                                   lambda x, w: F.conv2d(x, w, None, padding="SAME", groups=x.shape[1]),
                                   lambda rng: [rng.standard_normal((2, 5, 9, 9)), rng.standard_normal((5, 1, 5, 5))],
                                   1e-5),
}


@needs_build
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_paddles_forward_and_is_as_accurate_in_backward(name):
    ours, plain, make, fwd_tol = CASES[name]
    rng = np.random.default_rng(1)
    arrays = make(rng)
    x = paddle.to_tensor(arrays[0].astype(np.float32))
    assert cpu_kernels.applies(x)
    grad = rng.standard_normal(plain(*[paddle.to_tensor(a.astype(np.float32)) for a in arrays]).shape)
    y, g = _run(ours, arrays, np.float32, grad)
    y_pd, g_pd = _run(plain, arrays, np.float32, grad)
    y64, g64 = _run(plain, arrays, np.float64, grad)
    assert np.abs(y - y_pd).max() <= fwd_tol
    assert _max_rel(y, y64) < 1e-6
    for ours_g, paddle_g, exact in zip(g, g_pd, g64):
        # at least about as accurate as Paddle's float32 gradient, and within 2e-6 of float64 in any case
        assert _max_rel(ours_g, exact) <= max(2 * _max_rel(paddle_g, exact), 2e-6)


def _plain_attention(heads):
    def run(qkv):
        B, N, C3 = qkv.shape
        q, k, v = qkv.reshape([B, N, 3, heads, C3 // (3 * heads)]).unbind(2)
        scale = (C3 // (3 * heads)) ** -0.5
        attn = F.softmax(paddle.einsum("bnhd,bmhd->bhnm", q * scale, k), axis=-1)
        return paddle.einsum("bhnm,bmhd->bnhd", attn, v).reshape([B, N, C3 // 3])
    return run


@needs_build
@pytest.mark.parametrize("batch,tokens,heads,head_dim", [(2, 50, 3, 16), (1, 197, 2, 64), (3, 7, 1, 24)])
def test_attention_matches_the_plain_formulation(batch, tokens, heads, head_dim):
    """The fused kernel against einsum + softmax + einsum (models/vit.py's plain path): forward within 1e-6,
    gradients about as accurate as Paddle's float32 ones against float64."""
    rng = np.random.default_rng(6)
    qkv = rng.standard_normal((batch, tokens, 3 * heads * head_dim)) * 2
    grad = rng.standard_normal((batch, tokens, heads * head_dim))

    def ours(t):
        out = cpu_kernels.attention(t, heads, head_dim ** -0.5)
        assert out is not None
        return out

    y, (g,) = _run(ours, [qkv], np.float32, grad)
    y_pd, (g_pd,) = _run(_plain_attention(heads), [qkv], np.float32, grad)
    y64, (g64,) = _run(_plain_attention(heads), [qkv], np.float64, grad)
    assert np.abs(y - y_pd).max() <= 1e-6 * max(1.0, np.abs(y64).max())
    assert _max_rel(g, g64) <= max(2 * _max_rel(g_pd, g64), 2e-6)


@needs_build
def test_attention_declines_what_it_does_not_cover():
    x = paddle.ones([2, 5, 12])
    assert cpu_kernels.attention(x.astype("float64"), 2, 0.5) is None      # not float32
    assert cpu_kernels.attention(x, 5, 0.5) is None                        # 12 is not 3 x heads x head_dim
    assert cpu_kernels.attention(x.reshape([2, 5, 3, 4]), 2, 0.5) is None  # not [B, N, 3C]
    with cpu_kernels.suspended():
        assert cpu_kernels.attention(x, 2, 0.5) is None


@needs_build
def test_use_in_switches_only_the_layers_the_kernels_cover_and_keeps_the_parameters():
    from models import create_model

    model = create_model("convnext_test", num_classes=3)
    names = [n for n, _ in model.named_parameters()]
    convs = [m for m in model.sublayers() if isinstance(m, paddle.nn.Conv2D)]
    switched = [m for m in convs if type(m) is cpu_kernels.DepthwiseConv2D]
    assert switched and all(m._groups == m._in_channels and m._kernel_size == [7, 7] for m in switched)
    assert all(type(m) is paddle.nn.Conv2D for m in convs if m._groups == 1)   # stem, downsampling: untouched
    assert cpu_kernels.use_in(model) == 0                                      # nothing left to switch
    assert sum(type(m).__name__ == "FastChannelsFirstLayerNorm" for m in model.sublayers()) == 4   # stem + 3
    assert [n for n, _ in model.named_parameters()] == names
    strided = paddle.nn.Conv2D(4, 4, 3, stride=2, padding=1, groups=4)
    assert cpu_kernels.use_in(strided) == 0 and type(strided) is paddle.nn.Conv2D
    effnet = create_model("efficientnet_test", num_classes=3)
    depthwise = [m for m in effnet.sublayers() if isinstance(m, paddle.nn.Conv2D) and m._groups > 1]
    assert all((type(m) is cpu_kernels.DepthwiseConv2D) == (list(m._stride) == [1, 1]) for m in depthwise)
    assert any(type(m) is cpu_kernels.DepthwiseConv2D for m in depthwise)


@needs_build
def test_gelu_reaches_paddles_values_in_the_tails_and_at_zero():
    x = np.array([-12.0, -6.0, -3.0, -1e-3, 0.0, 1e-30, 1e-3, 3.0, 6.0, 12.0, 80.0], dtype=np.float32)
    ours = cpu_kernels.gelu(paddle.to_tensor(x)).numpy()
    ref = F.gelu(paddle.to_tensor(x.astype(np.float64)), approximate=False).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)


@needs_build
def test_non_contiguous_input_gives_the_contiguous_result():
    rng = np.random.default_rng(2)
    base = paddle.to_tensor(rng.standard_normal((64, 40)).astype(np.float32))
    view = base.transpose([1, 0])
    if view.is_contiguous():  # this build copies on transpose: nothing to check
        pytest.skip("transpose returned a contiguous tensor")
    for fn in (cpu_kernels.gelu, cpu_kernels.softmax):
        np.testing.assert_array_equal(fn(view).numpy(), fn(view.contiguous()).numpy())


@needs_build
@needs_build
def test_linear_gelu_gives_the_bits_of_the_bias_add_and_gelu_kernels_run_one_after_the_other():
    """One sweep instead of two changes nothing: the forward, and the gradients of x, weight and bias, are
    bit-identical to ``gelu(bias_add(x @ w, b))`` on the separate kernels."""
    rng = np.random.default_rng(8)
    arrays = [rng.standard_normal((4, 37, 64)), rng.standard_normal((64, 256)) * 0.2, rng.standard_normal(256)]
    grad = rng.standard_normal((4, 37, 256))
    fused, g_fused = _run(lambda x, w, b: cpu_kernels.linear_gelu(x, w, b), arrays, np.float32, grad)
    apart, g_apart = _run(lambda x, w, b: cpu_kernels.gelu(cpu_kernels.bias_add(paddle.matmul(x, w), b)),
                          arrays, np.float32, grad)
    np.testing.assert_array_equal(fused, apart)
    for a, c in zip(g_fused, g_apart):
        np.testing.assert_array_equal(a, c)


@needs_build
def test_without_autograd_the_kernels_keep_nothing_and_give_the_same_values():
    """Under ``no_grad`` (inference) attention, linear_gelu and bias_add run without a PyLayer (attention keeps
    no weights): the same outputs as with autograd on."""
    rng = np.random.default_rng(9)
    qkv = paddle.to_tensor(rng.standard_normal((2, 50, 3 * 4 * 16)).astype(np.float32))
    x = paddle.to_tensor(rng.standard_normal((2, 50, 32)).astype(np.float32))
    w = paddle.to_tensor(rng.standard_normal((32, 96)).astype(np.float32) * 0.3)
    b = paddle.to_tensor(rng.standard_normal(96).astype(np.float32))
    r = paddle.to_tensor(rng.standard_normal((2, 50, 96)).astype(np.float32))
    calls = {
        "attention": lambda q, *_: cpu_kernels.attention(q, 4, 0.25),
        "linear_gelu": lambda _, x, w, b, r: cpu_kernels.linear_gelu(x, w, b),
        "bias_residual_add": lambda _, x, w, b, r: cpu_kernels.bias_add(paddle.matmul(x, w), b, r),
    }
    for name, call in calls.items():
        ins = [t.detach() for t in (qkv, x, w, b, r)]
        for t in ins:
            t.stop_gradient = False
        with_grad = call(*ins)
        assert not with_grad.stop_gradient, name
        with paddle.no_grad():
            without = call(qkv, x, w, b, r)
        assert without.stop_gradient, name
        np.testing.assert_array_equal(without.numpy(), with_grad.numpy(), err_msg=name)


def _vit_block(drop_path: float, **kw):
    from models.vit import Block
    paddle.seed(3)
    return Block(48, 4, 4.0, drop_path, **kw)


@needs_build
@pytest.mark.parametrize("train", [False, True])
def test_a_vit_block_without_stochastic_depth_adds_its_residuals_in_the_last_layers(train):
    """With no drop path (eval, or a rate of 0) the residual adds ride on proj's and fc2's bias adds: the
    block's output and gradients are bit-identical to x + attn(norm1(x)), then x + mlp(norm2(x))."""
    blk = _vit_block(0.0 if train else 0.1)
    blk.train() if train else blk.eval()
    rng = np.random.default_rng(10)
    x0 = rng.standard_normal((2, 17, 48)).astype(np.float32)

    def grads(fn):
        blk.clear_gradients()
        x = paddle.to_tensor(x0, stop_gradient=False)
        out = fn(x)
        out.backward(paddle.to_tensor(np.cos(np.arange(out.size, dtype=np.float32)).reshape(out.shape)))
        return [out.numpy(), x.grad.numpy()] + [p.grad.numpy() for p in blk.parameters()]

    def apart(x):
        x = x + blk.attn(blk.norm1(x))
        return x + blk.mlp(blk.norm2(x))

    for a, c in zip(grads(blk), grads(apart)):
        np.testing.assert_array_equal(a, c)


@needs_build
def test_a_hook_on_fc1_or_a_layer_scale_takes_the_plain_layers():
    """LoRA and the explanations hook layers; a hooked fc1 must run as its own layer (the hook sees and may
    change its output), and LayerScale blocks keep the scale between branch and residual."""
    from models.vit import Mlp
    paddle.seed(4)
    mlp = Mlp(16, 64)
    x = paddle.to_tensor(np.random.default_rng(11).standard_normal((3, 5, 16)).astype(np.float32))
    plain = mlp(x).numpy()
    handle = mlp.fc1.register_forward_post_hook(lambda layer, inputs, out: out * 2.0)
    hooked = mlp(x).numpy()
    handle.remove()
    np.testing.assert_array_equal(hooked, mlp.fc2(mlp.act(mlp.fc1(x) * 2.0)).numpy())
    assert np.abs(hooked - plain).max() > 1e-3

    blk = _vit_block(0.0, init_values=0.5)
    blk.eval()
    y = paddle.to_tensor(np.random.default_rng(12).standard_normal((2, 9, 48)).astype(np.float32))
    h = y + blk.ls1(blk.attn(blk.norm1(y)))
    np.testing.assert_array_equal(blk(y).numpy(), (h + blk.ls2(blk.mlp(blk.norm2(h)))).numpy())


def test_the_same_inputs_give_the_same_bits_every_call():
    rng = np.random.default_rng(3)
    x = paddle.to_tensor(rng.standard_normal((5, 97, 64)).astype(np.float32), stop_gradient=False)
    w = paddle.to_tensor(rng.standard_normal(64).astype(np.float32), stop_gradient=False)
    b = paddle.to_tensor(rng.standard_normal(64).astype(np.float32), stop_gradient=False)
    seen = []
    for _ in range(3):
        for t in (x, w, b):
            t.clear_grad()
        cpu_kernels.layer_norm(x, w, b, 1e-6).sum().backward()
        seen.append([t.grad.numpy().copy() for t in (x, w, b)])
    for later in seen[1:]:
        for a, c in zip(seen[0], later):
            np.testing.assert_array_equal(a, c)


@needs_build
def test_float64_and_frozen_inputs_take_paddles_kernels_or_pass_no_gradient():
    x64 = paddle.to_tensor(np.ones((2, 3)))
    assert not cpu_kernels.applies(x64)
    np.testing.assert_allclose(cpu_kernels.gelu(x64).numpy(), F.gelu(x64).numpy())
    # frozen weight and bias (a linear probe's backbone): only x gets a gradient, as with Paddle's layer
    rng = np.random.default_rng(4)
    x = paddle.to_tensor(rng.standard_normal((3, 16)).astype(np.float32), stop_gradient=False)
    w = paddle.to_tensor(np.ones(16, np.float32))
    b = paddle.to_tensor(np.zeros(16, np.float32))
    cpu_kernels.layer_norm(x, w, b, 1e-6).sum().backward()
    assert x.grad is not None and w.grad is None and b.grad is None
    np.testing.assert_allclose(x.grad.numpy(), 0.0, atol=1e-5)  # d/dx of sum(LN(x)) with w=1 is zero


@needs_build
def test_paddle_grad_of_some_inputs_needs_the_kernels_suspended():
    """Paddle's ``paddle.grad`` with part of a graph's inputs wants ``None`` from a PyLayer for the inputs not
    asked for, which the PyLayer cannot know; under ``suspended()`` Paddle's kernels run and it works. If a
    Paddle release lifts the restriction, the first half fails and the workaround can go."""
    rng = np.random.default_rng(5)
    x = paddle.to_tensor(rng.standard_normal((3, 16)).astype(np.float32), stop_gradient=False)
    w = paddle.create_parameter([16], "float32")
    b = paddle.create_parameter([16], "float32")
    with pytest.raises(ValueError, match="should return None"):
        paddle.grad(cpu_kernels.layer_norm(x, w, b, 1e-6).square().sum(), x)
    with cpu_kernels.suspended():
        assert not cpu_kernels.applies(x)
        (gx,) = paddle.grad(cpu_kernels.layer_norm(x, w, b, 1e-6).square().sum(), x)
    assert cpu_kernels.applies(x)
    (ref,) = paddle.grad(F.layer_norm(x, [16], w, b, 1e-6).square().sum(), x)
    np.testing.assert_array_equal(gx.numpy(), ref.numpy())


CHILD = r"""
import os, sys
sys.path.insert(0, os.environ["REPO"])
import numpy as np, paddle
from models import cpu_kernels, create_model
print("STATUS", cpu_kernels.status())
paddle.seed(0)
model = create_model("vit_test", num_classes=3, input_size=32)
x = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
loss = model(x).square().mean()
loss.backward()
np.savez(os.environ["OUT"], loss=loss.numpy(), **{n: p.grad.numpy() for n, p in model.named_parameters()})
"""


def _child(tmp_path, name, **env):
    out = tmp_path / f"{name}.npz"
    full = {**os.environ, "REPO": REPO, "OUT": str(out), **env}
    run = subprocess.run([sys.executable, "-c", CHILD], env=full, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    status = next(line for line in run.stdout.splitlines() if line.startswith("STATUS"))
    return status, run.stderr, dict(np.load(out))


@needs_build
def test_a_vit_step_with_and_without_the_kernels_agrees(tmp_path):
    on_status, _, on = _child(tmp_path, "on")
    off_status, off_err, off = _child(tmp_path, "off", RETFOUND_CPU_KERNELS="paddle")
    assert "compiled CPU kernels in use" in on_status
    assert "RETFOUND_CPU_KERNELS=paddle" in off_status and "[cpu kernels]" not in off_err  # asked for: quiet
    assert on.keys() == off.keys() and len(on) > 10
    np.testing.assert_allclose(on["loss"], off["loss"], rtol=1e-6)
    for name in on:
        scale = max(np.abs(off[name]).max(), 1e-12)
        assert np.abs(on[name] - off[name]).max() / scale < 1e-4, name


def test_without_a_compiler_paddles_kernels_run_and_it_says_why(tmp_path):
    status, err, out = _child(tmp_path, "nocc", CC="", PATH=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "c"))
    assert "no C compiler" in status
    assert "[cpu kernels] using Paddle's own CPU kernels (no C compiler" in err
    assert np.isfinite(out["loss"]).all()


def test_a_cache_folder_it_cannot_write_in_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    """(A read-only folder; simulated, since root may write anywhere.)"""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cpu_kernels.tempfile, "mkstemp", refuse)
    cc = cpu_kernels._compiler()
    if cc is None:
        pytest.skip("no C compiler here")
    path, reason = cpu_kernels._build(cc)
    assert path is None and "cannot write in" in reason and "XDG_CACHE_HOME" in reason


def test_a_failing_build_falls_back_with_the_compilers_message(tmp_path):
    fake = tmp_path / "bin" / "gcc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                    "echo 'cpu_kernels.c:1: error: broken compiler' >&2; exit 1\n")
    fake.chmod(0o755)
    status, err, _ = _child(tmp_path, "badcc", CC=str(fake), XDG_CACHE_HOME=str(tmp_path / "c"))
    assert "broken compiler" in status and "broken compiler" in err
    assert not list((tmp_path / "c").rglob("*.so"))  # nothing half-built left in the cache


def test_an_interrupt_inside_a_pylayer_backward_is_a_keyboard_interrupt_again():
    """Paddle turns an exception raised in a PyLayer's backward (a signal handler's KeyboardInterrupt, when
    SIGTERM or Ctrl-C lands there) into an OSError; ``util.cli.interrupt_in_backward`` around the training
    step's backward gives the KeyboardInterrupt back, and leaves other errors as they are."""
    from paddle.autograd import PyLayer

    from util.cli import interrupt_in_backward

    class Interrupted(PyLayer):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, dy):
            raise KeyboardInterrupt

    x = paddle.ones([3])
    x.stop_gradient = False
    with pytest.raises(OSError, match="KeyboardInterrupt"):   # what Paddle does on its own
        Interrupted.apply(x).sum().backward()
    with pytest.raises(KeyboardInterrupt), interrupt_in_backward():
        Interrupted.apply(x).sum().backward()
    with pytest.raises(OSError, match="disk full"), interrupt_in_backward():
        raise OSError("disk full")
