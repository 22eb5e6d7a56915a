"""ONNX for an exported model: ``export_onnx`` converts the static program ``export.py`` saved
(``inference.json`` + ``inference.pdiparams``) to ``model.onnx`` with paddle2onnx and checks it in ONNX
Runtime; ``onnx_runner`` runs ``model.onnx`` in ONNX Runtime on the CPU (``--backend onnxruntime``). Both
need the optional extra of ``requirements-export.txt``; ``onnx_unavailable`` says whether it is installed.

Why the converter runs in a child process: when a program holds an operator paddle2onnx has no converter
for, or needs a higher opset than the one asked for, paddle2onnx 2.x calls ``abort()`` from C++, which
would end the calling process (a training run's export, a server) without a Python error. The child's exit
tells us it failed and its output says why; for unsupported operators paddle2onnx 2.1 prints an empty list,
so ``unsupported_ops`` finds them itself: the program's operators that are missing from paddle2onnx's own
list of converters (under the Paddle name or the legacy name Paddle maps it to).

Why ``optimize_tool="None"``: paddle2onnx's default post-pass (Polygraphy's constant folding) sets
``POLYGRAPHY_AUTOINSTALL_DEPS=1`` and Polygraphy then runs ``pip install onnx_graphsurgeon``, which upgrades
numpy to 2.x beside Paddle's numpy 1.x pin and breaks the environment. ONNX Runtime folds constants itself
when it loads the model, so nothing is lost.

Why the check: a converted model is only trusted after ONNX Runtime has loaded it and returned, for a few
fixed inputs, the logits of the Paddle program it came from (``CHECK_TOLERANCE``, relative to the logits'
scale when it is above 1); otherwise no ``model.onnx`` is left in the folder.

References: PaddlePaddle/Paddle2ONNX ``paddle2onnx/convert.py`` (``export``) and ``mapper/exporter.cc``
(``IsOpsRegistered``, ``SetOpsetVersion``); the empty list of unsupported operators as users meet it:
PaddlePaddle/PaddleOCR#17202; ONNX Runtime Python API (``InferenceSession``, ``SessionOptions``).
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from typing import Callable

import numpy as np

from util.errors import UserError

ONNX_FILE = "model.onnx"
PROGRAM_PREFIX = "inference"   # export.py's inference.json + inference.pdiparams
INSTALL_HINT = "pip install -r requirements-export.txt"
MIN_OPSET = 7                  # paddle2onnx's lowest; with no opset asked for it picks the lowest that works
CHECK_INPUTS = 2               # a batch of 2: the free batch dimension is exercised, not only batch 1
CHECK_TOLERANCE = 1e-4
CONVERT_TIMEOUT = 3600         # seconds; ViT-L converts in well under a minute
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# operators that are no computation: graph structure, inputs and outputs (paddle2onnx skips them too)
_STRUCTURAL_OPS = ("pd_op.data", "pd_op.fetch", "pd_op.if", "pd_op.while")


def _import_problem(name: str) -> str | None:
    try:
        importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken install failing inside the import
        return f"{name} could not be imported ({type(exc).__name__}: {exc})"
    return None


def onnx_unavailable() -> str | None:
    """``None`` when paddle2onnx and onnxruntime import, else why not and how to install them."""
    problems = [p for p in (_import_problem("paddle2onnx"), _import_problem("onnxruntime")) if p]
    if not problems:
        return None
    return f"{'; '.join(problems)}; the ONNX export is an optional extra: {INSTALL_HINT}"


def _versions() -> str:
    import paddle
    import paddle2onnx

    return f"paddle2onnx {paddle2onnx.__version__}, Paddle {paddle.__version__}"


# ----------------------------------------------------------------------------------------------- converting
def export_onnx(export_dir: str, opset: int | None = None) -> str:
    """Convert ``export_dir/inference.*`` to ``export_dir/model.onnx``; returns its path.

    ``opset``: the ONNX opset to write (default: the lowest the model's operators need, which ONNX runtimes
    of any age read). The model is checked in ONNX Runtime against the Paddle program before it is put in
    place; a model that does not convert or does not agree raises a ``UserError`` saying which operator or
    what failed, and leaves no ``model.onnx``.
    """
    reason = onnx_unavailable()
    if reason is not None:
        raise UserError(f"ONNX export: {reason}")
    prefix = os.path.join(os.path.abspath(export_dir), PROGRAM_PREFIX)
    for path in (prefix + ".json", prefix + ".pdiparams"):
        if not os.path.isfile(path):
            raise UserError(f"{export_dir}: no {os.path.basename(path)} (an export folder holds "
                            f"{PROGRAM_PREFIX}.json + {PROGRAM_PREFIX}.pdiparams); export the checkpoint with "
                            "export.py first")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET):
        raise UserError(f"--opset {opset}: expected an integer of at least {MIN_OPSET}, or leave it out to let "
                        "paddle2onnx choose the lowest opset the model needs")
    final = os.path.join(os.path.abspath(export_dir), ONNX_FILE)
    tmp = os.path.join(os.path.abspath(export_dir), f".{ONNX_FILE}.tmp")
    try:
        done = _run_converter(prefix, tmp, opset)
        if done.returncode != 0 or not os.path.isfile(tmp) or os.path.getsize(tmp) == 0:
            raise _conversion_error(export_dir, prefix, opset, done)
        check_onnx(tmp, prefix)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return final


def _run_converter(prefix: str, out: str, opset: int | None) -> subprocess.CompletedProcess:
    """paddle2onnx in a child process (the module docstring says why)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("GLOG_minloglevel", "2")
    env["OMP_NUM_THREADS"] = "1"                 # converting computes nothing; keeps Paddle's import quiet
    env["POLYGRAPHY_AUTOINSTALL_DEPS"] = "0"     # never pip-install from here (module docstring)
    args = [sys.executable, "-m", "util.onnx_backend", prefix, out, str(opset or MIN_OPSET),
            "0" if opset else "1"]
    try:
        # from the repository root: ``-m`` puts the working folder first on the path, where another ``util``
        # package could stand
        return subprocess.run(args, capture_output=True, text=True, errors="replace", env=env, cwd=_ROOT,
                              timeout=CONVERT_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise UserError(f"ONNX export: paddle2onnx did not finish converting {prefix}.json in "
                        f"{CONVERT_TIMEOUT} s; run the model with --backend paddle") from exc


def _convert_main(argv: list[str]) -> int:
    """The child: ``python -m util.onnx_backend PREFIX OUT OPSET AUTO_UPGRADE``."""
    prefix, out, opset, upgrade = argv
    import paddle2onnx

    paddle2onnx.export(prefix + ".json", prefix + ".pdiparams", out, opset_version=int(opset),
                       auto_upgrade_opset=upgrade == "1", enable_onnx_checker=True, optimize_tool="None")
    return 0 if os.path.isfile(out) else 1


def unsupported_ops(prefix: str) -> list[str]:
    """The operators of the program ``prefix.json`` that paddle2onnx has no converter for, sorted
    (``pd_op.<name>``): those missing from ``paddle2onnx.utils.get_all_supported_operators_pir()`` under
    their own name, without the in-place ``_``, and under the legacy names Paddle maps them to."""
    import paddle
    from paddle2onnx.utils import get_all_supported_operators_pir

    supported = set(get_all_supported_operators_pir())
    legacy = _legacy_names()
    program = paddle.jit.load(prefix).program()
    missing = set()
    for name in _op_names(program.global_block()):
        if name.startswith("builtin.") or name in _STRUCTURAL_OPS:
            continue
        short = name.split(".", 1)[1] if name.startswith("pd_op.") else name
        names = {short, short.rstrip("_")}
        names |= {alias for n in list(names) for alias in legacy.get(n, ())}
        if not names & supported:
            missing.add(name)
    return sorted(missing)


def _op_names(block) -> list[str]:
    """The names of the operators of ``block`` and of the blocks nested in them (control flow)."""
    names = []
    for op in block.ops:
        names.append(op.name())
        for inner in op.blocks() if hasattr(op, "blocks") else ():
            names.extend(_op_names(inner))
    return names


def _legacy_names() -> dict[str, list[str]]:
    """Paddle's operator name -> its legacy (pre-PIR) names, under which paddle2onnx registers most of its
    converters (``matmul`` -> ``matmul_v2``, ``add`` -> ``elementwise_add``); from Paddle's own table, empty
    where this Paddle has none."""
    try:
        from paddle.incubate.autograd.phi_ops_map import op_map
    except Exception:  # an internal table; without it only exact names are matched
        return {}
    out: dict[str, list[str]] = {}
    for legacy, info in op_map.items():
        out.setdefault(info.get("phi_name", legacy), []).append(legacy)
    return out


def _conversion_error(export_dir: str, prefix: str, opset: int | None,
                      done: subprocess.CompletedProcess) -> UserError:
    log = f"{done.stdout}\n{done.stderr}"
    versions = _versions()
    fallback = "the export's Paddle program still runs with --backend paddle (Paddle Inference)"
    if "unsupported operators" in log:
        ops = unsupported_ops(prefix)
        which = (f"it has no converter for {', '.join(ops)}" if ops else
                 "it reports operators it has no converter for without naming them, and every operator is in "
                 "its list of converters")
        return UserError(f"ONNX export of {export_dir}: {versions} cannot convert this model: {which}; {fallback}, "
                         "or try a paddle2onnx release that converts these operators")
    if "opset version" in log.lower():
        need = re.search(r"set the opset_version to (\d+)", log)
        detail = [re.sub(r"\[[^\]]*\]\s*", "", line).strip() for line in log.splitlines()
                  if "Opset Version must be" in line]
        hint = (f"this model needs opset {need.group(1)} or higher" if need and opset is not None
                and int(need.group(1)) > opset else "; ".join(dict.fromkeys(detail)) or "the opset was refused")
        return UserError(f"ONNX export of {export_dir}: --opset {opset}: {hint} ({versions}); pass another --opset "
                         "or leave it out to let paddle2onnx choose")
    return UserError(f"ONNX export of {export_dir}: {versions} failed (exit status {done.returncode}): "
                     f"{_last_lines(log)}; {fallback}")


def _last_lines(log: str, n: int = 6) -> str:
    """The converter's last messages (its own and errors), one line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    useful = [line for line in lines if "Paddle2ONNX" in line or "rror" in line] or lines
    return " | ".join(useful[-n:]) or "no output"


# ----------------------------------------------------------------------------------------------- checking
def check_onnx(onnx_path: str, prefix: str, threads: int | None = None) -> float:
    """Run ``CHECK_INPUTS`` fixed inputs through ``onnx_path`` in ONNX Runtime and through the Paddle program
    ``prefix``; returns max|logit difference|, or raises a ``UserError`` when it is above the tolerance."""
    import paddle

    session = _session(onnx_path, threads)
    (feed,) = session.get_inputs()
    shape = _input_shape(feed, onnx_path)
    # standard normal values: the range normalised images have; fixed, so every export checks the same inputs
    x = np.random.default_rng(0).standard_normal([CHECK_INPUTS] + shape[1:]).astype(np.float32)
    out = np.asarray(session.run(None, {feed.name: x})[0])
    program = paddle.jit.load(prefix)
    program.eval()
    with paddle.no_grad():
        ref = program(paddle.to_tensor(x))
    ref = (ref[0] if isinstance(ref, (list, tuple)) else ref).numpy()
    if out.shape != ref.shape:
        raise UserError(f"ONNX export: ONNX Runtime returned logits of shape {list(out.shape)}, the Paddle program "
                        f"{list(ref.shape)} ({_versions()}); run the model with --backend paddle")
    diff = float(np.abs(out.astype(np.float64) - ref).max())
    tolerance = CHECK_TOLERANCE * max(1.0, float(np.abs(ref).max()))
    if not np.isfinite(out).all() or not diff <= tolerance:
        raise UserError(f"ONNX export: the ONNX model's logits differ from the Paddle program's by {diff:.3g} (more "
                        f"than {tolerance:.3g}), so paddle2onnx converted it wrongly ({_versions()}); run the model "
                        "with --backend paddle")
    return diff


def _input_shape(feed, onnx_path: str) -> list:
    """The model input's shape with the batch free (first dimension) and every other dimension fixed."""
    shape = list(feed.shape)
    if len(shape) < 2 or any(not isinstance(d, int) for d in shape[1:]):
        raise UserError(f"{onnx_path}: input {feed.name!r} has shape {shape} (expected a free batch dimension "
                        "and fixed image dimensions); export the checkpoint again with export.py --onnx")
    return shape


# ----------------------------------------------------------------------------------------------- running
def _session(onnx_path: str, threads: int | None):
    problem = _import_problem("onnxruntime")
    if problem is not None:
        raise UserError(f"--backend onnxruntime: {problem}; ONNX Runtime is an optional extra: {INSTALL_HINT}")
    import onnxruntime as ort

    if threads is None:
        from util.exported import default_threads

        threads = default_threads()
    if int(threads) < 1:
        raise UserError(f"--threads {threads}: expected 1 or more; pass a positive thread count")
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3   # errors only: the converter leaves unused initialisers ORT warns about
    try:
        return ort.InferenceSession(onnx_path, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own (pybind) exception types
        raise UserError(f"{onnx_path}: ONNX Runtime {ort.__version__} could not load it ({exc}); export the "
                        "checkpoint again with export.py --onnx") from exc


def onnx_runner(export_dir: str, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """``run(batch) -> logits``: ``export_dir/model.onnx`` in an ONNX Runtime session on the CPU.

    ``batch`` is float32 ``[N, ...]`` of any N (the shape the model was exported with otherwise); the logits
    come back float32 ``[N, outputs]``. ``threads``: ONNX Runtime's intra-op threads (default
    ``util.exported.default_threads()``: ``OMP_NUM_THREADS`` or the cores this process may use, at most 8).
    Calls may come from several threads at once (ONNX Runtime's ``run`` is thread-safe).
    """
    path = os.path.join(export_dir, ONNX_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found; export with --onnx (python export.py --resume CHECKPOINT --output "
                        f"{export_dir} --onnx --overwrite) or run with --backend paddle")
    session = _session(path, threads)
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise UserError(f"{path}: has {len(inputs)} inputs (an export has one, the image batch); export the "
                        "checkpoint again with export.py --onnx")
    feed = inputs[0]
    shape = _input_shape(feed, path)
    output = session.get_outputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if list(batch.shape[1:]) != shape[1:]:
            raise ValueError(f"onnx_runner: a batch of shape {list(batch.shape)}; the model takes "
                             f"[N, {', '.join(map(str, shape[1:]))}]")
        return np.asarray(session.run([output], {feed.name: batch})[0], dtype=np.float32)

    return run


if __name__ == "__main__":
    sys.exit(_convert_main(sys.argv[1:]))
