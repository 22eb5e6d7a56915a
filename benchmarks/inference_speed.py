"""CPU inference speed of every way this toolkit can apply a model, against the PyTorch/timm reference, measured
side by side in one run, with each way's memory, load time and effect on the outputs.

The paths: torch eager fp32 and torch eager bf16 (``torch.autocast('cpu')``), the reference's way of running a
RETFound model; our dygraph fp32 (what ``--eval`` and ``predict.py`` on a checkpoint run); Paddle Inference with
oneDNN in fp32 and in bf16 (bf16 only where the CPU has bf16 instructions, else shown as skipped with the
reason); Paddle Inference without oneDNN (the native CPU kernels); ONNX Runtime on the model exported to ONNX
(where it is installed). The models: ViT-B/16 and ViT-L/16 (RETFound's size) at batch 1 and 8, 224 px; ResNet-50
(224), EfficientNet-B4 (380) and ConvNeXt-S (224) at batch 8.

Why it is built this way:

* Paddle and torch live in different virtualenvs, and peak memory and load time only mean something for one
  path at a time, so the script is a driver that runs every (path, model, batch) as its own worker subprocess,
  under the interpreter of its side. Peak RSS is the worker's own ``ru_maxrss`` (framework included); load
  time is building the model and reading its weights, or creating the predictor (framework import excluded).
* The machine may be shared: the paths run in turn, the order reversed every round (several rounds, the
  median kept), so every path sees the same load; compare the *ratios* between runs, not the img/s.
* Accuracy effect: each worker returns the logits of its last timed batch (the same random inputs everywhere);
  the driver prints max |softmax difference| against our dygraph fp32. For the ViTs both sides run the *same
  weights*: timm initialises the reference model, and our model loads that file through the toolkit's own
  converter (``models.pretrained.load_finetuned`` -> ``models.convert``), so a difference across frameworks
  is the framework's. The CNNs' weights are each side's own random init, so there the torch rows compare
  torch bf16 against torch fp32 only.
* Workload: random inputs made once in memory (no image decoding), 5 outputs (RetinaMNIST-like), eval mode,
  the same thread count on both sides (``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, ``torch.set_num_threads``,
  Paddle Inference's math-library threads); one step = numpy batch in, logits out as numpy.

``--demo_checkpoint`` adds an accuracy check on real data: the checkpoint is exported and the test split of
``--demo_data`` evaluated through each Paddle path; it prints the test AUROC (macro, as ``--eval`` computes
it) and its change against dygraph fp32, with PASS/FAIL for bf16 (it must move the AUROC by 0.002 at most).

Usage (from the repository root, with the toolkit's environment active):
    python benchmarks/inference_speed.py                               # everything; long (see benchmarks/README.md)
    python benchmarks/inference_speed.py --models vit_b16 --batch 8 --rounds 3
    python benchmarks/inference_speed.py --quick                       # tiny models at 32 px: a smoke run
    python benchmarks/inference_speed.py --models none --demo_checkpoint RUN/checkpoint-best.pdparams \\
        --demo_data data/retinamnist.npz

The torch side's interpreter: ``--torch_python``, else ``$TORCH_PYTHON``, else ``/work/torchvenv/bin/python``
when it exists; without one only our own paths run. ``--paddle_python`` (default: this interpreter) runs ours.

References: timm ``vision_transformer.py`` / ``resnet.py`` / ``efficientnet.py`` / ``convnext.py`` (the
reference models), RETFound_MAE ``models_vit.py`` (global pooling -> ``fc_norm`` -> head), Paddle Inference
``Config`` (oneDNN, bf16, threads), PyTorch ``torch.autocast`` on CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TORCH_PYTHON = "/work/torchvenv/bin/python"
NUM_CLASSES = 5
BF16_AUROC_TOLERANCE = 0.002


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: ours (registry name), the reference (timm name), size, batches; and the tiny
    stand-ins ``--quick`` uses instead (same code paths, seconds per run)."""
    key: str
    title: str
    ours: str
    torch: str
    size: int
    batches: tuple
    vit: bool  # same weights on both sides (timm init converted into ours)
    quick_ours: str
    quick_torch: str


MODELS = {s.key: s for s in (
    ModelSpec("vit_b16", "ViT-B/16", "vit_base_patch16", "vit_base_patch16_224", 224, (1, 8), True,
              "vit_test", "vit_test"),
    ModelSpec("vit_l16", "ViT-L/16 (RETFound)", "retfound_mae", "vit_large_patch16_224", 224, (1, 8), True,
              "vit_test", "vit_test"),
    ModelSpec("resnet50", "ResNet-50", "resnet50", "resnet50", 224, (8,), False, "resnet50_test", "resnet18"),
    ModelSpec("efficientnet_b4", "EfficientNet-B4", "efficientnet_b4", "efficientnet_b4", 380, (8,), False,
              "efficientnet_test", "efficientnet_b0"),
    ModelSpec("convnext_small", "ConvNeXt-S", "convnext_small", "convnext_small", 224, (8,), False,
              "convnext_test", "convnext_atto"),
)}
QUICK_SIZE, QUICK_BATCHES = 32, (1, 2)

# path id -> (label, side, precision)
PATHS = {
    "torch_fp32": ("torch eager fp32", "torch", "fp32"),
    "torch_bf16": ("torch eager bf16 autocast", "torch", "bf16"),
    "dygraph_fp32": ("ours dygraph fp32", "paddle", "fp32"),
    "pi_onednn_fp32": ("Paddle Inference oneDNN fp32", "paddle", "fp32"),
    "pi_onednn_bf16": ("Paddle Inference oneDNN bf16", "paddle", "bf16"),
    "pi_native_fp32": ("Paddle Inference native fp32", "paddle", "fp32"),
    "onnxruntime_fp32": ("ONNX Runtime fp32", "paddle", "fp32"),
}
OURS = ("dygraph_fp32", "pi_onednn_fp32", "pi_onednn_bf16", "pi_native_fp32")  # the Paddle paths
EXPORTED = ("pi_onednn_fp32", "pi_onednn_bf16", "pi_native_fp32")
REFERENCE = "dygraph_fp32"


# ================================================================================================ workers
def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _time_runs(run, x, warmup: int, steps: int, min_time: float) -> dict:
    """First call, warmup calls, then timed calls until ``steps`` calls and ``min_time`` seconds are both done."""
    t0 = time.perf_counter()
    out = run(x)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        out = run(x)
    times: list[float] = []
    while len(times) < steps or sum(times) < min_time:
        t0 = time.perf_counter()
        out = run(x)
        times.append(time.perf_counter() - t0)
    import numpy as np

    return {"first_s": first, "times": times, "logits": np.asarray(out, dtype=np.float32).tolist()}


def _inputs(batch: int, size: int):
    import numpy as np

    return np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)


def _import_timm():
    import types
    # PyPI's torchvision (a timm dependency) fails to register its operators beside the CPU torch wheel;
    # timm's models never call them, so the module that registers them is stubbed out
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import timm
    import torch

    return timm, torch


def _torch_build(a: argparse.Namespace):
    timm, torch = _import_timm()
    torch.set_num_threads(a.threads)
    name = a.torch_name
    if name == "vit_test":  # the shape of our vit_test, as a timm VisionTransformer
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=a.size, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                 num_classes=NUM_CLASSES, global_pool="avg")
    if a.vit:  # RETFound's model: timm's ViT, mean pool over patch tokens -> fc_norm -> head
        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, global_pool="avg", img_size=a.size)
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)


def worker_torch_probe(a: argparse.Namespace) -> dict:
    timm, torch = _import_timm()

    return {"version": f"torch {torch.__version__} timm {timm.__version__}",
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def worker_torch_prep(a: argparse.Namespace) -> dict:
    timm, torch = _import_timm()

    torch.manual_seed(0)
    model = _torch_build(a)
    torch.save(model.state_dict(), os.path.join(a.work_dir, "torch.pth"))
    return {"version": f"torch {torch.__version__} timm {timm.__version__}",
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def worker_torch(a: argparse.Namespace) -> dict:
    timm, torch = _import_timm()

    t0 = time.perf_counter()
    model = _torch_build(a)
    model.load_state_dict(torch.load(os.path.join(a.work_dir, "torch.pth"), map_location="cpu"))
    model.eval()
    load_s = time.perf_counter() - t0
    bf16 = a.path == "torch_bf16"

    def run(x):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(torch.from_numpy(x)).float().numpy()

    res = _time_runs(run, _inputs(a.batch, a.size), a.warmup, a.steps, a.min_time)
    res.update(load_s=load_s, peak_rss_mib=_rss_mib(), version=f"torch {torch.__version__} timm {timm.__version__}",
               flags={"torch_threads": torch.get_num_threads()})
    return res


def _paddle_imports():
    sys.path.insert(0, REPO)
    os.environ.setdefault("GLOG_minloglevel", "2")
    from util.blas import select_mkl

    select_mkl()  # as the toolkit's entry points do: Paddle's products on the current MKL (util/blas.py)


def _exported_api():
    """util.exported (Paddle Inference) or the reason it cannot be used."""
    try:
        import util.exported as exported
    except ImportError as exc:
        return None, f"util/exported.py not importable ({exc})"
    return exported, None


def _onnx_api():
    """util.onnx_backend (ONNX Runtime) or the reason it cannot be used."""
    try:
        import util.onnx_backend as onnx_backend
    except ImportError as exc:
        return None, f"util/onnx_backend.py not importable ({exc})"
    reason = onnx_backend.onnx_unavailable()
    return (None, reason) if reason else (onnx_backend, None)


def worker_probe(a: argparse.Namespace) -> dict:
    """What this machine and environment offer: CPU features, bf16, which exported paths can run."""
    _paddle_imports()
    import paddle

    exported, why_not = _exported_api()
    onnx_backend, why_not_onnx = _onnx_api()
    features = _cpu_features_fallback()
    if exported is not None:
        own = exported.cpu_features()
        features.update({k: v for k, v in own.items() if k != "cpu"}, model_name=own.get("cpu", "unknown"))
    bf16_reason = exported.bf16_support() if exported is not None else why_not
    skip = {}
    if exported is None:
        skip.update({p: why_not for p in EXPORTED})
    elif bf16_reason:
        skip["pi_onednn_bf16"] = bf16_reason
    if onnx_backend is None:
        skip["onnxruntime_fp32"] = why_not_onnx
    return {"paddle": paddle.__version__, "cpu_features": features, "bf16_reason": bf16_reason, "skip": skip,
            "onnxruntime": _version_of("onnxruntime"), "paddle2onnx": _version_of("paddle2onnx")}


def _version_of(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or no __version__
        return None


def _cpu_features_fallback() -> dict:
    flags: set[str] = set()
    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    out: dict = {"model_name": name, "threads": os.cpu_count()}
    out.update({f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")})
    return out


def _paddle_model(a: argparse.Namespace):
    import models

    return models.create_model(a.ours, num_classes=NUM_CLASSES, global_pool=True, input_size=a.size)


def _condition_random_cnn(model, size: int) -> str:
    """Make a randomly initialised CNN behave like a trained one on the benchmark's inputs; returns what was done.

    In eval mode an untrained network's BatchNorm layers hold their initial statistics (mean 0, variance 1),
    which normalise nothing: activations grow or shrink layer after layer (our ResNet-50 gives logits of about
    600, our EfficientNet-B4 of 1e-13, near the subnormal floats, which are slow on some kernels). Softmax then
    saturates or is constant, so every probability difference reads 0 whatever the path computes. So the
    BatchNorm statistics are estimated on random inputs (one pass in train mode with momentum 0, as a
    recalibration would), and the head is then divided by the logits' spread so the logits spread by about 1.
    Every other weight stays as initialised."""
    import numpy as np
    import paddle

    norms = [m for m in model.sublayers() if hasattr(m, "_momentum") and hasattr(m, "_variance")]
    done = []
    if norms:
        saved = [m._momentum for m in norms]
        for m in norms:
            m._momentum = 0.0
        model.train()
        with paddle.no_grad():
            model(paddle.to_tensor(_inputs(8, size)))
        for m, momentum in zip(norms, saved):
            m._momentum = momentum
        model.eval()
        done.append(f"{len(norms)} BatchNorm statistics estimated on random inputs")
    head = getattr(model, "head", None)
    if isinstance(head, paddle.nn.Linear):
        with paddle.no_grad():
            spread = float(np.std(model(paddle.to_tensor(_inputs(2, size))).numpy()))
        if np.isfinite(spread) and spread > 0:
            with paddle.no_grad():
                head.weight.set_value(head.weight.numpy() / spread)
                head.bias.set_value(head.bias.numpy() / spread)
            done.append(f"head scaled by 1/{spread:.3g} for unit-spread logits")
    return "".join(f", {d}" for d in done)


def worker_paddle_prep(a: argparse.Namespace) -> dict:
    """Our model with the benchmark's weights, saved for the dygraph worker and exported for the others."""
    _paddle_imports()
    import paddle

    paddle.seed(0)
    model = _paddle_model(a)
    torch_weights = os.path.join(a.work_dir, "torch.pth")
    source = "own random init (paddle.seed 0)"
    if a.vit and os.path.exists(torch_weights):
        from models.pretrained import load_finetuned

        load_finetuned(model, torch_weights, verbose=False)  # the toolkit's reader + converter, strict keys
        source = "timm's init, converted by models/convert.py"
    model.eval()
    if source.startswith("own"):
        source += _condition_random_cnn(model, a.size)
    paddle.save(model.state_dict(), os.path.join(a.work_dir, "paddle.pdparams"))
    out: dict = {"weights": source, "export_s": None, "onnx_s": None, "errors": {}}
    exported, why_not = _exported_api()
    if exported is not None:
        t0 = time.perf_counter()
        try:
            exported.save_static(model, os.path.join(a.work_dir, "export", "inference"),
                                 exported.input_shape_of(model, a.size))
            out["export_s"] = time.perf_counter() - t0
        except Exception as exc:  # reported per path, the rest of the run goes on
            out["errors"].update({p: f"export failed: {type(exc).__name__}: {exc}" for p in EXPORTED})
            out["errors"]["onnxruntime_fp32"] = "no Paddle export to convert"
    onnx_backend, _ = _onnx_api()
    if onnx_backend is not None and out["export_s"] is not None:
        t0 = time.perf_counter()
        try:
            onnx_backend.export_onnx(os.path.join(a.work_dir, "export"))
            out["onnx_s"] = time.perf_counter() - t0
        except Exception as exc:
            out["errors"]["onnxruntime_fp32"] = f"ONNX export failed: {type(exc).__name__}: {exc}"
    return out


def _paddle_run(a: argparse.Namespace, prefix: str, path: str):
    """(run, flags) for one Paddle path: ``run(np batch) -> np logits``."""
    import numpy as np
    import paddle

    if path == "dygraph_fp32":
        from models.pretrained import load_state_dict_strict

        model = _paddle_model(a)
        load_state_dict_strict(model, paddle.load(prefix + ".pdparams"), prefix + ".pdparams")
        model.eval()

        def run(x):
            with paddle.no_grad():
                return model(paddle.to_tensor(x)).numpy()

        flags = {}
        try:
            flags.update(paddle.get_flags(["FLAGS_use_mkldnn"]))
        except Exception:  # flag unknown in this build
            pass
        return run, flags
    export_dir = os.path.dirname(prefix)
    if path == "onnxruntime_fp32":
        import util.onnx_backend as onnx_backend

        runner = onnx_backend.onnx_runner(export_dir, a.threads)
    else:
        import util.exported as exported

        precision = "bf16" if path == "pi_onednn_bf16" else "fp32"
        runner = exported.paddle_runner(prefix, precision=precision, threads=a.threads,
                                        onednn=path != "pi_native_fp32")

    def run(x):
        return np.asarray(runner(x))

    return run, {}


def worker_paddle(a: argparse.Namespace) -> dict:
    _paddle_imports()
    import paddle

    prefix = (os.path.join(a.work_dir, "paddle") if a.path == "dygraph_fp32"
              else os.path.join(a.work_dir, "export", "inference"))
    t0 = time.perf_counter()
    run, flags = _paddle_run(a, prefix, a.path)
    load_s = time.perf_counter() - t0
    res = _time_runs(run, _inputs(a.batch, a.size), a.warmup, a.steps, a.min_time)
    res.update(load_s=load_s, peak_rss_mib=_rss_mib(), version=f"paddle {paddle.__version__}", flags=flags)
    return res


# ----------------------------------------------------------------------------------------------- demo workers
def worker_demo_prep(a: argparse.Namespace) -> dict:
    """The demo checkpoint's test split, preprocessed as ``--eval`` does, and the model exported."""
    _paddle_imports()
    import numpy as np

    from util.datasets import build_dataset
    from util.deploy import load_predictor
    from util.transforms.assemble import build_eval_transform, build_reader

    pred = load_predictor(a.demo_checkpoint)
    ident = pred.identity
    ds = build_dataset("test", a.demo_data, build_eval_transform(pred.num_views, ident.data_cfg()),
                       num_classes=ident.num_classes)
    ds.reader = build_reader(**ident.preprocessing())
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    np.save(os.path.join(a.work_dir, "test_x.npy"), np.stack(xs).astype(np.float32))
    np.save(os.path.join(a.work_dir, "test_y.npy"), np.asarray(ys))
    out: dict = {"model": ident.model, "input_size": ident.input_size, "task_type": ident.task_type,
                 "num_classes": ident.num_classes, "class_names": list(ident.class_names), "n": len(ds),
                 "errors": {}}
    exported, why_not = _exported_api()
    if exported is None:
        out["errors"].update({p: why_not for p in (*EXPORTED, "onnxruntime_fp32")})
        return out
    try:
        exported.save_static(pred.model, os.path.join(a.work_dir, "export", "inference"),
                             exported.input_shape_of(pred.model, ident.input_size))
    except Exception as exc:
        out["errors"].update({p: f"export failed: {type(exc).__name__}: {exc}" for p in (*EXPORTED, "onnxruntime_fp32")})
        return out
    onnx_backend, why_not_onnx = _onnx_api()
    if onnx_backend is None:
        out["errors"]["onnxruntime_fp32"] = why_not_onnx
    else:
        try:
            onnx_backend.export_onnx(os.path.join(a.work_dir, "export"))
        except Exception as exc:
            out["errors"]["onnxruntime_fp32"] = f"ONNX export failed: {type(exc).__name__}: {exc}"
    return out


def worker_demo(a: argparse.Namespace) -> dict:
    """Logits of the whole demo test split through one Paddle path."""
    _paddle_imports()
    import numpy as np

    x = np.load(os.path.join(a.work_dir, "test_x.npy"))
    t0 = time.perf_counter()
    if a.path == "dygraph_fp32":
        from util.deploy import load_predictor

        run = load_predictor(a.demo_checkpoint).run
    else:
        run, _ = _paddle_run(a, os.path.join(a.work_dir, "export", "inference"), a.path)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = np.concatenate([np.asarray(run(np.ascontiguousarray(x[i:i + a.batch])), np.float32)
                             for i in range(0, len(x), a.batch)])
    return {"logits": logits.tolist(), "load_s": load_s, "run_s": time.perf_counter() - t0,
            "peak_rss_mib": _rss_mib()}


WORKERS = {"probe": worker_probe, "torch_probe": worker_torch_probe, "torch_prep": worker_torch_prep, "paddle_prep": worker_paddle_prep,
           "demo_prep": worker_demo_prep, "demo": worker_demo}


def run_worker(a: argparse.Namespace) -> dict:
    if a.worker in WORKERS:
        return WORKERS[a.worker](a)
    if a.worker == "time":
        return worker_torch(a) if PATHS[a.path][1] == "torch" else worker_paddle(a)
    raise SystemExit(f"unknown worker {a.worker}")


# ================================================================================================ driver
class WorkerError(RuntimeError):
    pass


def _spawn(a: argparse.Namespace, side: str, worker: str, **kw) -> dict:
    """Run one worker under ``side``'s interpreter; its result, or ``WorkerError`` with the output tail."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), PYTHONWARNINGS="ignore",
               GLOG_minloglevel="2")
    cmd = [a.torch_python if side == "torch" else a.paddle_python, os.path.abspath(__file__), "--worker", worker,
           "--threads", str(a.threads), "--warmup", str(a.warmup), "--steps", str(a.steps),
           "--min_time", str(a.min_time)]
    for k, v in kw.items():
        if isinstance(v, bool):
            if v:
                cmd.append(f"--{k}")
        elif v is not None:
            cmd += [f"--{k}", str(v)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
        raise WorkerError(f"{worker} worker ({side}) exited with {proc.returncode}: " + " | ".join(tail))
    return json.loads(lines[-1][len("RESULT "):])


def _softmax(logits) -> list:
    out = []
    for row in logits:
        m = max(row)
        e = [math.exp(v - m) for v in row]
        s = sum(e)
        out.append([v / s for v in e])
    return out


def _max_abs_diff(p, q) -> float:
    if p is None or q is None or len(p) != len(q):
        return float("nan")
    return max(abs(x - y) for rp, rq in zip(p, q) for x, y in zip(rp, rq))


def _load_avg() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def _fmt(v: float | None, spec: str, na: str = "-") -> str:
    return na if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _benchmark_model(a, spec: ModelSpec, probe: dict, torch_ok: bool, say) -> list[dict]:
    """Prepare one model's weights and export, then time every path at each batch size; one record per batch."""
    ours = spec.quick_ours if a.quick else spec.ours
    tname = spec.quick_torch if a.quick else spec.torch
    size = QUICK_SIZE if a.quick else spec.size
    batches = a.batch or (QUICK_BATCHES if a.quick and spec.vit else (2,) if a.quick else spec.batches)
    work = tempfile.mkdtemp(prefix=f"inference_speed_{spec.key}_", dir=a.work_dir)
    common = dict(ours=ours, torch_name=tname, size=size, vit=spec.vit, work_dir=work)
    skip = dict(probe["skip"])
    torch_info = None
    try:
        if torch_ok:
            try:
                torch_info = _spawn(a, "torch", "torch_prep", **common)
            except WorkerError as exc:
                skip.update({"torch_fp32": str(exc), "torch_bf16": str(exc)})
        else:
            skip.update({"torch_fp32": a.torch_missing, "torch_bf16": a.torch_missing})
        prep = _spawn(a, "paddle", "paddle_prep", **common)
        for p, why in prep["errors"].items():
            skip.setdefault(p, why)
        paths = [p for p in a.paths if p not in skip]
        records = []
        for batch in batches:
            rounds: dict[str, list[dict]] = {p: [] for p in paths}
            errors: dict[str, str] = {}
            say(f"\n{spec.title}: ours {ours} / torch {tname}, batch {batch}, {size} px; weights: {prep['weights']}"
                f"{'' if spec.vit else ' (torch: timm init)'}; load average {_load_avg()}")
            for r in range(a.rounds):
                order = paths if r % 2 == 0 else paths[::-1]
                for p in order:
                    if p in errors:
                        continue
                    try:
                        res = _spawn(a, PATHS[p][1], "time", path=p, batch=batch, **common)
                    except WorkerError as exc:
                        errors[p] = str(exc)
                        say(f"  round {r + 1} {PATHS[p][0]:30s} failed: {exc}")
                        continue
                    res["img_s"] = batch * len(res["times"]) / sum(res["times"])
                    res["load_avg"] = _load_avg()
                    rounds[p].append(res)
                    say(f"  round {r + 1} {PATHS[p][0]:30s} {res['img_s']:8.2f} img/s  load {res['load_s']:5.1f} s  "
                        f"peak RSS {res['peak_rss_mib']:6.0f} MiB  (load average {res['load_avg']})")
            rec = _summarise(spec, ours, tname, size, batch, prep, torch_info, rounds, {**skip, **errors}, a)
            records.append(rec)
            say(_table(rec))
        return records
    finally:
        if not a.keep_work:
            shutil.rmtree(work, ignore_errors=True)


def _summarise(spec, ours, tname, size, batch, prep, torch_info, rounds, skipped, a) -> dict:
    paths: dict[str, dict] = {}
    for p, runs in rounds.items():
        if not runs:
            continue
        img = [r["img_s"] for r in runs]
        paths[p] = {"img_s": statistics.median(img), "min": min(img), "max": max(img),
                    "load_s": statistics.median(r["load_s"] for r in runs),
                    "first_s": statistics.median(r["first_s"] for r in runs),
                    "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                    "logits": runs[-1]["logits"], "probs": _softmax(runs[-1]["logits"]),
                    "version": runs[-1]["version"],
                    "flags": runs[-1]["flags"], "rounds": runs}
    for p, d in paths.items():
        if PATHS[p][1] == "torch" and not spec.vit:
            # other weights than ours: torch bf16 against torch fp32 only
            ref_path = "torch_fp32" if p == "torch_bf16" else None
            d["diff_vs"] = "torch fp32" if ref_path else None
        else:
            ref_path, d["diff_vs"] = REFERENCE, "ours dygraph fp32"
        ref = paths.get(ref_path, {}) if ref_path else {}
        d["diff"] = _max_abs_diff(d["probs"], ref.get("probs"))
        scale = max((abs(v) for row in ref.get("logits", []) for v in row), default=0.0)
        d["logit_rel_diff"] = _max_abs_diff(d["logits"], ref.get("logits")) / scale if scale else float("nan")
    for base in ("torch_fp32", "torch_bf16"):
        b = paths.get(base, {}).get("img_s")
        for d in paths.values():
            d[f"x_{base}"] = d["img_s"] / b if b else None
    return {"model": spec.key, "title": spec.title, "ours": ours, "torch": tname, "size": size, "batch": batch,
            "vit": spec.vit, "weights": prep["weights"], "export_s": prep["export_s"], "onnx_s": prep["onnx_s"],
            "torch_prep": torch_info, "paths": paths, "skipped": {p: skipped[p] for p in PATHS if p in skipped},
            "rounds": a.rounds}


def _table(rec: dict) -> str:
    lines = [f"{rec['title']}, batch {rec['batch']}, {rec['size']} px: medians of {rec['rounds']} rounds "
             f"[min-max]; max|dprob| = max |softmax difference| on the same inputs "
             + ("and the same weights" if rec["vit"] else "(CNN: torch has its own weights)")
             + ", rel|dlogit| = max |logit difference| / max |reference logit|",
             f"  {'path':30s}{'img/s':>9s} {'[min-max]':>15s}{'x torch fp32':>13s}{'x torch bf16':>13s}"
             f"{'load s':>8s}{'1st s':>7s}{'peak MiB':>10s}  max|dprob| rel|dlogit|"]
    for p, (label, _, _) in PATHS.items():
        d = rec["paths"].get(p)
        if d is None:
            why = rec["skipped"].get(p, "not run")
            lines.append(f"  {label:30s} skipped: {why[:200]}")
            continue
        vs = "n/a (other weights)" if d["diff_vs"] is None else (
            f"{_fmt(d['diff'], '.1e'):>10s} {_fmt(d['logit_rel_diff'], '.1e'):>11s} vs {d['diff_vs']}"
            if p != REFERENCE else "(reference)")
        lines.append(f"  {label:30s}{d['img_s']:9.2f} {'[%.2f-%.2f]' % (d['min'], d['max']):>15s}"
                     f"{_fmt(d['x_torch_fp32'], '13.2f', ' ' * 12 + '-')}{_fmt(d['x_torch_bf16'], '13.2f', ' ' * 12 + '-')}"
                     f"{d['load_s']:8.1f}{d['first_s']:7.2f}{d['peak_rss_mib']:10.0f}  {vs}")
    return "\n".join(lines)


def _targets(records: list[dict], bf16_capable: bool, max_diff: float) -> list[dict]:
    """The issue's speed targets per (model, batch): on a bf16 CPU our fastest path >= 1.5x torch bf16 and
    >= 3x torch fp32; on an AVX2-only CPU >= 1.5x torch fp32 and no slower than ONNX Runtime. A path whose
    outputs moved by more than ``max_diff`` (vs dygraph fp32) does not count: it is fast but wrong."""
    out = []
    for rec in records:
        P = rec["paths"]
        valid = {p: d for p, d in P.items() if p in OURS
                 and not (isinstance(d.get("diff"), float) and (math.isnan(d["diff"]) or d["diff"] > max_diff))}
        excluded = [p for p in OURS if p in P and p not in valid]
        t = {"model": rec["title"], "batch": rec["batch"], "excluded": excluded, "checks": []}
        if valid:
            best = max(valid, key=lambda p: valid[p]["img_s"])
            t["fastest"], t["img_s"] = best, valid[best]["img_s"]
            speed = valid[best]["img_s"]
            wanted = ([("torch_bf16", 1.5), ("torch_fp32", 3.0)] if bf16_capable
                      else [("torch_fp32", 1.5), ("onnxruntime_fp32", 1.0)])
            for base, factor in wanted:
                b = P.get(base, {}).get("img_s")
                t["checks"].append({"vs": base, "need": factor, "ratio": speed / b if b else None,
                                    "met": (speed / b >= factor) if b else None})
            ort = P.get("onnxruntime_fp32", {}).get("img_s")
            t["x_onnxruntime"] = speed / ort if ort else None
        out.append(t)
    return out


def _print_targets(targets: list[dict], bf16_capable: bool, max_diff: float, say) -> None:
    say(f"\nTargets ({'bf16-capable CPU: fastest Paddle path >= 1.5x torch bf16 and >= 3x torch fp32' if bf16_capable else 'AVX2-only CPU: fastest Paddle path >= 1.5x torch fp32 and >= ONNX Runtime'}; "
        f"paths whose max|dprob| > {max_diff:g} do not count)")
    for t in targets:
        if "fastest" not in t:
            say(f"  {t['model']}, batch {t['batch']}: no Paddle path with valid outputs")
            continue
        parts = []
        for c in t["checks"]:
            if c["ratio"] is None:
                parts.append(f"vs {PATHS[c['vs']][0]}: not measured")
            else:
                parts.append(f"{c['ratio']:.2f}x {PATHS[c['vs']][0]} (need {c['need']:g}x) "
                             f"{'MET' if c['met'] else 'NOT MET'}")
        if bf16_capable and t.get("x_onnxruntime"):
            parts.append(f"(for information: {t['x_onnxruntime']:.2f}x ONNX Runtime fp32)")
        ex = f"; not counted (outputs off): {', '.join(PATHS[p][0] for p in t['excluded'])}" if t["excluded"] else ""
        say(f"  {t['model']}, batch {t['batch']}: fastest {PATHS[t['fastest']][0]} {t['img_s']:.2f} img/s: "
            + "; ".join(parts) + ex)


# ----------------------------------------------------------------------------------------------- demo driver
def _demo(a, probe: dict, say) -> dict:
    _paddle_imports()
    import warnings

    warnings.filterwarnings("ignore", message="No ccache found")  # Paddle's import, about C++ extensions
    import numpy as np
    import paddle

    import engine_finetune as engine

    work = tempfile.mkdtemp(prefix="inference_speed_demo_", dir=a.work_dir)
    try:
        common = dict(work_dir=work, demo_checkpoint=os.path.abspath(a.demo_checkpoint),
                      demo_data=os.path.abspath(a.demo_data))
        prep = _spawn(a, "paddle", "demo_prep", **common)
        skip = {**{p: w for p, w in probe["skip"].items() if p in PATHS}, **prep["errors"]}
        say(f"\nDemo accuracy: {a.demo_checkpoint} ({prep['model']}, {prep['input_size']} px, {prep['task_type']}), "
            f"test split of {a.demo_data}: {prep['n']} images")
        task = engine.get_task(prep["task_type"])
        y = np.load(os.path.join(work, "test_y.npy"))
        res: dict[str, dict] = {}
        for p in (*OURS, "onnxruntime_fp32"):
            if p in skip:
                res[p] = {"skipped": skip[p]}
                continue
            try:
                r = _spawn(a, "paddle", "demo", path=p, batch=50, size=prep["input_size"], ours=prep["model"], **common)
            except WorkerError as exc:
                res[p] = {"skipped": str(exc)}
                continue
            logits = np.asarray(r.pop("logits"), np.float32)
            outputs = task.activation(paddle.to_tensor(logits)).numpy().astype(np.float64)
            m = task.metrics(y, outputs, prep["num_classes"], prep["class_names"], None)
            r.update(roc_auc=float(m["roc_auc"]), outputs=outputs)
            res[p] = r
        ref = res.get(REFERENCE, {})
        say(f"  {'path':30s}{'test AUROC':>11s}{'change':>10s}{'max|dprob|':>12s}{'img/s':>8s}  check")
        for p, r in res.items():
            label = PATHS[p][0]
            if "skipped" in r:
                say(f"  {label:30s} skipped: {r['skipped'][:200]}")
                continue
            delta = r["roc_auc"] - ref["roc_auc"] if "roc_auc" in ref else float("nan")
            diff = float(np.abs(r["outputs"] - ref["outputs"]).max()) if "outputs" in ref else float("nan")
            r.update(delta=delta, max_prob_diff=diff, img_s=prep["n"] / r["run_s"])
            check = ""
            if p == "pi_onednn_bf16":
                r["pass"] = bool(abs(delta) <= BF16_AUROC_TOLERANCE)
                check = f"{'PASS' if r['pass'] else 'FAIL'} (|change| <= {BF16_AUROC_TOLERANCE})"
            say(f"  {label:30s}{r['roc_auc']:11.4f}{delta:+10.4f}{diff:12.1e}{r['img_s']:8.1f}  {check}")
        for r in res.values():
            r.pop("outputs", None)
        return {"checkpoint": a.demo_checkpoint, "data": a.demo_data, "prep": prep, "paths": res}
    finally:
        if not a.keep_work:
            shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated, from {', '.join(MODELS)} (default: all); 'none' skips the speed part")
    p.add_argument("--paths", default=",".join(PATHS),
                   help=f"comma-separated, from {', '.join(PATHS)} (default: all; {REFERENCE} is always run, the "
                        f"accuracy reference)")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="batch sizes for every model (default: ViTs 1 and 8, CNNs 8)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; each round runs every path once")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per worker (the first one included)")
    p.add_argument("--steps", type=int, default=3, help="at least this many timed calls per worker ...")
    p.add_argument("--min_time", type=float, default=3.0, help="... and at least this many seconds of them")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every path (default 2)")
    p.add_argument("--quick", action="store_true",
                   help="tiny stand-in models at 32 px, 2 rounds, 1 warmup + 2 steps: a smoke run of the harness")
    p.add_argument("--max_prob_diff", type=float, default=0.02,
                   help="a Paddle path whose max|dprob| vs dygraph fp32 exceeds this is not counted for the "
                        "speed targets (default 0.02)")
    p.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    p.add_argument("--demo_checkpoint", default=None,
                   help="a toolkit checkpoint (e.g. the demo's checkpoint-best.pdparams): evaluate its test split "
                        "through every Paddle path and compare the AUROC")
    p.add_argument("--demo_data", default=os.path.join(REPO, "data", "retinamnist.npz"),
                   help="the data of --demo_checkpoint (default: the bundled data/retinamnist.npz)")
    p.add_argument("--torch_python", default=None,
                   help=f"Python of an environment with torch + timm (default: $TORCH_PYTHON, else "
                        f"{DEFAULT_TORCH_PYTHON} if it exists; none: our paths only)")
    p.add_argument("--paddle_python", default=os.environ.get("PADDLE_PYTHON", sys.executable),
                   help="Python of the toolkit's environment (default: $PADDLE_PYTHON, else this interpreter)")
    p.add_argument("--work_dir", default=None, help="where weights and exports are written (default: the temp dir)")
    p.add_argument("--keep_work", action="store_true", help="keep the weights and exports afterwards")
    # worker-only arguments
    for name in ("--worker", "--path", "--ours", "--torch_name", "--size"):
        p.add_argument(name, default=None, help=argparse.SUPPRESS)
    p.add_argument("--vit", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.worker:
        if a.size is not None:
            a.size = int(a.size)
        a.batch = int(a.batch[0]) if a.batch else None
        print("RESULT " + json.dumps(run_worker(a)), flush=True)
        return 0

    names = [] if a.models.strip().lower() == "none" else [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        print(f"error: --models {','.join(unknown)}: unknown (one of {', '.join(MODELS)}, or none); "
              f"pick from those", file=sys.stderr)
        return 2
    paths = [q.strip() for q in a.paths.split(",") if q.strip()]
    bad = [q for q in paths if q not in PATHS]
    if bad:
        print(f"error: --paths {','.join(bad)}: unknown (one of {', '.join(PATHS)}); pick from those", file=sys.stderr)
        return 2
    a.paths = [q for q in PATHS if q in paths or q == REFERENCE]
    if a.demo_checkpoint and not os.path.isfile(a.demo_checkpoint):
        print(f"error: --demo_checkpoint {a.demo_checkpoint}: no such file (a toolkit checkpoint, e.g. "
              f"<run folder>/checkpoint-best.pdparams); train the demo first (bash run.sh demo)", file=sys.stderr)
        return 2
    if a.demo_checkpoint and not os.path.exists(a.demo_data):
        print(f"error: --demo_data {a.demo_data}: not found (the data the checkpoint was trained on); "
              f"pass its path", file=sys.stderr)
        return 2
    if a.quick:
        a.rounds, a.warmup, a.steps, a.min_time = min(a.rounds, 2), 1, 2, 0.0
    a.torch_python = a.torch_python or os.environ.get("TORCH_PYTHON") or (
        DEFAULT_TORCH_PYTHON if os.path.exists(DEFAULT_TORCH_PYTHON) else None)
    a.torch_missing = ("no torch environment (pass --torch_python or set TORCH_PYTHON)" if not a.torch_python
                       else None)
    a.work_dir = a.work_dir or tempfile.gettempdir()
    os.makedirs(a.work_dir, exist_ok=True)
    log: list[str] = []

    def say(msg: str) -> None:
        log.append(msg)
        print(msg, flush=True)

    t_start = time.time()
    try:
        probe = _spawn(a, "paddle", "probe")
    except WorkerError as exc:
        print(f"error: the Paddle environment ({a.paddle_python}) cannot run the benchmark: {exc}; "
              f"activate the toolkit's environment or pass --paddle_python", file=sys.stderr)
        return 2
    f = probe["cpu_features"]
    feats = ", ".join(f"{k} {'yes' if f.get(k) else 'no'}" for k in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    say(f"CPU: {f.get('model_name', '?')}, {f.get('threads', os.cpu_count())} hardware threads; {feats}; "
        f"benchmark threads {a.threads}; load average {_load_avg()}")
    say(f"Paddle {probe['paddle']}, onnxruntime {probe['onnxruntime'] or 'not installed'}, paddle2onnx "
        f"{probe['paddle2onnx'] or 'not installed'}; bf16: "
        f"{'available' if not probe['bf16_reason'] else 'skipped: ' + probe['bf16_reason']}")
    torch_ok, torch_version = False, None
    if a.torch_python and names:
        try:
            torch_version = _spawn(a, "torch", "torch_probe")["version"]
            torch_ok = True
        except (WorkerError, OSError) as exc:
            a.torch_missing = f"{a.torch_python} cannot run torch + timm ({exc})"
    if names:
        say(f"torch side: {f'{torch_version} ({a.torch_python})' if torch_ok else a.torch_missing}")
    if names:
        say(f"workload: {a.threads} threads, {a.warmup} warmup + >= {a.steps} timed calls and >= {a.min_time:g} s "
            f"per worker, {a.rounds} rounds (path order reversed every round), random inputs, {NUM_CLASSES} outputs"
            + (", --quick (tiny models)" if a.quick else ""))

    records: list[dict] = []
    if a.quick:  # ViT-B and ViT-L share the same tiny stand-in: run it once
        seen: set = set()
        names = [n for n in names if not ((MODELS[n].quick_ours, MODELS[n].quick_torch) in seen
                                          or seen.add((MODELS[n].quick_ours, MODELS[n].quick_torch)))]
    for name in names:
        try:
            records += _benchmark_model(a, MODELS[name], probe, torch_ok, say)
        except WorkerError as exc:
            say(f"\n{MODELS[name].title}: preparation failed: {exc}")
    # the targets follow the CPU, whether or not this environment can run a bf16 path on it
    bf16_capable = bool(f.get("avx512_bf16") or f.get("amx_bf16"))
    targets = _targets(records, bf16_capable, a.max_prob_diff)
    if records:
        _print_targets(targets, bf16_capable, a.max_prob_diff, say)
    demo = None
    if a.demo_checkpoint:
        try:
            demo = _demo(a, probe, say)
        except WorkerError as exc:
            say(f"\nDemo accuracy: failed: {exc}")
    say(f"\n(wall time {time.time() - t_start:.0f} s; load average {_load_avg()} at the end; compare ratios, "
        f"not img/s, between runs)")
    if a.json:
        for rec in records:
            for d in rec["paths"].values():
                for r in d["rounds"]:
                    r.pop("logits", None)
        with open(a.json, "w") as fh:
            json.dump({"args": {k: v for k, v in vars(a).items() if not k.startswith("_")}, "probe": probe,
                       "records": records, "targets": targets, "demo": demo, "log": log}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
