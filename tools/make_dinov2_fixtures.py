"""Write the reference fixtures of the DINOv2-family models (dev-only: needs PyTorch + timm), or measure the
full-size ViT-L/14 parity once.

The reference implementations are timm's registered models, built at a tiny width and depth with every other
argument as their sources build them, then saved in each published checkpoint layout:

* ``vit_large_patch14_dinov2`` (what RETFound's ``RETFound_dinov2`` and ``Dinov2`` build; patch 14, LayerScale,
  cls-token pooling after the final ``norm``): pretrained at 84 px (grid 6; the real checkpoints: 518 px, 37x37)
  and loaded the way RETFound's ``main_finetune.py`` loads ``--finetune`` (drop the ``backbone.`` prefix, rename
  ``mlp.w12.``/``mlp.w3.`` to ``mlp.fc1.``/``mlp.fc2.``, drop a mismatched head, ``interpolate_pos_embed``,
  ``load_state_dict(strict=False)``) into models at 56 px (grid 4; real: 224 px, 16x16) and 42 px (grid 3);
* ``vit_small_patch14_reg4_dinov2`` (RETFound-Green: 4 register tokens, ``no_embed_class``), saved as timm
  saves it and loaded the way RETFound-Green's README does (``timm.create_model(..., checkpoint_path=...)``,
  then ``global_pool = 'avg'``) at its own size, 56 px (real: 392 px);
* ``vit_base_patch16_224`` (VisionFM's ViT-B/16 encoder has timm's ViT-B/16 architecture and parameter names),
  saved in VisionFM's pretraining layout and loaded the way VisionFM's ``utils.load_pretrained_weights`` does.

Parameters are redrawn at O(1) scale (LayerScale gammas around 0.5, random norms and biases) so that a missing
LayerScale, a wrong token order or a wrong pooling shows up in the outputs.

Files written to ``tests/fixtures/dinov2/`` (about 1 MB):

* ``retfound_dinov2_teacher.pth``: ``{'teacher': backbone.* (MLP named w12/w3) + backbone.mask_token +
  dino_head.* + ibot_head.*}``, the DINOv2 teacher layout of the RETFound_dinov2 checkpoints;
* ``dinov2_meta.pth``: the same backbone in Meta's release layout (a bare state dict with ``mask_token``);
* ``retfound_dinov2_finetuned.pth``: RETFound's ``checkpoint-best.pth`` layout ``{'model', 'epoch', 'args'}`` of
  a fine-tuned ``RETFound_dinov2`` (head of 3 classes), at the size of ``dinov2_test`` (patch 16, 32 px);
* ``retfound_green.pth``: timm state dict of the register model (no head);
* ``visionfm_teacher.pth``: ``{'student', 'teacher': module.backbone.* + module.head.* (iBOT head), 'epoch',
  'args'}``, pretrained at 48 px (grid 3);
* ``reference.npz``: inputs ``x56``, ``x42``, ``x32``, ``x48`` (float16, to be used as float32) and the reference outputs: ``pos_embed_dinov2_56``
  / ``_42`` (the checkpoint's pos_embed after ``interpolate_pos_embed``), ``feat_dinov2_56`` / ``_42`` (the
  head's input after loading the teacher), ``feat_meta_56`` (after loading Meta's layout), ``logits_finetuned``
  (x32), ``feat_green_56``, ``feat_green_42`` (pos_embed resized as ``interpolate_pos_embed`` does for a model
  without prefix tokens in it), ``feat_visionfm_48``, ``feat_visionfm_32``.

Regenerate from the repository root (TORCH_PYTHON: a Python environment with torch + timm):

    TORCH_PYTHON tools/make_dinov2_fixtures.py

Full-size parity, once (writes ~2.5 GB under --workdir, removed afterwards; PADDLE_PYTHON: the toolkit's
environment, used for the Paddle side in a subprocess that never imports torch):

    TORCH_PYTHON tools/make_dinov2_fixtures.py --vitl [--paddle-python PADDLE_PYTHON] [--workdir /tmp/dinov2_vitl]

References: timm ``vision_transformer.py`` (VisionTransformer, the ``*_dinov2`` models, ``checkpoint_filter_fn``);
rmaphoh/RETFound ``models_vit.py`` (``RETFound_dinov2``, ``Dinov2``), ``main_finetune.py`` and
``util/pos_embed.py``; facebookresearch/dinov2 (teacher checkpoint layout); justinengelmann/RETFound_Green
README; ABILab-CUHK/VisionFM ``main_pretrain.py`` and ``utils.py`` (``load_pretrained_weights``).
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

import numpy as np

if "--paddle-side" not in sys.argv:   # the Paddle side runs this file in the toolkit's environment: no torch there
    # torchvision's compiled ops do not load in the dev torch venv; timm only needs the Python parts.
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import timm
    import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "fixtures", "dinov2")
TINY = dict(embed_dim=32, depth=2, num_heads=2)


# ----------------------------------------------------------------------------------------------- reference side
def create(name: str, img_size: int, num_classes: int, **kw) -> torch.nn.Module:
    """A timm registered model with its own arguments, only narrower and shallower (unless ``kw`` says)."""
    model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=num_classes, **{**TINY, **kw})
    return model.eval()


def randomise(sd: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """O(1)-scale values: weights ~ N(0, 1/fan_in) (head x3), norm weights ~ 1 + N(0, .2), LayerScale gammas
    ~ 0.5 + N(0, .1), tokens and position embeddings ~ N(0, .5), biases ~ N(0, .1)."""
    out = {}
    for k, v in sd.items():   # fresh tensors (torch.randn), no autograd history
        r = torch.randn(v.shape, generator=gen)
        if k.endswith(".gamma"):
            r = 0.5 + 0.1 * r
        elif k.endswith("weight") and v.ndim >= 2:
            r = r / int(np.prod(v.shape[1:])) ** 0.5 * (3.0 if k.startswith("head") else 1.0)
        elif k.endswith("weight"):
            r = 1.0 + 0.2 * r
        elif k in ("cls_token", "reg_token", "pos_embed"):
            r = 0.5 * r
        else:
            r = 0.1 * r
        out[k] = r.contiguous()
    return out


def interpolate_pos_embed(model: torch.nn.Module, checkpoint_model: dict) -> None:
    """RETFound's ``util/pos_embed.interpolate_pos_embed``, behaviour reproduced (extra tokens = the model's
    pos_embed length minus its patch count)."""
    if "pos_embed" not in checkpoint_model:
        return
    pe = checkpoint_model["pos_embed"]
    num_patches = model.patch_embed.num_patches
    extra = model.pos_embed.shape[-2] - num_patches
    old, new = int((pe.shape[-2] - extra) ** 0.5), int(num_patches ** 0.5)
    if old != new:
        tokens = pe[:, extra:].reshape(-1, old, old, pe.shape[-1]).permute(0, 3, 1, 2)
        tokens = torch.nn.functional.interpolate(tokens, size=(new, new), mode="bicubic", align_corners=False)
        checkpoint_model["pos_embed"] = torch.cat((pe[:, :extra], tokens.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


def load_like_retfound(model: torch.nn.Module, checkpoint_model: dict) -> tuple[list[str], list[str]]:
    """RETFound ``main_finetune.py``'s ``--finetune`` loading; returns (missing, unexpected) keys."""
    sd = {k.replace("backbone.", ""): v for k, v in checkpoint_model.items()}
    sd = {k.replace("mlp.w12.", "mlp.fc1."): v for k, v in sd.items()}
    sd = {k.replace("mlp.w3.", "mlp.fc2."): v for k, v in sd.items()}
    own = model.state_dict()
    for k in ("head.weight", "head.bias"):
        if k in sd and sd[k].shape != own[k].shape:
            del sd[k]
    interpolate_pos_embed(model, sd)
    msg = model.load_state_dict(sd, strict=False)
    return sorted(msg.missing_keys), sorted(msg.unexpected_keys)


def load_like_visionfm(model: torch.nn.Module, checkpoint: dict) -> tuple[list[str], list[str]]:
    """VisionFM ``utils.load_pretrained_weights`` (checkpoint key 'teacher'); returns (missing, unexpected)."""
    sd = checkpoint["teacher"]
    sd = {k.replace("module.", ""): v for k, v in sd.items()}
    sd = {k.replace("backbone.", ""): v for k, v in sd.items()}
    if sd["pos_embed"].shape != model.pos_embed.shape:
        grid = model.patch_embed.grid_size
        old = int((sd["pos_embed"].shape[1] - 1) ** 0.5)
        tok, pe = sd["pos_embed"][:, :1], sd["pos_embed"][0, 1:]
        pe = pe.reshape(1, old, old, -1).permute(0, 3, 1, 2)
        pe = torch.nn.functional.interpolate(pe, size=list(grid), mode="bicubic", align_corners=False)
        sd["pos_embed"] = torch.cat([tok, pe.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)
    msg = model.load_state_dict(sd, strict=False)
    return sorted(msg.missing_keys), sorted(msg.unexpected_keys)


def ssl_head(prefix: str, dim: int, out: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A small DINO/iBOT projection head (MLP + weight-normed last layer), named as those heads are."""
    hidden, bottleneck = 16, 8
    shapes = {"mlp.0.weight": (hidden, dim), "mlp.0.bias": (hidden,), "mlp.2.weight": (bottleneck, hidden),
              "mlp.2.bias": (bottleneck,), "last_layer.weight_g": (out, 1), "last_layer.weight_v": (out, bottleneck)}
    return {prefix + k: torch.randn(s, generator=gen) * 0.1 for k, s in shapes.items()}


def features(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The head's input (timm ``forward_head(pre_logits=True)``: pooling, then fc_norm if any)."""
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True).numpy()


def to_teacher_layout(sd: dict[str, torch.Tensor], gen: torch.Generator, dim: int, swiglu_names: bool) -> dict:
    """A DINOv2 teacher state dict: ``backbone.`` + ViT (optionally with the MLP named w12/w3), the mask token,
    and the DINO and iBOT heads."""
    teacher = {}
    for k, v in sd.items():
        if swiglu_names:
            k = k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
        teacher["backbone." + k] = v
    teacher["backbone.mask_token"] = torch.randn(1, dim, generator=gen) * 0.02
    teacher.update(ssl_head("dino_head.", dim, 12, gen))
    teacher.update(ssl_head("ibot_head.", dim, 12, gen))
    return teacher


def make_fixtures() -> None:
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    # inputs rounded to float16 (stored so, half the size) and used as float32 on both sides
    x = {s: torch.randn(2, 3, s, s, generator=gen).half().float() for s in (56, 42, 32, 48)}
    ref: dict[str, np.ndarray] = {}
    dim = TINY["embed_dim"]

    # (1) RETFound_dinov2 / DINOv2: timm's vit_large_patch14_dinov2, pretrained at 84 px (grid 6)
    pre = create("vit_large_patch14_dinov2", 84, 0)
    backbone = randomise(pre.state_dict(), gen)
    teacher = to_teacher_layout(backbone, gen, dim, swiglu_names=True)
    torch.save({"teacher": teacher}, os.path.join(OUT, "retfound_dinov2_teacher.pth"))
    meta = {**backbone, "mask_token": torch.randn(1, dim, generator=gen) * 0.02}
    torch.save(meta, os.path.join(OUT, "dinov2_meta.pth"))
    for size in (56, 42):
        m = create("vit_large_patch14_dinov2", size, 5)   # RETFound passes num_classes: a 5-class head
        missing, unexpected = load_like_retfound(m, teacher)
        assert missing == ["head.bias", "head.weight"], missing
        assert unexpected and all(k.startswith(("dino_head.", "ibot_head.", "mask_token")) for k in unexpected)
        ref[f"pos_embed_dinov2_{size}"] = m.pos_embed.detach().numpy().copy()
        ref[f"feat_dinov2_{size}"] = features(m, x[size])
    m = create("vit_large_patch14_dinov2", 56, 5)
    missing, unexpected = load_like_retfound(m, dict(meta))   # the reference's Dinov2: the file is the state dict
    assert missing == ["head.bias", "head.weight"] and unexpected == ["mask_token"], (missing, unexpected)
    ref["feat_meta_56"] = features(m, x[56])

    # (2) a fine-tuned RETFound_dinov2 (checkpoint-best.pth of RETFound's misc.save_model), dinov2_test's size
    m = create("vit_large_patch14_dinov2", 32, 3, patch_size=16)
    m.load_state_dict(randomise(m.state_dict(), gen))
    with torch.no_grad():
        ref["logits_finetuned"] = m(x[32]).numpy()
    args = argparse.Namespace(model="RETFound_dinov2", model_arch="retfound_dinov2", finetune="RETFound_dinov2_meh",
                              input_size=32, nb_classes=3, global_pool=True, drop_path=0.2, adaptation="finetune",
                              task="fixture", blr=5e-3, layer_decay=0.65)
    torch.save({"model": m.state_dict(), "epoch": 4, "args": args},
               os.path.join(OUT, "retfound_dinov2_finetuned.pth"))

    # (3) RETFound-Green: vit_small_patch14_reg4_dinov2 as timm saves it, used as its README shows
    g = create("vit_small_patch14_reg4_dinov2", 56, 0)
    green = randomise(g.state_dict(), gen)
    path = os.path.join(OUT, "retfound_green.pth")
    torch.save(green, path)
    g = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=56, num_classes=0, checkpoint_path=path,
                          **TINY).eval()
    g.global_pool = "avg"
    with torch.no_grad():
        ref["feat_green_56"] = g(x[56]).numpy()
    g = create("vit_small_patch14_reg4_dinov2", 42, 0)
    missing, unexpected = load_like_retfound(g, dict(green))
    assert not missing and not unexpected, (missing, unexpected)
    g.global_pool = "avg"
    with torch.no_grad():
        ref["feat_green_42"] = g(x[42]).numpy()

    # (4) VisionFM: timm ViT-B/16 architecture, VisionFM's pretraining checkpoint layout, pretrained at 48 px
    v = create("vit_base_patch16_224", 48, 0)
    vit = randomise(v.state_dict(), gen)
    teacher = {"module.backbone." + k: t for k, t in vit.items()}
    teacher.update(ssl_head("module.head.", dim, 12, gen))
    student = {"module.backbone.cls_token": torch.randn(1, 1, dim, generator=gen),
               "module.backbone.masked_embed": torch.zeros(1, dim)}
    vargs = argparse.Namespace(arch="vit_base", patch_size=16, modality="Fundus", out_dim=12, epochs=400)
    ckpt = {"student": student, "teacher": teacher, "epoch": 400, "args": vargs}
    torch.save(ckpt, os.path.join(OUT, "visionfm_teacher.pth"))
    for size in (48, 32):
        v = create("vit_base_patch16_224", size, 0)
        missing, unexpected = load_like_visionfm(v, ckpt)
        assert not missing and all(k.startswith("head.") for k in unexpected), (missing, unexpected)
        ref[f"feat_visionfm_{size}"] = features(v, x[size])

    ref.update({f"x{s}": v.numpy().astype(np.float16) for s, v in x.items()})
    np.savez(os.path.join(OUT, "reference.npz"), **ref)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {sorted(os.listdir(OUT))} to {OUT} ({total / 1e6:.2f} MB); torch {torch.__version__}, "
          f"timm {timm.__version__}")


# ----------------------------------------------------------------------------------------------- ViT-L/14, once
def vitl_torch_side(workdir: str) -> dict:
    """RETFound_dinov2 at full size: timm's random init (LayerScale gammas redrawn in [0.1, 1], since timm's 1e-5
    would make every block nearly the identity), saved in the teacher layout at 518 px; loaded the reference way
    into a 224 px model with 5 classes; that model also saved as RETFound's checkpoint-best.pth."""
    torch.manual_seed(0)
    pre = timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=518, num_classes=0)
    gen = torch.Generator().manual_seed(0)
    sd = {k: (0.1 + 0.9 * torch.rand(v.shape, generator=gen) if k.endswith(".gamma") else v)
          for k, v in pre.state_dict().items()}
    del pre
    teacher = to_teacher_layout(sd, gen, 1024, swiglu_names=False)
    torch.save({"teacher": teacher}, os.path.join(workdir, "RETFound_dinov2_parity.pth"))
    del teacher
    model = timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=224, num_classes=5).eval()
    missing, _ = load_like_retfound(model, sd)
    assert missing == ["head.bias", "head.weight"], missing
    del sd
    torch.nn.init.normal_(model.head.weight, std=0.05)   # a head of O(1) logits, copied to the Paddle side
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model.head(feats)
    np.savez(os.path.join(workdir, "torch.npz"), x=x.numpy(), features=feats.numpy(), logits=logits.numpy(),
             head_weight=model.head.weight.detach().numpy(), head_bias=model.head.bias.detach().numpy())
    args = argparse.Namespace(model="RETFound_dinov2", model_arch="retfound_dinov2", nb_classes=5, input_size=224)
    torch.save({"model": model.state_dict(), "epoch": 0, "args": args}, os.path.join(workdir, "checkpoint-best.pth"))
    n = sum(p.numel() for p in model.parameters())
    print(f"[torch {torch.__version__}, timm {timm.__version__}] vit_large_patch14_dinov2 @224: {n / 1e6:.2f}M "
          f"params; max |logit| {float(logits.abs().max()):.3f}", flush=True)
    return {"max_abs_reference_logit": float(logits.abs().max()),
            "max_abs_reference_feature": float(feats.abs().max())}


def vitl_paddle_side(workdir: str) -> None:
    """Runs in the Paddle environment: the converted teacher checkpoint through ``load_pretrained`` (head set to
    the reference's), and RETFound's fine-tuned checkpoint through ``load_finetuned``."""
    sys.path.insert(0, REPO)
    import paddle

    import models
    from models.pretrained import load_finetuned, load_pretrained

    ref = np.load(os.path.join(workdir, "torch.npz"))
    x = paddle.to_tensor(ref["x"])
    out = {}
    t0 = time.time()
    m = models.create_model("RETFound_dinov2", num_classes=5)
    m.eval()
    load_pretrained(m, os.path.join(workdir, "RETFound_dinov2_parity.pdparams"))
    m.head.weight.set_value(ref["head_weight"].T.copy())
    m.head.bias.set_value(ref["head_bias"])
    with paddle.no_grad():
        feats = m.forward_features(x)
        out["features_pretrained"] = feats.numpy()
        out["logits_pretrained"] = m.head(feats).numpy()
    t1 = time.time()
    m = models.create_model("RETFound_dinov2", num_classes=5)
    m.eval()
    load_finetuned(m, os.path.join(workdir, "checkpoint-best.pth"))
    with paddle.no_grad():
        out["logits_finetuned"] = m(x).numpy()
    print(f"[paddle {paddle.__version__}] pretrained path {t1 - t0:.1f}s, fine-tuned path {time.time() - t1:.1f}s",
          flush=True)
    np.savez(os.path.join(workdir, "paddle.npz"), **out)


def run_timed(cmd: list[str]) -> tuple[str, float]:
    """Run ``cmd`` under /usr/bin/time -v (2 math threads); its stdout and peak RSS in MB."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONPATH=REPO,
               GLOG_minloglevel="2")
    proc = subprocess.run(["/usr/bin/time", "-v"] + cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return proc.stdout, (int(m.group(1)) / 1024 if m else float("nan"))


def measure_vitl(workdir: str, paddle_python: str, keep: bool) -> None:
    os.makedirs(workdir, exist_ok=True)
    torch.set_num_threads(2)
    results = vitl_torch_side(workdir)
    pth = os.path.join(workdir, "RETFound_dinov2_parity.pth")
    out, rss = run_timed([paddle_python, "-m", "models.convert", pth, pth[:-4] + ".pdparams"])
    print(out.strip(), flush=True)
    results["convert_peak_rss_MB"] = round(rss)
    out, rss = run_timed([paddle_python, os.path.abspath(__file__), "--workdir", workdir, "--paddle-side"])
    print(out.strip(), flush=True)
    results["paddle_peak_rss_MB"] = round(rss)
    ref, got = np.load(os.path.join(workdir, "torch.npz")), np.load(os.path.join(workdir, "paddle.npz"))
    results["max_abs_feature_diff_teacher_converted"] = float(np.abs(got["features_pretrained"] - ref["features"]).max())
    results["max_abs_logit_diff_teacher_converted"] = float(np.abs(got["logits_pretrained"] - ref["logits"]).max())
    results["max_abs_logit_diff_finetuned_pth"] = float(np.abs(got["logits_finetuned"] - ref["logits"]).max())
    print(json.dumps(results, indent=1))
    if not keep:
        shutil.rmtree(workdir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vitl", action="store_true", help="measure the full-size ViT-L/14 parity instead")
    ap.add_argument("--workdir", default="/tmp/dinov2_vitl")
    ap.add_argument("--paddle-python", default=os.environ.get("PADDLE_PYTHON", "python"),
                    help="Python of the toolkit's (Paddle) environment (default: $PADDLE_PYTHON, else python)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir")
    ap.add_argument("--paddle-side", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.paddle_side:
        vitl_paddle_side(a.workdir)
    elif a.vitl:
        measure_vitl(a.workdir, a.paddle_python, a.keep)
    else:
        make_fixtures()


if __name__ == "__main__":
    main()
