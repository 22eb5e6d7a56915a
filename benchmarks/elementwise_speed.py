"""The non-GEMM kernels of a ViT-B/16 fine-tuning step on CPU: Paddle (as the toolkit runs it) against PyTorch,
side by side in one run.

After the GEMM fix (``util/blas.py``, ``benchmarks/gemm_speed.py``) the rest of the step is made of the
element-wise and row-wise kernels: exact (erf) GELU, LayerNorm, softmax, the attention core and the residual
add. This script times each at the shapes of a ViT-B/16 step (batch 4, 224 px: 197 tokens, width 768, MLP
3072, 12 heads), forward and forward + backward, in its own process per side (``gemm_speed``'s driver: the
sides alternate round by round), and prints the median milliseconds, the Paddle/torch time ratio (above 1:
Paddle is slower) and what each kernel costs per training step (calls per step x forward + backward).

Each side runs the formulation its model uses: the attention core is ours (``models/vit.py``: einsum
``q k^T``, softmax, einsum with ``v``) against timm's ``F.scaled_dot_product_attention``.

    python benchmarks/elementwise_speed.py --torch-python /path/to/torch/venv/bin/python
    python benchmarks/elementwise_speed.py --quick      # smaller shapes, one round: a smoke run, seconds

References: timm ``vision_transformer.py`` (``Attention``, ``Mlp``: the reference's kernels); Paddle's CPU
``gelu`` / ``gelu_grad`` kernels (``paddle/phi/kernels/gelu_kernel.h``, ``cpu/gelu_grad_kernel.cc``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm_speed import _cpu, _time, launch  # noqa: E402  (the same driver pieces as the GEMM benchmark)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# kernel -> calls per ViT-B/16 training step (12 blocks: two LayerNorms each plus the final one)
CALLS = {"gelu (exact)": 12, "layer_norm": 25, "softmax": 12, "attention core": 12, "residual add": 24}


def _shapes(a: argparse.Namespace) -> dict:
    tokens, width, heads = (17, 64, 4) if a.quick else (197, 768, 12)
    return {"B": a.batch, "N": tokens, "C": width, "H": heads, "hidden": 4 * width}


def worker(a: argparse.Namespace) -> dict:
    import numpy as np

    s = _shapes(a)
    B, N, C, H, hidden = s["B"], s["N"], s["C"], s["H"], s["hidden"]
    rng = np.random.default_rng(0)
    arrays = {"mlp": rng.standard_normal((B, N, hidden), dtype=np.float32),
              "tok": rng.standard_normal((B, N, C), dtype=np.float32),
              "tok2": rng.standard_normal((B, N, C), dtype=np.float32),
              "logits": rng.standard_normal((B, H, N, N), dtype=np.float32),
              "qkv": rng.standard_normal((3, B, N, H, C // H), dtype=np.float32)}
    out: dict = {"ms": {}}
    if a.worker == "torch":
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(a.threads)
        out["version"] = f"torch {torch.__version__}"
        ln = torch.nn.LayerNorm(C, eps=1e-6)

        def leaf(name):
            return torch.from_numpy(arrays[name]).requires_grad_(True)

        def attention(qkv):
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(0))   # [B, H, N, Dh], as timm's Attention
            return F.scaled_dot_product_attention(q, k, v)

        kernels = {"gelu (exact)": (F.gelu, ["mlp"]), "layer_norm": (ln, ["tok"]),
                   "softmax": (lambda t: F.softmax(t, dim=-1), ["logits"]), "attention core": (attention, ["qkv"]),
                   "residual add": (lambda x, y: x + y, ["tok", "tok2"])}

        def measure(fn, names):
            xs = [leaf(n) for n in names]

            def fwd():
                with torch.no_grad():
                    fn(*xs)

            def fwd_bwd():
                y = fn(*xs)
                y.backward(torch.ones_like(y))
                for x in xs:
                    x.grad = None
                ln.zero_grad()
            return fwd, fwd_bwd
    else:
        sys.path.insert(0, REPO)
        from util.blas import select_mkl

        out["blas"] = select_mkl()
        import paddle
        import paddle.nn.functional as F

        paddle.base.core.set_num_threads(a.threads)
        out["version"] = f"paddle {paddle.__version__}"
        ln = paddle.nn.LayerNorm(C, epsilon=1e-6)
        scale = (C // H) ** -0.5

        def attention(qkv):   # models/vit.py Attention.forward, from the unbound q, k, v on
            q, k, v = qkv.unbind(0)
            attn = F.softmax(paddle.einsum('bnhd,bmhd->bhnm', q * scale, k), axis=-1)
            return paddle.einsum('bhnm,bmhd->bnhd', attn, v)

        kernels = {"gelu (exact)": (lambda t: F.gelu(t, approximate=False), ["mlp"]), "layer_norm": (ln, ["tok"]),
                   "softmax": (lambda t: F.softmax(t, axis=-1), ["logits"]), "attention core": (attention, ["qkv"]),
                   "residual add": (lambda x, y: x + y, ["tok", "tok2"])}
        if a.worker == "compiled":   # the toolkit's layers on models/cpu_kernels.py, as models/vit.py runs them
            from models import cpu_kernels

            out["kernels"] = cpu_kernels.status()
            ln = cpu_kernels.LayerNorm(C, epsilon=1e-6)
            # the same q, k, v laid out as the qkv projection's output [B, N, 3 * C], which the kernel reads
            arrays["qkv_rows"] = np.ascontiguousarray(arrays["qkv"].transpose(1, 2, 0, 3, 4)).reshape(B, N, 3 * C)
            kernels.update({"gelu (exact)": (cpu_kernels.gelu, ["mlp"]), "layer_norm": (ln, ["tok"]),
                            "softmax": (cpu_kernels.softmax, ["logits"]),
                            "attention core": (lambda t: cpu_kernels.attention(t, H, scale), ["qkv_rows"])})

        def measure(fn, names):
            xs = [paddle.to_tensor(arrays[n], stop_gradient=False) for n in names]

            def fwd():
                with paddle.no_grad():
                    fn(*xs)

            def fwd_bwd():
                y = fn(*xs)
                y.backward(paddle.ones_like(y))
                for x in xs:
                    x.clear_grad()
                ln.clear_gradients()
            return fwd, fwd_bwd

    for name, (fn, names) in kernels.items():
        fwd, fwd_bwd = measure(fn, names)
        out["ms"][name] = {"fwd": 1e3 * _time(fwd, a.repeats), "fwd_bwd": 1e3 * _time(fwd_bwd, a.repeats)}
    return out


def _run(side: str, a: argparse.Namespace) -> dict:
    args = ["--worker", side, "--threads", str(a.threads), "--batch", str(a.batch), "--repeats", str(a.repeats)] + \
        (["--quick"] if a.quick else [])
    return launch(__file__, a.torch_python if side == "torch" else sys.executable, args, a.threads, a.isa,
                  f"elementwise_speed: the {side}", {"RETFOUND_CPU_KERNELS": "paddle"} if side == "paddle" else None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON"),
                   help="Python of an environment with torch (default $TORCH_PYTHON; without it Paddle only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="images per step the shapes are made for (default 4)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10, help="calls per timing (the best of 3 timings is kept)")
    p.add_argument("--quick", action="store_true", help="small shapes, one round, 2 repeats")
    p.add_argument("--isa", choices=["native", "avx2"], default="native")
    p.add_argument("--json", default=None, help="also write every measurement to this file")
    p.add_argument("--worker", choices=["paddle", "compiled", "torch"], default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return
    if a.quick:
        a.rounds, a.repeats = 1, 2
    sides = ["paddle", "compiled"] + (["torch"] if a.torch_python else [])
    s = _shapes(a)
    print(f"machine: {_cpu()}; {a.threads} threads; instructions {a.isa}; load average {os.getloadavg()[0]:.2f} "
          f"(before); shapes: batch {s['B']}, {s['N']} tokens, width {s['C']}, MLP {s['hidden']}, {s['H']} heads")
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    t0 = time.time()
    for r in range(a.rounds):
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:
            runs[side].append(_run(side, a))
            print(f"  round {r + 1}: {side} done (load {os.getloadavg()[0]:.2f})", flush=True)
    for side in sides:
        print(f"{side}: {runs[side][0]['version']}" + (f", {runs[side][0]['blas']}" if "blas" in runs[side][0] else ""))
    med = {side: {name: {k: statistics.median(run["ms"][name][k] for run in runs[side]) for k in ("fwd", "fwd_bwd")}
                  for name in CALLS} for side in sides}
    ours = [side for side in sides if side != "torch"]
    head = f"{'ms, median of ' + str(a.rounds):18s}" + "".join(f"{side + ' ' + k:>18s}" for side in sides
                                                               for k in ("fwd", "fwd_bwd"))
    if "torch" in sides:
        head += "".join(f"{side + '/torch ' + k:>22s}" for side in ours for k in ("fwd", "f+b"))
    head += "".join(f"{side + ' ms/step':>16s}" for side in sides)
    print(head)
    for name, calls in CALLS.items():
        row = f"{name:18s}" + "".join(f"{med[side][name][k]:18.2f}" for side in sides for k in ("fwd", "fwd_bwd"))
        if "torch" in sides:
            row += "".join(f"{med[side][name][k] / med['torch'][name][k]:22.2f}" for side in ours
                           for k in ("fwd", "fwd_bwd"))
        row += "".join(f"{calls * med[side][name]['fwd_bwd']:16.0f}" for side in sides)
        print(row)
    print(f"(ms/step: calls per ViT-B/16 training step {CALLS} x forward + backward; wall time {time.time() - t0:.0f}"
          f" s; load average {os.getloadavg()[0]:.2f} after; compare ratios, not absolute numbers)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "runs": runs, "median": med}, f, indent=1)


if __name__ == "__main__":
    main()
