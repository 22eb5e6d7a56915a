"""Training in bfloat16 on the CPU (``--amp --amp_dtype bfloat16``) against float32, side by side in one process.

Both paths run the toolkit's own step, as ``engine_finetune.train_one_epoch`` does it: ``AmpConfig.forward``
under ``AmpConfig.autocast``, cross-entropy on the float32 logits, backward, AdamW step. float32 is the
toolkit's default (eager mode, Paddle's CPU kernels); bfloat16 is ``AmpConfig(enabled=True, dtype='bfloat16',
device='cpu')``: the model's forward and backward as a static program with oneDNN's bf16 matrix products and
convolutions (``util/inference.py`` says how and why). Random inputs made once in memory, no data loading.

Speed: the first step of each path is timed on its own (bf16 traces and compiles its program there); then
every round runs ``--steps`` steps of each path, the order reversed every round, so on a shared machine both
see the same load. Reported: the median step as img/s [min-max], and the ratio bf16 / fp32.

Accuracy effect: from the same initial weights and the same ``--accuracy_steps`` batches (drop path off, so
both see identical computations), each path trains that many steps; reported are the largest difference of
the per-step losses, and of the logits of a held-out batch after training (both models applied in float32,
so the difference is what bf16 training changed), beside the bf16 forward's own rounding at the start. The
held-out logits are taken in train mode (no dropout or drop path here; BatchNorm on batch statistics): with
freshly initialised running statistics, eval-mode logits of a CNN grow to the hundreds and mean nothing.

The float32 products run on the MKL the toolkit picks (``util/blas.py``: the current MKL when the ``mkl``
package is installed; ``RETFOUND_MKL=bundled`` gives Paddle's bundled 2019 MKLML, the other float32 baseline).
bfloat16's products run in oneDNN and do not depend on it.

Usage (from the repository root):
    python benchmarks/bf16_training.py                          # vit_base_patch16 and resnet50, batch 8, 3 rounds
    python benchmarks/bf16_training.py --models retfound_mae,efficientnet_b4,convnext_small --batch 4
    python benchmarks/bf16_training.py --quick                  # tiny models, seconds
    RETFOUND_MKL=bundled python benchmarks/bf16_training.py     # float32 on Paddle's bundled MKLML

References: Paddle ``paddle.amp.auto_cast`` (bf16 O1 lists), ``paddle.jit.to_static``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from util.blas import select_mkl  # noqa: E402  (before Paddle's import, as the entry points)

DEFAULT_MODELS = "vit_base_patch16,resnet50"
QUICK_MODELS = "vit_test,resnet50_test"
NUM_CLASSES = 5
LR = 1e-4
WEIGHT_DECAY = 0.05
DROP_PATH = 0.1  # the speed part, as in fine-tuning; the accuracy part runs without it


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help=f"registered models, comma-separated (default {DEFAULT_MODELS})")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8; --quick 4)")
    p.add_argument("--input_size", type=int, default=None, help="input size (default: each model's own)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; --quick 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per path per round (default 2)")
    p.add_argument("--threads", type=int, default=2, help="math threads (default 2)")
    p.add_argument("--accuracy_steps", type=int, default=None,
                   help="training steps of the accuracy part (default 5; --quick 3; 0 skips it)")
    p.add_argument("--no_speed", action="store_true", help="only the accuracy part")
    p.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK_MODELS} at 64 px, batch 4")
    p.add_argument("--json", default=None, help="write every measurement to this file")
    a = p.parse_args(argv)
    a.models = a.models or (QUICK_MODELS if a.quick else DEFAULT_MODELS)
    a.batch = a.batch or (4 if a.quick else 8)
    a.input_size = a.input_size or (64 if a.quick else None)
    a.rounds = a.rounds or (2 if a.quick else 3)
    a.steps = a.steps or 2
    a.accuracy_steps = (3 if a.quick else 5) if a.accuracy_steps is None else a.accuracy_steps
    return a


def _setup(threads: int):
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    blas = select_mkl()
    warnings.filterwarnings("ignore", message="No ccache found")
    import paddle

    paddle.base.core.set_num_threads(threads)
    paddle.set_device("cpu")
    return paddle, blas


def _build(name: str, size: int | None, drop_path: float, seed: int = 0):
    import paddle

    from models import create_model, default_input_size

    paddle.seed(seed)
    size = size or default_input_size(name)
    model = create_model(name, NUM_CLASSES, drop_path_rate=drop_path, input_size=size)
    return model, size


def _batches(model, batch: int, size: int, n: int, seed: int):
    import numpy as np
    import paddle

    views = getattr(model, "num_views", 1)
    shape = [batch, 3, size, size] if views == 1 else [batch, views, 3, size, size]
    rng = np.random.RandomState(seed)
    return [(paddle.to_tensor(rng.standard_normal(shape).astype("float32")),
             paddle.to_tensor(rng.randint(0, NUM_CLASSES, batch).astype("int64"))) for _ in range(n)]


def _step(paddle, model, optimizer, amp, x, y) -> float:
    """One training step exactly as ``engine_finetune.train_one_epoch`` takes it (accum_iter 1, no clipping)."""
    with amp.autocast():
        logits = amp.forward(model, x)
        loss = paddle.nn.functional.cross_entropy(logits, y)
    value = float(loss)
    loss.backward()
    optimizer.step()
    optimizer.clear_grad()
    return value


def _amps():
    from util.inference import AmpConfig

    return {"fp32": AmpConfig(), "bf16": AmpConfig(enabled=True, dtype="bfloat16", device="cpu")}


def speed(paddle, a: argparse.Namespace, name: str) -> dict:
    model, size = _build(name, a.input_size, DROP_PATH)
    model.train()
    optimizer = paddle.optimizer.AdamW(learning_rate=LR, parameters=model.parameters(), weight_decay=WEIGHT_DECAY)
    (x, y), = _batches(model, a.batch, size, 1, seed=1)
    amps = _amps()
    first, times = {}, {k: [] for k in amps}
    for key, amp in amps.items():
        t0 = time.perf_counter()
        _step(paddle, model, optimizer, amp, x, y)
        first[key] = time.perf_counter() - t0
    for r in range(a.rounds):
        for key in (list(amps) if r % 2 == 0 else list(reversed(list(amps)))):
            for _ in range(a.steps):
                t0 = time.perf_counter()
                _step(paddle, model, optimizer, amps[key], x, y)
                times[key].append(time.perf_counter() - t0)
    out = {"model": name, "input_size": size, "batch": a.batch}
    for key, ts in times.items():
        med = statistics.median(ts)
        out[key] = {"img_s": a.batch / med, "min": a.batch / max(ts), "max": a.batch / min(ts),
                    "first_s": first[key], "step_s": ts}
    out["ratio"] = out["bf16"]["img_s"] / out["fp32"]["img_s"]
    return out


def accuracy(paddle, a: argparse.Namespace, name: str) -> dict:
    """Train the same initial model the same steps in each precision; compare losses and held-out logits."""
    import numpy as np

    model, size = _build(name, a.input_size, drop_path=0.0)
    init = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    data = _batches(model, a.batch, size, a.accuracy_steps, seed=2)
    (held_x, _), = _batches(model, a.batch, size, 1, seed=3)
    amps = _amps()
    losses, logits, start = {}, {}, {}
    for key, amp in amps.items():
        model.set_state_dict({k: paddle.to_tensor(v) for k, v in init.items()})
        model.train()  # batch statistics: a fresh BatchNorm's running statistics would blow the logits up
        with paddle.no_grad():
            start[key] = amp.forward(model, held_x).numpy()  # the forward's rounding alone, before training
        optimizer = paddle.optimizer.AdamW(learning_rate=LR, parameters=model.parameters(),
                                           weight_decay=WEIGHT_DECAY)
        losses[key] = [_step(paddle, model, optimizer, amp, x, y) for x, y in data]
        with paddle.no_grad():
            logits[key] = model(held_x).numpy()  # float32 eager: what training in this precision left
    scale = float(np.abs(logits["fp32"]).max()) or 1.0
    return {"model": name, "steps": a.accuracy_steps, "loss_fp32": losses["fp32"], "loss_bf16": losses["bf16"],
            "max_dloss": float(np.max(np.abs(np.subtract(losses["bf16"], losses["fp32"])))),
            "max_dlogit_forward": float(np.abs(start["bf16"] - start["fp32"]).max()),
            "max_dlogit_trained": float(np.abs(logits["bf16"] - logits["fp32"]).max()),
            "max_abs_logit": scale}


def main(argv=None) -> int:
    a = parse_args(argv)
    paddle, blas = _setup(a.threads)
    from models import resolve_model_name
    from util.exported import bf16_support, describe_cpu

    names = [resolve_model_name(n.strip()) for n in a.models.split(",") if n.strip()]
    print(f"CPU: {describe_cpu()}")
    print(f"Paddle {paddle.__version__}, {a.threads} thread(s), float32 products on {blas}")
    reason = bf16_support()
    if reason is not None:
        print(f"bf16 training is not offered here: {reason}")
        return 1
    results = {"speed": [], "accuracy": [], "cpu": describe_cpu(), "blas": blas, "threads": a.threads}
    if not a.no_speed:
        print(f"\nTraining step (forward + loss + backward + AdamW), batch {a.batch}, median of {a.rounds} rounds "
              f"x {a.steps} steps; img/s [min-max]; 1st: the first step, s (bf16: tracing + compiling)")
        print(f"{'model':18s} {'px':>4s} {'fp32 img/s':>20s} {'bf16 img/s':>20s} {'bf16/fp32':>9s} "
              f"{'1st fp32':>8s} {'1st bf16':>8s}")
        for name in names:
            r = speed(paddle, a, name)
            results["speed"].append(r)
            cell = {k: f"{r[k]['img_s']:.2f} [{r[k]['min']:.2f}-{r[k]['max']:.2f}]" for k in ("fp32", "bf16")}
            print(f"{name:18s} {r['input_size']:4d} {cell['fp32']:>20s} {cell['bf16']:>20s} {r['ratio']:8.2f}x "
                  f"{r['fp32']['first_s']:8.1f} {r['bf16']['first_s']:8.1f}", flush=True)
    if a.accuracy_steps:
        print(f"\nAccuracy effect: same init and data, {a.accuracy_steps} AdamW steps (lr {LR}), drop path off")
        print(f"{'model':18s} {'max|dloss|':>10s} {'max|dlogit| fwd':>15s} {'max|dlogit| trained':>19s} "
              f"{'max|logit|':>10s}  losses fp32 / bf16")
        for name in names:
            r = accuracy(paddle, a, name)
            results["accuracy"].append(r)
            trail = " ".join(f"{v:.4f}" for v in r["loss_fp32"]) + " / " + " ".join(f"{v:.4f}" for v in r["loss_bf16"])
            print(f"{name:18s} {r['max_dloss']:10.4f} {r['max_dlogit_forward']:15.4f} "
                  f"{r['max_dlogit_trained']:19.4f} {r['max_abs_logit']:10.3f}  {trail}", flush=True)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
