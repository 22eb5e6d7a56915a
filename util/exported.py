"""A model as a static program, and Paddle Inference running it on the CPU: what ``export.py`` writes and what
``load_predictor(<export folder>)`` runs.

``save_static`` traces a dygraph model (``paddle.jit.to_static``) with a free batch dimension and saves the
program and weights (``paddle.jit.save``: PIR ``<prefix>.json`` + ``<prefix>.pdiparams``). ``paddle_runner``
runs them through a Paddle Inference predictor on the CPU, with oneDNN kernels unless told otherwise, and in
bfloat16 on request where the CPU has bf16 instructions.

Why the predictor runs without Paddle's ``inplace_pass`` when oneDNN is on: in Paddle 3.3 that pass lets a
CPU (non-oneDNN) kernel write its result into its input's buffer when no later op reads that *value*. But a
value leaving a oneDNN kernel reaches each CPU kernel through its own ``pd_op.onednn_to_paddle_layout`` op,
and when no reordering is needed that op's kernel hands on the same buffer (``ShareDataWith``); so when two
CPU ops read one oneDNN output, an in-place one silently overwrites what the other has yet to read.
ConvNeXt's channels-first LayerNorm is that pattern (``d = x - mean(x)`` on oneDNN, then ``pow(d, 2)`` on
the CPU, in place, and ``d / sqrt(var + eps)``): logits differed from dygraph by 0.54 (``convnext_test``),
2.1 (``convnext_small``, class probabilities by 0.38) and 0.72 (``dual_convnext_small``). Without the pass
every family agrees with dygraph to float32 rounding (ViT-B/L, ResNet-50, EfficientNet-B4, ConvNeXt-S and
the three dual-eye models at their real sizes: relative differences of 1e-6), and the predictor only gives
up some buffer reuse. None of these graphs meets Paddle's open oneDNN attribute bug (PaddlePaddle/Paddle
#77340, ``ConvertPirAttribute2RuntimeAttribute not support [pir::ArrayAttribute<pir::DoubleAttribute>]``).

References: Paddle Inference Python API (``paddle.inference.Config``, ``create_predictor``); PaddlePaddle
``paddle/fluid/pir/transforms/general/inplace_pass.cc`` (the pass's rules) and the ``onednn_to_paddle_layout``
kernel (the shared buffer).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
from typing import Callable

import numpy as np

from util.errors import UserError
from util.threads import MAX_MATH_THREADS, cores_per_process, math_threads, user_math_threads

PRECISIONS = ("fp32", "bf16")

# what export.py writes into its folder: model.json says what the model is (layout marks the format)
EXPORT_LAYOUT, EXPORT_LAYOUT_VERSION, EXPORT_METADATA = "retfound-paddle-export", 1, "model.json"

# the pass that corrupts results next to oneDNN kernels (module docstring)
ONEDNN_UNSAFE_PASSES = ("inplace_pass",)

# The CPU flags worth printing next to a benchmark (as /proc/cpuinfo names them).
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_bf16", "amx_int8")

# Paddle writes OMP_NUM_THREADS=1 at import when it is unset, so the user's setting is only visible before it
_THREADS_BEFORE_PADDLE = math_threads() if "paddle" not in sys.modules else None


def default_threads() -> int:
    """The predictor's math threads when none are given: ``util.threads.math_threads()`` (``OMP_NUM_THREADS``,
    else the cores this process may use, at most 8), read when this module was imported if Paddle was not
    yet; after Paddle's import an ``OMP_NUM_THREADS`` of 1 may be Paddle's own and is not taken as the
    user's (pass ``threads`` to be sure)."""
    if _THREADS_BEFORE_PADDLE is not None:
        return _THREADS_BEFORE_PADDLE
    user = user_math_threads()
    if user is not None and user != 1:
        return user
    return min(MAX_MATH_THREADS, cores_per_process())


def input_shape_of(model, input_size: int) -> list:
    """The exported input: ``[None, 3, S, S]``, dual-eye ``[None, 2, 3, S, S]`` (left, right)."""
    views, size = int(getattr(model, "num_views", 1)), int(input_size)
    return [None, 3, size, size] if views == 1 else [None, views, 3, size, size]


def program_files(prefix: str) -> tuple[str, str]:
    """(program, weights) written by ``save_static(model, prefix, ...)``."""
    return prefix + ".json", prefix + ".pdiparams"


def save_static(model, prefix: str, input_shape: list) -> None:
    """Save ``model`` (a dygraph Layer, put in eval mode here) as ``<prefix>.json`` + ``<prefix>.pdiparams``.

    ``input_shape`` is the input's shape, batch first (``input_shape_of``); the batch is exported as free
    (``None``) whatever it says, so the program takes any batch size. The files are written into a temporary
    folder beside ``prefix`` and moved into place weights first, program last, so an interrupted save never
    leaves a program next to weights that are missing or from another save.
    """
    import paddle
    from paddle.static import InputSpec

    shape = [None] + [int(d) for d in list(input_shape)[1:]]
    if len(shape) not in (4, 5) or any(d is not None and d < 1 for d in shape):
        raise ValueError(f"save_static: input_shape {list(input_shape)} (expected [N, 3, S, S] or [N, 2, 3, S, S])")
    model.eval()
    folder = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=folder)
    try:
        tmp_prefix = os.path.join(tmp, os.path.basename(prefix))
        static = paddle.jit.to_static(model, input_spec=[InputSpec(shape, "float32", "x")], full_graph=True)
        paddle.jit.save(static, tmp_prefix)
        program, weights = program_files(tmp_prefix)
        if not (os.path.isfile(program) and os.path.isfile(weights)):
            raise RuntimeError(f"paddle.jit.save wrote {sorted(os.listdir(tmp))}, expected "
                               f"{os.path.basename(program)} and {os.path.basename(weights)}")
        for src, dst in zip((weights, program), reversed(program_files(prefix))):
            os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- the CPU
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none: not Linux)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_features() -> dict:
    """``{"cpu": <model name>, <flag>: bool, ...}`` for the flags of ``CPU_FLAGS`` (all False where the
    flags cannot be read)."""
    info = _cpuinfo()
    flags = set(info.get("flags", info.get("Features", "")).split())
    out: dict = {"cpu": info.get("model name", "unknown")}
    out.update({flag: flag in flags for flag in CPU_FLAGS})
    return out


def describe_cpu(features: dict | None = None) -> str:
    """One line for a report: ``<model name>: avx2 avx512f ... (no amx_bf16, ...)``."""
    features = features or cpu_features()
    have = [f for f in CPU_FLAGS if features.get(f)]
    lack = [f for f in ("avx512_bf16", "amx_bf16") if not features.get(f)]
    return f"{features.get('cpu', 'unknown')}: {' '.join(have) or 'no flags read'}" + (
        f" (no {', '.join(lack)})" if lack else "")


def bf16_support(features: dict | None = None) -> str | None:
    """``None`` when this CPU computes bfloat16 natively (AVX512_BF16 or AMX-BF16), else why not, in words.
    Without them oneDNN would emulate bf16 with float32 instructions: slower than float32, so not offered."""
    features = features or cpu_features()
    if features.get("avx512_bf16") or features.get("amx_bf16"):
        return None
    if not any(features.get(f) for f in CPU_FLAGS):
        return "the CPU's instruction set could not be read (no /proc/cpuinfo flags), so bf16 support is unknown"
    return (f"the CPU ({features.get('cpu', 'unknown')}) has no native bfloat16 instructions (neither "
            "avx512_bf16 nor amx_bf16 in /proc/cpuinfo flags)")


# ----------------------------------------------------------------------------------------------- the runner
def paddle_config(prefix: str, precision: str = "fp32", threads: int | None = None, onednn: bool | None = None):
    """The ``paddle.inference.Config`` ``paddle_runner`` uses (module docstring: why some passes are off)."""
    from paddle import inference

    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        reason = bf16_support()
        if reason is not None:
            raise UserError(f"--precision bf16: {reason}; run with --precision fp32")
        if onednn is False:
            raise UserError("--precision bf16: runs through oneDNN, which was turned off; leave oneDNN on or "
                            "run with --precision fp32")
    program, weights = program_files(prefix)
    for path in (program, weights):
        if not os.path.isfile(path):
            raise UserError(f"{path}: not found (an exported model is {os.path.basename(program)} + "
                            f"{os.path.basename(weights)}); export the checkpoint again with export.py")
    threads = default_threads() if threads is None else int(threads)
    if threads < 1:
        raise UserError(f"--threads {threads}: expected 1 or more; pass a positive thread count")
    config = inference.Config(program, weights)
    config.disable_gpu()
    config.disable_glog_info()
    config.set_cpu_math_library_num_threads(threads)
    if onednn is None or onednn:
        config.enable_mkldnn()
        for name in ONEDNN_UNSAFE_PASSES:
            config.delete_pass(name)
        if precision == "bf16":
            config.enable_mkldnn_bfloat16()
    else:
        config.disable_mkldnn()
    return config


def paddle_runner(prefix: str, precision: str = "fp32", threads: int | None = None,
                  onednn: bool | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """``run(batch) -> logits``: the program saved at ``prefix`` in a Paddle Inference predictor on the CPU.

    ``batch`` is float32 ``[N, ...]`` of any N; the logits come back float32 ``[N, outputs]``. ``threads``:
    the predictor's math threads (default ``default_threads()``); ``onednn``: oneDNN kernels (default on);
    ``precision='bf16'``: oneDNN's bfloat16 kernels, on CPUs that have them (``bf16_support``), else a
    ``UserError`` saying why. Calls are serialised: one predictor runs one batch at a time. An empty batch
    gives empty logits (Paddle Inference itself would crash on it).
    """
    from paddle import inference

    predictor = inference.create_predictor(paddle_config(prefix, precision, threads, onednn))
    (input_name,) = predictor.get_input_names()
    output_name = predictor.get_output_names()[0]
    lock = threading.Lock()
    first = [onednn is None or onednn]
    width: list[int] = []   # the logits per input, once seen

    def run(batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim < 2:
            raise ValueError(f"paddle_runner: a batch of shape {list(batch.shape)} (expected [N, ...] inputs)")
        if batch.shape[0] == 0:   # the predictor crashes the process (SIGSEGV) on an empty batch
            if not width:
                run(np.zeros((1,) + batch.shape[1:], np.float32))
            return np.zeros((0, width[0]), np.float32)
        with lock:
            handle = predictor.get_input_handle(input_name)
            handle.reshape(list(batch.shape))
            handle.copy_from_cpu(batch)
            # the first run builds the oneDNN kernels, and Paddle's C++ prints a line per mean op on stdout
            # (ReduceMeanCheckIfOneDNNSupport), where predict.py writes its result line
            with _stdout_silenced() if first[0] else contextlib.nullcontext():
                predictor.run()
            first[0] = False
            out = np.asarray(predictor.get_output_handle(output_name).copy_to_cpu(), dtype=np.float32)
        width[:] = [int(np.prod(out.shape[1:]))]
        return out

    return run


@contextlib.contextmanager
def _stdout_silenced():
    """File descriptor 1 to /dev/null for the block (C++ writes bypass ``sys.stdout``)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):   # no real stdout (closed, or replaced without a descriptor)
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
