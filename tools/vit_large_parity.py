"""ViT-L/16 (RETFound size) parity between the PyTorch reference and our Paddle port, end to end (dev-only).

1. With PyTorch + timm: build timm's ``VisionTransformer`` in the RETFound configuration (ViT-L/16, qkv bias,
   LayerNorm eps 1e-6, ``global_pool='avg'`` + ``fc_norm``), seed 0, 5 classes, timm's random init; save a
   fine-tuned-style checkpoint ``{'model', 'epoch', 'args'}`` (~1.2 GB) to ``--workdir`` (default
   /tmp/vitl_parity, never inside the repo), two fixed 224x224 inputs and the eval-mode reference logits.
2. With the Paddle venv: ``python -m models.convert`` the checkpoint to .pdparams under ``/usr/bin/time -v``
   (peak RSS), then build ``retfound_mae``, ``load_finetuned`` the .pdparams (strict: every key), run the
   same inputs, and also load the .pth directly (peak RSS of that path too).
3. Print the max abs logit difference.

Run (from the repo root):

    TORCH_PYTHON tools/vit_large_parity.py [--paddle-python PADDLE_PYTHON] [--workdir /tmp/vitl_parity] [--keep]

The PyTorch side runs in the interpreter that starts the script (TORCH_PYTHON: a Python environment with
``torch`` + ``timm``); the Paddle side runs as a subprocess with ``--paddle-python`` (the toolkit's
environment; default: ``$PADDLE_PYTHON`` if set, else ``python`` on the PATH) and never imports torch.

References: timm ``vision_transformer.py``; rmaphoh/RETFound_MAE ``models_vit.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_side(workdir: str) -> None:
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    from functools import partial

    import numpy as np
    import torch
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4,
                              qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=5,
                              global_pool="avg", fc_norm=True)
    model.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    np.save(os.path.join(workdir, "x.npy"), x.numpy())
    np.save(os.path.join(workdir, "logits_torch.npy"), logits.numpy())
    args = argparse.Namespace(model="RETFound_mae", nb_classes=5, input_size=224, global_pool=True)
    torch.save({"model": model.state_dict(), "epoch": 0, "args": args}, os.path.join(workdir, "checkpoint-best.pth"))
    n = sum(p.numel() for p in model.parameters())
    print(f"[torch {torch.__version__}] ViT-L/16 reference: {n / 1e6:.2f}M params, logits {logits.numpy().tolist()}")


def paddle_side(workdir: str, which: str) -> None:
    """Runs in the Paddle venv: load ``which`` (a .pdparams or .pth) into retfound_mae and save the logits."""
    sys.path.insert(0, REPO)
    import numpy as np
    import paddle

    import models
    from models.pretrained import load_finetuned

    t0 = time.time()
    model = models.create_model("retfound_mae", num_classes=5, global_pool=True, input_size=224)
    model.eval()
    t1 = time.time()
    load_finetuned(model, which)
    t2 = time.time()
    with paddle.no_grad():
        logits = model(paddle.to_tensor(np.load(os.path.join(workdir, "x.npy")))).numpy()
    t3 = time.time()
    tag = os.path.splitext(os.path.basename(which))[1][1:]
    np.save(os.path.join(workdir, f"logits_paddle_{tag}.npy"), logits)
    print(f"[paddle {paddle.__version__}] build {t1 - t0:.1f}s, load {t2 - t1:.1f}s, forward {t3 - t2:.1f}s; "
          f"logits {logits.tolist()}")


def timed(cmd: list[str]) -> tuple[str, float]:
    """Run ``cmd`` under /usr/bin/time -v; return its stdout and peak RSS in MB."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONPATH=REPO)
    proc = subprocess.run(["/usr/bin/time", "-v"] + cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return proc.stdout, (int(m.group(1)) / 1024 if m else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/vitl_parity")
    ap.add_argument("--paddle-python", default=os.environ.get("PADDLE_PYTHON", "python"),
                    help="Python of the toolkit's (Paddle) environment (default: $PADDLE_PYTHON, else python)")
    ap.add_argument("--keep", action="store_true", help="keep the 1.2 GB checkpoints in --workdir")
    ap.add_argument("--paddle-side", metavar="WEIGHTS", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.paddle_side:
        paddle_side(a.workdir, a.paddle_side)
        return
    os.makedirs(a.workdir, exist_ok=True)
    import numpy as np

    torch_side(a.workdir)
    pth = os.path.join(a.workdir, "checkpoint-best.pth")
    pdp = os.path.join(a.workdir, "RETFound_parity.pdparams")
    out, rss_convert = timed([a.paddle_python, "-m", "models.convert", pth, pdp])
    print(out.strip())
    me = os.path.abspath(__file__)
    results = {"checkpoint_MB": round(os.path.getsize(pth) / 2**20), "convert_peak_rss_MB": round(rss_convert)}
    ref = np.load(os.path.join(a.workdir, "logits_torch.npy"))
    for weights, tag in [(pdp, "pdparams"), (pth, "pth")]:
        out, rss = timed([a.paddle_python, me, "--workdir", a.workdir, "--paddle-side", weights])
        print("\n".join(line for line in out.splitlines() if line.startswith(("[paddle", "Loaded"))))
        got = np.load(os.path.join(a.workdir, f"logits_paddle_{tag}.npy"))
        results[f"max_abs_logit_diff_{tag}"] = float(np.abs(got - ref).max())
        results[f"load_and_run_peak_rss_MB_{tag}"] = round(rss)
    results["max_abs_reference_logit"] = float(np.abs(ref).max())
    print(json.dumps(results, indent=1))
    if not a.keep:
        shutil.rmtree(a.workdir)


if __name__ == "__main__":
    main()
