"""CPU speed of our Paddle ViT against the PyTorch/timm reference, measured side by side in one run.

Paddle (our toolkit) and PyTorch (the reference) live in different virtualenvs, so this script is a driver
that runs itself as a worker subprocess under each interpreter, alternating sides round by round
(paddle, torch / torch, paddle / ...). Both sides run the same workload: same ViT size, batch size, input
size, fp32, thread count, number of warmup and timed steps, random inputs generated in memory (no data
loading). Each worker measures

* training img/s: forward + label-smoothing CE (0.1) + backward + AdamW step (weight decay 0.05),
  drop_path 0.1, model in train mode. Paddle uses our layer-decay parameter groups
  (util/lr_decay.build_optimizer, as main_finetune.py); torch uses plain AdamW with two groups
  (decay / no decay), the optimizer *call* the reference makes, minus the per-layer LR scales;
* inference img/s: eval mode, no grad, forward only.

The driver prints the median over rounds per side and the Paddle/torch ratio. Because the other core of a
shared machine may be busy, absolute numbers drift; running both sides alternately in the same run exposes
them to the same load, so the *ratio* is what to compare between runs.

Usage (from the repository root):
    python benchmarks/vit_cpu_speed.py --torch-python TORCH_PYTHON                 # ViT-B/16, batch 4, 3 rounds
    python benchmarks/vit_cpu_speed.py --torch-python TORCH_PYTHON --model large   # ViT-L/16 (RETFound size), slow
    python benchmarks/vit_cpu_speed.py --paddle_env FLAGS_use_mkldnn=1   # try a Paddle flag

The interpreters of the two sides: ``--paddle-python`` (the toolkit's environment; default ``$PADDLE_PYTHON``
if set, else the interpreter running this script) and ``--torch-python`` (an environment with torch + timm;
default ``$TORCH_PYTHON`` if set, else ``python`` on the PATH).

References: timm ``vision_transformer.py`` / ``loss/cross_entropy.py`` (the reference model and loss),
RETFound_MAE ``main_finetune.py`` (AdamW recipe).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (our registered model, embed dim, depth, heads) for the ViTs; (ours, timm's name, input size) for CNNs
MODELS = {
    "base": ("vit_base_patch16", 768, 12, 12),
    "large": ("retfound_mae", 1024, 24, 16),
    "test": ("vit_test", 32, 2, 2),
}
CNNS = {
    "resnet50": ("resnet50", "resnet50", 224),
    "efficientnet_b4": ("efficientnet_b4", "efficientnet_b4", 380),
    "convnext_small": ("convnext_small", "convnext_small", 224),
    "cnn_test": ("resnet50_test", "resnet18", 32),
}
# the Paddle sides and their environment: the toolkit as it runs (util/blas.py: the current MKL, freed memory
# kept; models/cpu_kernels.py: the compiled kernels), the MKLML Paddle's wheel bundles, glibc's default malloc
# thresholds (keep_freed_memory opted out), and Paddle's own kernels instead of the compiled ones
SYSTEM_MALLOC = "paddle_system_malloc"
OWN_KERNELS = "paddle_own_kernels"
PADDLE_SIDES = {"paddle": {}, "paddle_bundled_mkl": {"RETFOUND_MKL": "bundled"},
                SYSTEM_MALLOC: {"RETFOUND_MALLOC": "system"}, OWN_KERNELS: {"RETFOUND_CPU_KERNELS": "paddle"}}
NUM_CLASSES = 5
DROP_PATH = 0.1
WEIGHT_DECAY = 0.05
LAYER_DECAY = 0.65
SMOOTHING = 0.1
LR = 5e-4


# ------------------------------------------------------------------------------------------------ workers
def _time_steps(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def worker_paddle(a: argparse.Namespace) -> dict:
    sys.path.insert(0, REPO)
    from util.blas import loaded_blas, select_mkl

    blas = select_mkl()  # as the entry points do (RETFOUND_MKL=bundled for the bundled side)
    import numpy as np
    import paddle

    import models
    from util.losses import soft_cross_entropy
    from util.lr_decay import build_optimizer

    paddle.seed(0)
    if a.model in CNNS:  # no stochastic depth on either side for the CNNs
        model = models.create_model(CNNS[a.model][0], num_classes=NUM_CLASSES, input_size=a.input_size)
    else:
        model = models.create_model(MODELS[a.model][0], num_classes=NUM_CLASSES, drop_path_rate=DROP_PATH,
                                    global_pool=True, input_size=a.input_size)
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal((a.batch_size, 3, a.input_size, a.input_size), dtype=np.float32))
    y = paddle.to_tensor(rng.integers(0, NUM_CLASSES, a.batch_size).astype(np.int64))
    if a.paddle_groups == "lrd":
        opt = build_optimizer(model, LR, weight_decay=WEIGHT_DECAY, layer_decay=LAYER_DECAY)
    else:
        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
        decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in skip]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and n not in skip)]
        opt = paddle.optimizer.AdamW(learning_rate=LR, weight_decay=WEIGHT_DECAY, parameters=[
            {"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}])

    def train_step():
        opt.set_lr(LR)  # the engine sets the LR every iteration
        loss = soft_cross_entropy(model(x), y, SMOOTHING)
        float(loss)      # the engine reads the loss every step (non-finite check)
        loss.backward()
        opt.step()
        opt.clear_grad()

    def infer_step():
        with paddle.no_grad():
            model(x).numpy()

    model.train()
    train_times = _time_steps(train_step, a.warmup, a.steps)
    model.eval()
    infer_times = _time_steps(infer_step, a.warmup, a.steps)
    flags = {}
    for f in ("FLAGS_use_mkldnn",):
        try:
            flags.update(paddle.get_flags([f]))
        except Exception:  # flag not known in this build
            pass
    flags["blas"] = blas
    from models import cpu_kernels
    flags["kernels"] = cpu_kernels.status()
    flags["loaded"] = [os.path.basename(p) for p in loaded_blas() if "libmkl_rt" in p or "libmklml" in p]
    return {"train_times": train_times, "infer_times": infer_times,
            "version": f"paddle {paddle.__version__}", "groups": len(opt._param_groups), "flags": flags}


def worker_torch(a: argparse.Namespace) -> dict:
    import types
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    from functools import partial

    import numpy as np
    import timm
    import torch
    from timm.layers import use_fused_attn
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.models.vision_transformer import VisionTransformer

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.model in CNNS:
        model = timm.create_model(CNNS[a.model][1], num_classes=NUM_CLASSES)
    else:  # RETFound's model: timm VisionTransformer, mean pooling over patch tokens -> fc_norm -> head
        _, dim, depth, heads = MODELS[a.model]
        model = VisionTransformer(img_size=a.input_size, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads,
                                  mlp_ratio=4, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                  num_classes=NUM_CLASSES, drop_path_rate=DROP_PATH, global_pool="avg")
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((a.batch_size, 3, a.input_size, a.input_size), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, NUM_CLASSES, a.batch_size).astype(np.int64))
    skip = {"pos_embed", "cls_token"}
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in skip]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and n not in skip)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    criterion = LabelSmoothingCrossEntropy(SMOOTHING)

    def train_step():
        for g in opt.param_groups:
            g["lr"] = LR
        loss = criterion(model(x), y)
        loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()

    def infer_step():
        with torch.no_grad():
            model(x).numpy()

    model.train()
    train_times = _time_steps(train_step, a.warmup, a.steps)
    model.eval()
    infer_times = _time_steps(infer_step, a.warmup, a.steps)
    return {"train_times": train_times, "infer_times": infer_times,
            "version": f"torch {torch.__version__} timm {timm.__version__}", "groups": len(opt.param_groups),
            "flags": {"timm_fused_attn": bool(use_fused_attn()), "torch_threads": torch.get_num_threads()}}


ISA_HELP = ("native (default): each library picks its kernels for this CPU; avx2: every side capped at AVX2 "
            "(MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY), an approximation of an AVX2-only "
            "CPU on an AVX-512 one: same cores, caches and clock, so not a measurement of such a machine")


def isa_caps(isa: str) -> dict:
    """The environment that caps MKL, oneDNN and PyTorch's own kernels at ``isa`` (empty for native)."""
    if isa == "native":
        return {}
    return {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2",
            "ATEN_CPU_CAPABILITY": "avx2"}


# ------------------------------------------------------------------------------------------------ driver
def _run_worker(side: str, a: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(a.threads)
    env["MKL_NUM_THREADS"] = str(a.threads)
    env["PYTHONWARNINGS"] = "ignore"
    env.update(isa_caps(a.isa))
    if side in PADDLE_SIDES:
        env.pop("FLAGS_mklml_dir", None)
        env.pop("RETFOUND_MKL", None)
        env.pop("RETFOUND_MALLOC", None)
        env.update(PADDLE_SIDES[side])
        for kv in a.paddle_env:
            k, _, v = kv.partition("=")
            env[k] = v
    worker = "paddle" if side in PADDLE_SIDES else side
    cmd = [a.paddle_python if worker == "paddle" else a.torch_python, os.path.abspath(__file__), "--worker", worker,
           "--model", a.model, "--batch_size", str(a.batch_size), "--input_size", str(a.input_size),
           "--threads", str(a.threads), "--warmup", str(a.warmup), "--steps", str(a.steps),
           "--paddle_groups", a.paddle_groups]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"vit_cpu_speed: the {side} worker failed (exit code {proc.returncode}); "
                         f"its output is above")
    return json.loads(lines[-1][len("RESULT "):])


def _img_s(batch: int, times: list[float]) -> float:
    return batch * len(times) / sum(times)


def _load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_flags() -> str:
    """The SIMD flags that decide the kernels: avx2, the AVX-512 family's base, bf16 and AMX."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    shown = [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if x in flags]
    return " ".join(shown) or "none read"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS) + sorted(CNNS), default="base",
                   help="base = ViT-B/16 (default), large = ViT-L/16 (RETFound), test = tiny smoke test; the CNNs "
                        "(timm's model of the same name on the torch side; cnn_test = tiny smoke test)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--input_size", type=int, default=None,
                   help="default 224 (EfficientNet-B4: 380, its native size; cnn_test: 32)")
    p.add_argument("--mkl", choices=["both", "current", "bundled"], default="both",
                   help="the Paddle side(s): the current MKL the toolkit loads (util/blas.py), Paddle's bundled "
                        "MKLML (RETFOUND_MKL=bundled), or both side by side (default)")
    p.add_argument("--malloc", choices=["kept", "both"], default="kept",
                   help="both: add a Paddle side (current MKL) with glibc's default malloc thresholds "
                        "(RETFOUND_MALLOC=system), against the toolkit's freed-memory reuse (util/blas.py)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS / torch.set_num_threads for both sides")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; each round runs both sides once")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones (train and eval)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per worker (train and eval)")
    p.add_argument("--paddle_groups", choices=["lrd", "plain"], default="lrd",
                   help="Paddle optimizer groups: lrd = our layer-decay groups (default, as main_finetune.py), "
                        "plain = two groups like the torch side")
    p.add_argument("--kernels", choices=["compiled", "both"], default="compiled",
                   help="both: add a Paddle side (current MKL) with Paddle's own CPU kernels instead of "
                        "models/cpu_kernels.py's compiled ones (RETFOUND_CPU_KERNELS=paddle)")
    p.add_argument("--paddle_env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable for the Paddle worker only (repeatable), e.g. FLAGS_use_mkldnn=1")
    p.add_argument("--isa", choices=["native", "avx2"], default="native", help=ISA_HELP)
    p.add_argument("--json", default=None, help="also write all measurements to this JSON file")
    p.add_argument("--paddle-python", default=os.environ.get("PADDLE_PYTHON", sys.executable),
                   help="Python of the toolkit's (Paddle) environment (default: $PADDLE_PYTHON, else this interpreter)")
    p.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON", "python"),
                   help="Python of an environment with torch + timm (default: $TORCH_PYTHON, else python)")
    p.add_argument("--worker", choices=["paddle", "torch"], default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.input_size is None:
        a.input_size = CNNS[a.model][2] if a.model in CNNS else 224

    if a.worker:
        res = worker_paddle(a) if a.worker == "paddle" else worker_torch(a)
        print("RESULT " + json.dumps(res), flush=True)
        return

    print(f"machine: {_cpu_name()}, nproc {os.cpu_count()}, Python {platform.python_version()}, {_load()} "
          f"(before)")
    print(f"CPU flags: {_cpu_flags()}; instructions used: {a.isa}")
    label = f"{a.model} ({CNNS[a.model][0]} / timm {CNNS[a.model][1]})" if a.model in CNNS else \
        f"ViT-{a.model} ({MODELS[a.model][0]})"
    print(f"workload: {label}, batch {a.batch_size}, {a.input_size}px, fp32, "
          f"{a.threads} threads, {a.warmup} warmup + {a.steps} timed steps, {a.rounds} alternating rounds"
          + (f", paddle env {' '.join(a.paddle_env)}" if a.paddle_env else ""))
    paddle_sides = {"both": ["paddle", "paddle_bundled_mkl"], "current": ["paddle"],
                    "bundled": ["paddle_bundled_mkl"]}[a.mkl] + ([SYSTEM_MALLOC] if a.malloc == "both" else []) + ([OWN_KERNELS] if a.kernels == "both" else [])
    sides = [*paddle_sides, "torch"]
    results: dict[str, list[dict]] = {s: [] for s in sides}
    t_start = time.time()
    for r in range(a.rounds):
        order = sides[r % len(sides):] + sides[:r % len(sides)]  # each side leads a round in turn
        for side in order:
            res = _run_worker(side, a)
            res["train_img_s"] = _img_s(a.batch_size, res["train_times"])
            res["infer_img_s"] = _img_s(a.batch_size, res["infer_times"])
            res["load_after"] = _load()
            results[side].append(res)
            print(f"  round {r + 1} {side:18s}: train {res['train_img_s']:7.3f} img/s, "
                  f"infer {res['infer_img_s']:7.3f} img/s   ({res['load_after']})", flush=True)

    med = {s: {k: statistics.median(x[k] for x in results[s]) for k in ("train_img_s", "infer_img_s")}
           for s in results}
    rng = {s: {k: (min(x[k] for x in results[s]), max(x[k] for x in results[s]))
               for k in ("train_img_s", "infer_img_s")} for s in results}
    print()
    for s in paddle_sides:
        print(f"versions: {s}: {results[s][0]['version']} ({results[s][0]['groups']} optimizer groups, "
              f"{results[s][0]['flags']})")
    print(f"versions: torch: {results['torch'][0]['version']} ({results['torch'][0]['groups']} optimizer groups, "
          f"{results['torch'][0]['flags']})")
    print(f"{'':30s}{'train img/s':>22s}{'inference img/s':>26s}")
    for s in sides:
        tr, inf = med[s]["train_img_s"], med[s]["infer_img_s"]
        (tl, th), (il, ih) = rng[s]["train_img_s"], rng[s]["infer_img_s"]
        print(f"{s:30s}{tr:8.3f} [{tl:.3f}-{th:.3f}]{inf:12.3f} [{il:.3f}-{ih:.3f}]")
    ratios = {}
    for s in paddle_sides:
        rt = med[s]["train_img_s"] / med["torch"]["train_img_s"]
        ri = med[s]["infer_img_s"] / med["torch"]["infer_img_s"]
        ratios[s] = {"train": rt, "infer": ri}
        print(f"{'ratio ' + s + '/torch':30s}{rt:8.3f}{'':14s}{ri:12.3f}")
    if "paddle" in med and SYSTEM_MALLOC in med:
        cur, old = med["paddle"], med[SYSTEM_MALLOC]
        print(f"{'ratio kept/system malloc':30s}{cur['train_img_s'] / old['train_img_s']:8.3f}{'':14s}"
              f"{cur['infer_img_s'] / old['infer_img_s']:12.3f}")
    if "paddle" in med and OWN_KERNELS in med:
        cur, old = med["paddle"], med[OWN_KERNELS]
        print(f"{'ratio compiled/own kernels':30s}{cur['train_img_s'] / old['train_img_s']:8.3f}{'':14s}"
              f"{cur['infer_img_s'] / old['infer_img_s']:12.3f}")
    if "paddle" in med and "paddle_bundled_mkl" in med:
        cur, old = med["paddle"], med["paddle_bundled_mkl"]
        print(f"{'ratio current/bundled MKL':30s}{cur['train_img_s'] / old['train_img_s']:8.3f}{'':14s}"
              f"{cur['infer_img_s'] / old['infer_img_s']:12.3f}")
    print(f"(medians over {a.rounds} rounds, [min-max]; sides alternate round by round so both see the same "
          f"machine load - compare ratios, not absolute numbers, between runs; {_load()} (after), "
          f"wall time {time.time() - t_start:.0f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results, "median": med, "ratio": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
