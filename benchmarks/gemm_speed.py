"""Matrix products on CPU: Paddle with the current MKL (as the toolkit runs, util/blas.py), Paddle with the MKLML
its wheel bundles, and PyTorch, side by side in one run.

The shapes are those of a fine-tuning step (batch 4 at 224 px unless ``--batch`` says otherwise): the ViT-B/16
and ViT-L/16 projections (tokens x width -> 3*width, width -> 4*width and back), their attention products
(batched), a ResNet-50 3x3 and 1x1 convolution and a ConvNeXt-S pointwise layer as the GEMMs Paddle's CPU
convolution makes of them (im2col + GEMM), and a 2048x2048 square for reference. Each is timed forward (``C = A
@ B``) and, with ``--backward`` (default on), as a linear layer's forward + backward (the two gradient products
too). Every worker runs in its own process; the sides alternate round by round so that all see the same load,
and the script prints the median GFLOP/s per side and the ratios: compare ratios, not absolute numbers.

    python benchmarks/gemm_speed.py --torch-python /path/to/torch/venv/bin/python
    python benchmarks/gemm_speed.py --quick          # two small shapes, one round: a smoke run, seconds

The Paddle sides differ only in ``RETFOUND_MKL`` (unset: the current MKL; ``bundled``: Paddle's own).
Without ``--torch-python`` (or ``$TORCH_PYTHON``) the torch side is left out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shapes(batch: int) -> list[tuple[str, int, int, int, int]]:
    """``(name, batch count, M, K, N)``: ``batch count`` independent ``MxK @ KxN`` products."""
    vit = batch * 197  # tokens of 224 px at patch 16, with the cls token
    r50 = batch * 56 * 56
    return [
        ("ViT-B qkv 768->2304", 1, vit, 768, 2304),
        ("ViT-B mlp 768->3072", 1, vit, 768, 3072),
        ("ViT-B mlp 3072->768", 1, vit, 3072, 768),
        ("ViT-B attn q@k^T (12 heads)", batch * 12, 197, 64, 197),
        ("ViT-L mlp 1024->4096", 1, vit, 1024, 4096),
        ("ViT-L mlp 4096->1024", 1, vit, 4096, 1024),
        ("ResNet-50 3x3 conv 64ch @56 (im2col)", 1, r50, 576, 64),
        ("ResNet-50 1x1 conv 64->256 @56", 1, r50, 64, 256),
        ("ConvNeXt-S pw 384->1536 @14", 1, batch * 14 * 14, 384, 1536),
        ("square 2048", 1, 2048, 2048, 2048),
    ]


QUICK = [("small 64x128x128", 1, 64, 128, 128), ("square 512", 1, 512, 512, 512)]


def _time(fn, repeats: int) -> float:
    fn()
    fn()
    best = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best.append((time.perf_counter() - t0) / repeats)
    return min(best)


def _repeats(flops: float) -> int:
    return max(1, min(200, int(3e9 / max(flops, 1.0))))


def worker(a: argparse.Namespace) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    out: dict = {"shapes": {}}
    if a.worker == "torch":
        import torch

        torch.set_num_threads(a.threads)
        out["version"] = f"torch {torch.__version__}"
        tensor, mm = torch.from_numpy, torch.matmul

        def fwd_bwd(x, w):
            x.requires_grad_(True)
            w.requires_grad_(True)

            def step():
                y = x @ w
                y.backward(torch.ones_like(y))
                x.grad = None
                w.grad = None
            return step
    else:
        sys.path.insert(0, REPO)
        from util.blas import loaded_blas, select_mkl

        out["blas"] = select_mkl()
        import paddle

        paddle.base.core.set_num_threads(a.threads)
        out["version"] = f"paddle {paddle.__version__}"
        tensor, mm = paddle.to_tensor, paddle.matmul

        def fwd_bwd(x, w):
            x.stop_gradient = False
            w.stop_gradient = False

            def step():
                y = paddle.matmul(x, w)
                y.backward(paddle.ones_like(y))
                x.clear_grad()
                w.clear_grad()
            return step

    for name, b, m, k, n in (QUICK if a.quick else shapes(a.batch)):
        lead = (b,) if b > 1 else ()
        x = tensor(rng.standard_normal((*lead, m, k), dtype=np.float32))
        w = tensor(rng.standard_normal((*lead, k, n), dtype=np.float32))
        flops = 2.0 * b * m * k * n
        res = {"fwd": flops / _time(lambda x=x, w=w: mm(x, w), _repeats(flops)) / 1e9}
        if a.backward:
            res["fwd_bwd"] = 3 * flops / _time(fwd_bwd(x, w), _repeats(3 * flops)) / 1e9
        out["shapes"][name] = res
    if a.worker != "torch":
        out["loaded"] = [os.path.basename(p) for p in loaded_blas() if "libmkl_rt" in p or "libmklml" in p]
    return out


ISA_HELP = ("native (default): each library picks its kernels for this CPU; avx2: every side capped at AVX2 "
            "(MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY), an approximation of an AVX2-only "
            "CPU on an AVX-512 one: same cores, caches and clock, so not a measurement of such a machine")


def isa_caps(isa: str) -> dict:
    """The environment that caps MKL, oneDNN and PyTorch's own kernels at ``isa`` (empty for native)."""
    if isa == "native":
        return {}
    return {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2",
            "ATEN_CPU_CAPABILITY": "avx2"}


SIDES = {"paddle": {}, "paddle_bundled_mkl": {"RETFOUND_MKL": "bundled"}, "torch": {}}


def launch(script: str, python: str, args: list[str], threads: int, isa: str, label: str,
           env_extra: dict | None = None) -> dict:
    """Run ``script --worker ...`` (``args``) under ``python`` with a clean CPU environment (what ``select_mkl``
    sets is left for the worker to decide; ``threads`` OpenMP threads, ``isa`` caps) and return its ``RESULT``
    line; a failed worker ends the benchmark with its output."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("FLAGS_mklml_dir", "RETFOUND_MKL", "MKL_THREADING_LAYER", "OMP_WAIT_POLICY", "MKL_CBWR")}
    env.update(env_extra or {}, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore", GLOG_minloglevel="2")
    env.update(isa_caps(isa))
    proc = subprocess.run([python, os.path.abspath(script), *args], cwd=REPO, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{label} worker failed (exit code {proc.returncode}); its output is above")
    return json.loads(lines[-1][len("RESULT "):])


def _run(side: str, a: argparse.Namespace) -> dict:
    args = ["--worker", "torch" if side == "torch" else "paddle", "--threads", str(a.threads), "--batch",
            str(a.batch)] + (["--quick"] if a.quick else []) + ([] if a.backward else ["--no-backward"])
    return launch(__file__, a.torch_python if side == "torch" else sys.executable, args, a.threads, a.isa,
                  f"gemm_speed: the {side}", SIDES[side])


def _cpu() -> str:
    name, flags = "unknown CPU", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown CPU":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    shown = [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if x in flags]
    return f"{name} ({' '.join(shown) or 'flags not read'}), {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON"),
                   help="Python of an environment with torch (default $TORCH_PYTHON; without it no torch side)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="images per step the shapes are made for (default 4)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-backward", dest="backward", action="store_false", help="forward products only")
    p.add_argument("--quick", action="store_true", help="two small shapes, one round")
    p.add_argument("--isa", choices=["native", "avx2"], default="native", help=ISA_HELP)
    p.add_argument("--json", default=None, help="also write every measurement to this file")
    p.add_argument("--worker", choices=["paddle", "torch"], default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return
    if a.quick:
        a.rounds = 1
    sides = ["paddle", "paddle_bundled_mkl"] + (["torch"] if a.torch_python else [])
    print(f"machine: {_cpu()}; {a.threads} threads; instructions {a.isa}; load average {os.getloadavg()[0]:.2f} (before)")
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    t0 = time.time()
    for r in range(a.rounds):
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:
            runs[side].append(_run(side, a))
            print(f"  round {r + 1}: {side} done (load {os.getloadavg()[0]:.2f})", flush=True)
    for side in sides:
        first = runs[side][0]
        print(f"{side}: {first['version']}" + (f", {first['blas']}, loaded {first['loaded']}" if "blas" in first else ""))
    kinds = ["fwd"] + (["fwd_bwd"] if a.backward else [])
    med = {s: {name: {k: statistics.median(run["shapes"][name][k] for run in runs[s]) for k in kinds}
               for name in runs[s][0]["shapes"]} for s in sides}
    short = {"paddle": "current", "paddle_bundled_mkl": "bundled", "torch": "torch"}
    ratio_cols = [("paddle", "paddle_bundled_mkl")] + ([("paddle", "torch")] if "torch" in sides else [])
    print(f"{'GFLOP/s, median of ' + str(a.rounds):36s}" + "".join(f"{short[s] + ' ' + k:>16s}" for k in kinds
                                                             for s in sides)
          + "".join(f"{short[x] + '/' + short[y] + ' ' + k:>26s}" for k in kinds for x, y in ratio_cols))
    for name in med[sides[0]]:
        print(f"{name:36s}" + "".join(f"{med[s][name][k]:16.1f}" for k in kinds for s in sides)
              + "".join(f"{med[x][name][k] / med[y][name][k]:26.2f}" for k in kinds for x, y in ratio_cols))
    print(f"(wall time {time.time() - t0:.0f} s; load average {os.getloadavg()[0]:.2f} after; sides alternate "
          "round by round: compare ratios, not absolute numbers)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "runs": runs, "median": med}, f, indent=1)


if __name__ == "__main__":
    main()
