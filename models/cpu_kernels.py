"""Faster fp32 CPU kernels for the eager step: GELU, LayerNorm, softmax, bias add, attention, depthwise conv.

Paddle 3.3's CPU build runs several kernels of a transformer step on one thread or through slow loops:
LayerNorm's backward is a serial kernel, exact GELU is serial loops around MKL's ``vsErf``, softmax's forward
and backward are slow, the bias gradient of a broadcast add is a slow column reduction, and the attention core
copies every head through transposes. On a 2-core CPU they cost a ViT-B/16 step (batch 4) several hundred ms
against PyTorch (``benchmarks/elementwise_speed.py`` measures each). ``cpu_kernels.c`` (beside this file)
computes the same formulas with vectorised loops over the OpenMP threads Paddle already runs, and the attention
as per-head products with the MKL Paddle itself calls (``cblas_sgemm`` on strided rows: no copies). This module
compiles it once per machine with the system's C compiler, loads it with ``ctypes`` and wraps each kernel in a
``paddle.autograd.PyLayer``; the layers below (``Linear``, ``LayerNorm``, ``GELU``) use them.

Where it applies: eager mode, CPU tensors, float32. Anything else (GPU, bf16/fp16, a static program or an
export, no C compiler, a failed build) takes Paddle's own kernels, so exported models and GPU runs are
unchanged. ``RETFOUND_CPU_KERNELS=paddle`` turns it off. The build goes to
``$XDG_CACHE_HOME/retfound_paddle/cpu_kernels`` (``~/.cache`` by default), keyed by the source, the compiler
and the CPU's flags (it is built for the CPU it runs on: ``-march=native``); a build takes about a second.

Numerics: the forward outputs of GELU, softmax and attention agree with Paddle's kernels within 1e-6
(``erff``/``expf`` from glibc's vector math library instead of MKL's; the attention's products are the same
MKL's); LayerNorm's forward is Paddle's own kernel and the bias add is exact. Gradients follow the same
formulas with row and column sums in double; they differ from Paddle's in the last bits
(``tests/unit/test_cpu_kernels.py`` checks every kernel against Paddle's float32 and float64 results).

One limit: ``paddle.grad`` asked for some of a graph's inputs only (Grad-CAM's features) needs the kernels
``suspended()`` around the forward pass; see there.

References: Paddle's CPU kernels ``paddle/phi/kernels/cpu/layer_norm_grad_kernel.cc``, ``gelu_grad_kernel.cc``,
``softmax_grad_kernel.cc``; glibc's libmvec (``_ZGV*_erff``, glibc 2.35+); the LayerNorm gradient as in
Ba et al. 2016, "Layer Normalization" (arXiv:1607.06450); attention as in Vaswani et al. 2017 (arXiv:1706.03762)
and timm's ``Attention`` (q, k, v laid out [B, N, 3, heads, head_dim]).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

ENV = "RETFOUND_CPU_KERNELS"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.c")
ABI_VERSION = 6
_BASE_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]

_lock = threading.Lock()
_state: dict = {}          # "lib": the loaded library or None, "reason": why not (once decided)

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "rf_abi_version": ([], ctypes.c_int),
    "rf_max_threads": ([], ctypes.c_int),
    "rf_gelu_fwd": ([_ptr, _ptr, _i64], None),
    "rf_gelu_bwd": ([_ptr, _ptr, _ptr, _i64], None),
    "rf_layer_norm_fwd": ([_ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32], None),
    "rf_patchify": ([_ptr, _ptr, _i64, _i64, _i64, _i64, _i64, ctypes.c_int], None),
    "rf_layer_norm_bwd": ([_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32], ctypes.c_int),
    "rf_softmax_fwd": ([_ptr, _ptr, _i64, _i64], None),
    "rf_softmax_bwd": ([_ptr, _ptr, _ptr, _i64, _i64], None),
    "rf_bias_add": ([_ptr, _ptr, _ptr, _ptr, _i64, _i64], None),
    "rf_bias_gelu_fwd": ([_ptr, _ptr, _ptr, _i64, _i64, ctypes.c_int], None),
    "rf_bias_gelu_bwd": ([_ptr, _ptr, _ptr, _ptr, _i64, _i64], ctypes.c_int),
    "rf_column_sum": ([_ptr, _ptr, _i64, _i64], ctypes.c_int),
    "rf_set_sgemm": ([_ptr], None),
    "rf_cf_layer_norm_fwd": ([_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _f32], None),
    "rf_cf_layer_norm_bwd": ([_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64], ctypes.c_int),
    "rf_dwconv_fwd": ([_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64], None),
    "rf_dwconv_bwd": ([_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64], None),
    "rf_attention_fwd": ([_ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _f32], ctypes.c_int),
    "rf_attention_bwd": ([_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _f32], ctypes.c_int),
}


def _cache_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "retfound_paddle", "cpu_kernels")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "gcc", "cc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(cc: str) -> tuple[str | None, str]:
    """Compile ``cpu_kernels.c`` into the cache (atomically: a temporary file renamed into place); returns the
    library's path, or ``None`` and the compiler's complaint."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{cc} --version failed: {e}"
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(_BASE_FLAGS).encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    folder = _cache_dir()
    target = os.path.join(folder, f"cpu_kernels-{key}.so")
    if os.path.exists(target):
        return target, ""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        return None, f"cannot create {folder}: {e}"
    complaint = ""
    # With glibc's vector erff/expf first (glibc >= 2.35), else the scalar ones.
    for extra in (["-DRF_LIBMVEC", "-lmvec"], []):
        try:
            fd, tmp = tempfile.mkstemp(prefix=".cpu_kernels-", suffix=".so", dir=folder)
            os.close(fd)
        except OSError as e:   # a read-only cache folder
            return None, f"cannot write in {folder}: {e}; set XDG_CACHE_HOME to a writable folder"
        try:
            run = subprocess.run([cc, *_BASE_FLAGS, *extra[:1], SOURCE, "-o", tmp, *extra[1:], "-lm"],
                                 capture_output=True, text=True, timeout=300)
            if run.returncode == 0:
                os.replace(tmp, target)
                return target, ""
            complaint = (run.stderr or run.stdout).strip().splitlines()[-1:] or [f"exit {run.returncode}"]
            complaint = complaint[0]
        except (OSError, subprocess.SubprocessError) as e:
            complaint = str(e)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return None, complaint


def _load() -> ctypes.CDLL | None:
    if "lib" in _state:   # decided: no lock on the hot path (every layer call asks)
        return _state["lib"]
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, reason = None, ""
        choice = os.environ.get(ENV, "").strip().lower()
        if choice in ("paddle", "off", "0", "no"):
            reason = f"{ENV}={choice}"
        elif not sys.platform.startswith("linux"):
            reason = "built on Linux only"
        elif (cc := _compiler()) is None:
            reason = "no C compiler (gcc or cc) on PATH"
        else:
            path, reason = _build(cc)
            if path is not None:
                try:
                    lib = ctypes.CDLL(path)
                    for name, (args, res) in _SIGNATURES.items():
                        fn = getattr(lib, name)
                        fn.argtypes, fn.restype = args, res
                    if lib.rf_abi_version() != ABI_VERSION:
                        lib, reason = None, f"{path} is an older build"
                except (OSError, AttributeError) as e:
                    lib, reason = None, f"cannot load {path}: {e}"
        if lib is None and choice not in ("paddle", "off", "0", "no"):
            print(f"[cpu kernels] using Paddle's own CPU kernels ({reason}); set {ENV}=paddle to silence this",
                  file=sys.stderr)
        _state.update(lib=lib, reason=reason)
        return lib


def status() -> str:
    """One line for logs: whether the kernels are in use, and why not."""
    lib = _load()
    return "compiled CPU kernels in use" if lib is not None else f"Paddle's CPU kernels ({_state['reason']})"


_suspended = threading.local()


@contextlib.contextmanager
def suspended():
    """Paddle's own kernels inside the block (this thread). For ``paddle.grad`` with some of a graph's inputs:
    Paddle then wants a ``PyLayer`` to return ``None`` for every input whose gradient was not asked for, and
    a ``PyLayer`` cannot know which those are (Grad-CAM in ``util/explain.py`` runs under this)."""
    before = getattr(_suspended, "on", False)
    _suspended.on = True
    try:
        yield
    finally:
        _suspended.on = before


def applies(x: paddle.Tensor) -> bool:
    """Whether ``x`` takes these kernels: eager mode, a CPU float32 tensor, the library built, not
    ``suspended``."""
    return (paddle.in_dynamic_mode() and x.place.is_cpu_place() and x.dtype == paddle.float32
            and not getattr(_suspended, "on", False) and _load() is not None)


def _dense(x: paddle.Tensor) -> paddle.Tensor:
    return x if x.is_contiguous() else x.contiguous()


def _p(x: paddle.Tensor) -> int:
    return x.data_ptr()


def _wanted(ctx, *grads):
    """The gradients of the inputs that take one; Paddle wants ``None`` for an input with ``stop_gradient``."""
    return tuple(g if w else None for g, w in zip(grads, ctx.wanted))


class _Gelu(PyLayer):
    @staticmethod
    def forward(ctx, x):
        x = _dense(x)
        y = paddle.empty_like(x)
        _state["lib"].rf_gelu_fwd(_p(x), _p(y), x.size)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensor()
        dy = _dense(dy)
        dx = paddle.empty_like(x)
        _state["lib"].rf_gelu_bwd(_p(x), _p(dy), _p(dx), x.size)
        return dx


def _layer_norm_into(x, weight, bias, eps):
    y = paddle.empty_like(x)
    cols = x.shape[-1]
    _state["lib"].rf_layer_norm_fwd(_p(x), _p(weight), _p(bias), _p(y), x.size // cols, cols, float(eps))
    return y


class _LayerNorm(PyLayer):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x = _dense(x)
        ctx.eps = float(eps)
        ctx.wanted = (not x.stop_gradient, not weight.stop_gradient, not bias.stop_gradient)
        ctx.save_for_backward(x, weight)
        return _layer_norm_into(x, weight, bias, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensor()
        dy = _dense(dy)
        cols = x.shape[-1]
        dx = paddle.empty_like(x)
        dw = paddle.empty([cols], dtype=x.dtype)
        db = paddle.empty([cols], dtype=x.dtype)
        if _state["lib"].rf_layer_norm_bwd(_p(x), _p(weight), _p(dy), _p(dx), _p(dw), _p(db),
                                           x.size // cols, cols, ctx.eps):
            raise MemoryError("LayerNorm backward: out of memory for the column sums")
        return _wanted(ctx, dx, dw, db)


class _Softmax(PyLayer):
    @staticmethod
    def forward(ctx, x):
        x = _dense(x)
        y = paddle.empty_like(x)
        cols = x.shape[-1]
        _state["lib"].rf_softmax_fwd(_p(x), _p(y), x.size // cols, cols)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensor()
        dy = _dense(dy)
        dx = paddle.empty_like(y)
        cols = y.shape[-1]
        _state["lib"].rf_softmax_bwd(_p(y), _p(dy), _p(dx), y.size // cols, cols)
        return dx


def _needs_grad(*tensors) -> bool:
    """Whether autograd will ask for a gradient of any of ``tensors`` (else a kernel runs without a ``PyLayer``
    and keeps nothing for a backward pass)."""
    return paddle.is_grad_enabled() and any(t is not None and not t.stop_gradient for t in tensors)


def _column_sum(dy: paddle.Tensor) -> paddle.Tensor:
    cols = dy.shape[-1]
    db = paddle.empty([cols], dtype=dy.dtype)
    if _state["lib"].rf_column_sum(_p(dy), _p(db), dy.size // cols, cols):
        raise MemoryError("bias gradient: out of memory for the column sums")
    return db


def _bias_add_into(x, bias, residual):
    y = paddle.empty_like(x)
    cols = x.shape[-1]
    _state["lib"].rf_bias_add(_p(x), _p(bias), None if residual is None else _p(residual), _p(y),
                              x.size // cols, cols)
    return y


class _BiasAdd(PyLayer):
    @staticmethod
    def forward(ctx, x, bias):
        x = _dense(x)
        ctx.wanted = (not x.stop_gradient, not bias.stop_gradient)
        return _bias_add_into(x, bias, None)

    @staticmethod
    def backward(ctx, dy):
        dy = _dense(dy)
        return _wanted(ctx, dy, _column_sum(dy))


class _BiasResidualAdd(PyLayer):
    @staticmethod
    def forward(ctx, x, bias, residual):
        x, residual = _dense(x), _dense(residual)
        ctx.wanted = (not x.stop_gradient, not bias.stop_gradient, not residual.stop_gradient)
        return _bias_add_into(x, bias, residual)

    @staticmethod
    def backward(ctx, dy):
        dy = _dense(dy)
        return _wanted(ctx, dy, _column_sum(dy), dy)


class _BiasGelu(PyLayer):
    """GELU(h + bias) for a matrix product's output ``h`` that nothing else holds (``linear_gelu``): h + bias
    is written over ``h`` and kept for the backward pass, which also sums the bias gradient in the same sweep."""

    @staticmethod
    def forward(ctx, h, bias):
        y = paddle.empty_like(h)
        cols = h.shape[-1]
        _state["lib"].rf_bias_gelu_fwd(_p(h), _p(bias), _p(y), h.size // cols, cols, 1)
        ctx.wanted = (not h.stop_gradient, not bias.stop_gradient)
        ctx.save_for_backward(h)
        return y

    @staticmethod
    def backward(ctx, dy):
        (z,) = ctx.saved_tensor()
        dy = _dense(dy)
        cols = z.shape[-1]
        dz = paddle.empty_like(z)
        db = paddle.empty([cols], dtype=z.dtype)
        if _state["lib"].rf_bias_gelu_bwd(_p(z), _p(dy), _p(dz), _p(db), z.size // cols, cols):
            raise MemoryError("bias gradient: out of memory for the column sums")
        return _wanted(ctx, dz, db)


def gelu(x: paddle.Tensor) -> paddle.Tensor:
    """Exact (erf) GELU."""
    return _Gelu.apply(x) if applies(x) else F.gelu(x, approximate=False)


def layer_norm(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor, eps: float) -> paddle.Tensor:
    """LayerNorm over the last axis with an affine weight and bias."""
    if applies(x) and weight is not None and bias is not None and weight.dtype == bias.dtype == x.dtype \
            and weight.shape == bias.shape == x.shape[-1:]:
        if not _needs_grad(x, weight, bias):
            return _layer_norm_into(_dense(x), weight, bias, eps)
        return _LayerNorm.apply(x, weight, bias, eps)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def softmax(x: paddle.Tensor) -> paddle.Tensor:
    """Softmax over the last axis."""
    return _Softmax.apply(x) if applies(x) else F.softmax(x, axis=-1)


def bias_add(x: paddle.Tensor, bias: paddle.Tensor, residual: paddle.Tensor | None = None) -> paddle.Tensor:
    """``x + bias`` with ``bias`` over the last axis, or ``residual + (x + bias)`` (the same two roundings)."""
    if applies(x) and bias.dtype == x.dtype and (residual is None or (
            residual.shape == x.shape and residual.dtype == x.dtype and residual.place.is_cpu_place())):
        if not _needs_grad(x, bias, residual):
            return _bias_add_into(_dense(x), bias, None if residual is None else _dense(residual))
        return _BiasAdd.apply(x, bias) if residual is None else _BiasResidualAdd.apply(x, bias, residual)
    return x + bias if residual is None else residual + (x + bias)


def linear_gelu(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor) -> paddle.Tensor | None:
    """Exact ``GELU(x @ weight + bias)`` with the bias add and the GELU in one pass (forward and backward);
    ``None`` where the kernel does not apply (the caller runs its layers)."""
    if bias is None or not applies(x) or weight.dtype != x.dtype or bias.dtype != x.dtype:
        return None
    h = paddle.matmul(x, weight)   # a fresh tensor only this function holds: _BiasGelu may write over it
    if not _needs_grad(h, bias):
        y = paddle.empty_like(h)
        cols = h.shape[-1]
        _state["lib"].rf_bias_gelu_fwd(_p(h), _p(bias), _p(y), h.size // cols, cols, 0)
        return y
    return _BiasGelu.apply(h, bias)


def _sgemm_ready() -> bool:
    """Hands the attention kernel the ``cblas_sgemm`` of the MKL Paddle has loaded (``util/blas.py`` decides
    which; Paddle opens it at its first matrix product, which runs here if none has yet). Decided once."""
    if "sgemm" not in _state:
        from util.blas import loaded_blas

        found = None
        if not loaded_blas():
            paddle.matmul(paddle.ones([2, 2]), paddle.ones([2, 2]))
        for path in loaded_blas():
            try:
                fn = ctypes.CDLL(path).cblas_sgemm
            except (OSError, AttributeError):
                continue
            found = ctypes.cast(fn, ctypes.c_void_p).value
            break
        if found is not None:
            _state["lib"].rf_set_sgemm(found)
        _state["sgemm"] = found is not None
    return _state["sgemm"]


class _Attention(PyLayer):
    @staticmethod
    def forward(ctx, qkv, num_heads, scale, sink):
        qkv = _dense(qkv)
        B, N, C3 = qkv.shape
        C = C3 // 3
        probs = paddle.empty([B, num_heads, N, N], dtype=qkv.dtype)
        out = paddle.empty([B, N, C], dtype=qkv.dtype)
        if _state["lib"].rf_attention_fwd(_p(qkv), _p(probs), _p(out), B, N, num_heads, C // num_heads, scale):
            raise RuntimeError("attention kernel: no sgemm")
        ctx.dims = (B, N, num_heads, C // num_heads, float(scale))
        ctx.save_for_backward(qkv, probs)
        if sink is not None:
            sink.append(probs)
        return out

    @staticmethod
    def backward(ctx, d_out):
        qkv, probs = ctx.saved_tensor()
        d_out = _dense(d_out)
        d_qkv = paddle.empty_like(qkv)
        code = _state["lib"].rf_attention_bwd(_p(qkv), _p(probs), _p(d_out), _p(d_qkv), *ctx.dims)
        if code:
            raise MemoryError("attention backward: out of memory") if code == -2 else \
                RuntimeError("attention kernel: no sgemm")
        return d_qkv


def attention(qkv: paddle.Tensor, num_heads: int, scale: float, sink: list | None = None) -> paddle.Tensor | None:
    """``softmax(scale * q k^T) v`` per head from the qkv projection's output [B, N, 3 * C] (q, k, v, then the
    heads, as timm's ``Attention`` lays them out) to [B, N, C]; ``None`` where the kernel does not apply (the
    caller then runs its plain formulation). A ``sink`` list receives the attention weights [B, H, N, N] (not
    part of the autograd graph)."""
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * num_heads) or not applies(qkv) or not _sgemm_ready():
        return None
    if sink is None and not _needs_grad(qkv):   # inference: the weights are neither kept nor handed over
        qkv = _dense(qkv)
        B, N, C3 = qkv.shape
        out = paddle.empty([B, N, C3 // 3], dtype=qkv.dtype)
        code = _state["lib"].rf_attention_fwd(_p(qkv), None, _p(out), B, N, num_heads, C3 // 3 // num_heads,
                                              float(scale))
        if code:
            raise MemoryError("attention: out of memory") if code == -2 else RuntimeError("attention kernel: no sgemm")
        return out
    return _Attention.apply(qkv, int(num_heads), float(scale), sink)


class _DepthwiseConv(PyLayer):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x = _dense(x)
        N, C, H, W = x.shape
        k = weight.shape[-1]
        y = paddle.empty_like(x)
        _state["lib"].rf_dwconv_fwd(_p(x), _p(weight), None if bias is None else _p(bias), _p(y), N, C, H, W, k)
        ctx.wanted = (not x.stop_gradient, not weight.stop_gradient) + \
            (() if bias is None else (not bias.stop_gradient,))
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensor()
        dy = _dense(dy)
        N, C, H, W = x.shape
        k = weight.shape[-1]
        dx = paddle.empty_like(x) if ctx.wanted[0] else None
        dw = paddle.empty_like(weight)
        db = paddle.empty([C], dtype=x.dtype) if len(ctx.wanted) == 3 else None
        _state["lib"].rf_dwconv_bwd(_p(x), _p(weight), _p(dy), None if dx is None else _p(dx), _p(dw),
                                    None if db is None else _p(db), N, C, H, W, k)
        return _wanted(ctx, dx, dw, db)   # (a bias of None is no input: two gradients then)


def depthwise_conv(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor) -> paddle.Tensor | None:
    """A k x k depthwise convolution, stride 1, "same" zero padding, NCHW, with a bias or none (``None``): ``x``
    [N, C, H, W], ``weight`` [C, 1, k, k] (k odd); ``None`` where the kernel does not apply."""
    if (x.ndim != 4 or weight.ndim != 4 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1
            or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0
            or not applies(x) or weight.dtype != x.dtype):
        return None
    return _DepthwiseConv.apply(x, weight, bias)


class _ChannelsFirstLayerNorm(PyLayer):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x = _dense(x)
        N, C = x.shape[:2]
        P = x.size // (N * C)
        y = paddle.empty_like(x)
        mean = paddle.empty([N, P], dtype=x.dtype)
        rstd = paddle.empty([N, P], dtype=x.dtype)
        _state["lib"].rf_cf_layer_norm_fwd(_p(x), _p(weight), _p(bias), _p(y), _p(mean), _p(rstd), N, C, P,
                                           float(eps))
        ctx.wanted = (not x.stop_gradient, not weight.stop_gradient, not bias.stop_gradient)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensor()
        dy = _dense(dy)
        N, C = x.shape[:2]
        P = x.size // (N * C)
        dx = paddle.empty_like(x) if ctx.wanted[0] else None
        dw = paddle.empty([C], dtype=x.dtype)
        db = paddle.empty([C], dtype=x.dtype)
        if _state["lib"].rf_cf_layer_norm_bwd(_p(x), _p(weight), _p(mean), _p(rstd), _p(dy),
                                              None if dx is None else _p(dx), _p(dw), _p(db), N, C, P):
            raise MemoryError("LayerNorm backward: out of memory for the column sums")
        return _wanted(ctx, dx, dw, db)


def channels_first_layer_norm(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor,
                              eps: float) -> paddle.Tensor | None:
    """LayerNorm over axis 1 of [N, C, ...] (ConvNeXt's channels-first LayerNorm), affine per channel; ``None``
    where the kernel does not apply."""
    if x.ndim < 3 or weight is None or bias is None or weight.shape != [x.shape[1]] or not applies(x):
        return None
    return _ChannelsFirstLayerNorm.apply(x, weight, bias, eps)


class _Patchify(PyLayer):
    @staticmethod
    def forward(ctx, x, p):
        x = _dense(x)
        ctx.dims = list(x.shape) + [p]
        return _patchify_into(x, p)

    @staticmethod
    def backward(ctx, d_rows):
        B, C, H, W, p = ctx.dims
        d_rows = _dense(d_rows)
        dx = paddle.empty([B, C, H, W], dtype=d_rows.dtype)
        _state["lib"].rf_patchify(_p(dx), _p(d_rows), B, C, H, W, p, 1)
        return dx


def _patchify_into(x, p):
    B, C, H, W = x.shape
    rows = paddle.empty([B, (H // p) * (W // p), C * p * p], dtype=x.dtype)
    _state["lib"].rf_patchify(_p(x), _p(rows), B, C, H, W, p, 0)
    return rows


def patch_embed(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor | None) -> paddle.Tensor | None:
    """A ViT's patch embedding, the p x p convolution with stride p of ``weight`` [D, C, p, p] (+ ``bias`` [D])
    over ``x`` [B, C, H, W], as tokens [B, (H/p) (W/p), D]: the patches copied into rows, then one matrix product
    (Paddle's CPU convolution took twice as long for a ViT-B/16 input); ``None`` where it does not apply."""
    if x.ndim != 4 or weight.ndim != 4 or not applies(x) or weight.dtype != x.dtype:
        return None
    D, C, p, q = weight.shape
    if p != q or x.shape[1] != C or x.shape[2] % p or x.shape[3] % p:
        return None
    rows = _patchify_into(_dense(x), p) if not _needs_grad(x) else _Patchify.apply(x, p)
    out = paddle.matmul(rows, weight.reshape([D, C * p * p]), transpose_y=True)
    return out if bias is None else bias_add(out, bias)


# ----------------------------------------------------------------------------------------------- layers
class Linear(nn.Linear):
    """``nn.Linear`` whose bias is added by this module's kernel on CPU in eager mode (same parameters, same
    output: the add is exact).

    Paddle's CPU backward of the broadcast bias add is a column reduction that takes 14 ms for a
    [788, 3072] gradient. The compiled kernel's column sum is threaded; without the compiled kernels the bias
    is added as ``ones[M, 1] @ bias[1, out]``, which gives the same forward values and moves that reduction
    into a GEMM (0.26 ms as ``ones @ grad``; measured ViT-B/16 CPU train step 1.74 -> 1.94 img/s, batch 4).
    Elsewhere (GPU, static graph / export) it is the plain fused layer.
    """

    def forward(self, x: paddle.Tensor, residual: paddle.Tensor | None = None) -> paddle.Tensor:
        """``x @ weight + bias``; with ``residual``, ``residual + (x @ weight + bias)``: a residual branch's
        last layer adding the branch to its input in the same sweep as the bias."""
        if self.bias is None or not paddle.in_dynamic_mode() or not x.place.is_cpu_place():
            out = super().forward(x)
            return out if residual is None else residual + out
        out = paddle.matmul(x, self.weight)
        if applies(out):
            return bias_add(out, self.bias, residual)
        rows = int(np.prod(out.shape[:-1]))
        ones = paddle.ones([rows, 1], dtype=out.dtype)
        out = out + paddle.matmul(ones, self.bias.unsqueeze(0)).reshape(out.shape)
        return out if residual is None else residual + out


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters) whose backward on CPU in eager mode is this module's
    threaded kernel (Paddle's is serial: 8 ms for [788, 768] against 2 ms); the forward is Paddle's kernel."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.weight is None or self.bias is None or len(self._normalized_shape) != 1:
            return super().forward(x)
        return layer_norm(x, self.weight, self.bias, self._epsilon)


class GELU(nn.GELU):
    """Exact (erf) GELU (``approximate`` False); this module's vectorised, threaded kernel on CPU in eager mode."""

    def __init__(self):
        super().__init__(approximate=False)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return gelu(x)


class DepthwiseConv2D(nn.Conv2D):
    """``nn.Conv2D`` with one k x k filter per channel (``groups`` = channels), stride 1, "same" padding, on this
    module's kernel on CPU in eager mode (Paddle's CPU depthwise convolution took 44% of a ConvNeXt-S step;
    EfficientNet's stride-1 3 x 3 and 5 x 5 ones, without bias, are of the same form);
    ``use_in`` switches only layers of that form to this class."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = depthwise_conv(x, self.weight, self.bias)
        return super().forward(x) if out is None else out


def _is_same_depthwise(layer: nn.Conv2D) -> bool:
    k = layer._kernel_size
    return (layer._groups == layer._in_channels == layer._out_channels and len(k) == 2 and k[0] == k[1]
            and k[0] % 2 == 1 and list(layer._stride) == [1, 1] and list(layer._dilation) == [1, 1]
            and (layer._padding == (k[0] - 1) // 2 or str(layer._padding).upper() == "SAME")
            and layer._padding_mode == "zeros" and layer._data_format == "NCHW")


def use_in(model: nn.Layer) -> int:
    """Switches the plain ``nn.Linear`` (with a bias), ``nn.LayerNorm`` (one normalised axis, affine), exact
    ``nn.GELU`` and "same" depthwise ``nn.Conv2D`` layers of a model built elsewhere (PaddleClas) to the classes
    above, in place: the same
    parameter objects and names, so checkpoints, optimizers and exports see no difference. Returns how many
    layers were switched."""
    switched = 0
    for layer in model.sublayers(include_self=True):
        kind = type(layer)
        if kind is nn.Linear and layer.bias is not None:
            layer.__class__ = Linear
        elif kind is nn.LayerNorm and len(layer._normalized_shape) == 1 and layer.weight is not None \
                and layer.bias is not None:
            layer.__class__ = LayerNorm
        elif kind is nn.GELU and not layer._approximate:
            layer.__class__ = GELU
        elif kind is nn.Conv2D and _is_same_depthwise(layer):
            layer.__class__ = DepthwiseConv2D
        else:
            continue
        switched += 1
    return switched
