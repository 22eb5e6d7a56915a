"""Write the PyTorch-reference fixtures used by tests/unit/test_vit.py and tests/unit/test_pretrained.py (dev-only).

The reference is timm's ``VisionTransformer`` in the RETFound configuration (qkv bias, LayerNorm eps 1e-6,
``global_pool='avg'`` with ``fc_norm`` so the encoder norm is absent; or ``global_pool='token'`` with the
encoder norm), built at a tiny size. Parameters are redrawn at O(1) scale (random LayerNorm affine, biases
and a wide head) so that a wrong op shows up in the logits instead of drowning in near-zero activations.

Files written to ``tests/fixtures/vit_ref/`` (about 1.7 MB in total):

* ``mae_pretrain.pth``: MAE pretraining layout ``{'model': encoder + norm + decoder_* + mask_token,
  'optimizer', 'epoch', 'scaler', 'args': argparse.Namespace}`` at img 64 (grid 4x4);
* ``finetuned_gp.pth``: fine-tuned RETFound layout ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}``,
  global pool, 5 classes, img 64;
* ``finetuned_cls.pth``: same, cls-token pooling (``norm`` present, no ``fc_norm``), 3 classes, img 32;
* ``reference.npz``: fixed inputs and the reference outputs:
  ``x64``/``x96``/``x32`` inputs, ``pos_embed_mae_64`` (the MAE checkpoint's pos_embed), ``logits_gp`` (finetuned_gp, eval, on x64), ``logits_cls``
  (finetuned_cls on x32), ``pos_embed_96`` (MAE pos_embed resized by MAE's interpolate_pos_embed to grid
  6x6), ``features_mae_gp_96`` (MAE weights loaded into a global-pool model at img 96: pooled + fc_norm
  feature, the head's input) and ``features_mae_cls_64`` (MAE weights in a cls-token model at img 64).

Regenerate (needs PyTorch + timm; the repo's Paddle venv does not have them):

    TORCH_PYTHON tools/make_reference_fixtures.py     # from the repository root

TORCH_PYTHON: the Python interpreter of an environment with PyTorch + timm.

References: timm ``vision_transformer.py``; facebookresearch/mae ``main_finetune.py`` and
``util/pos_embed.py`` (``interpolate_pos_embed``).
"""
from __future__ import annotations

import argparse
import os
import sys
import types
from functools import partial

# torchvision's compiled ops do not load in the dev torch venv; timm only needs the Python parts.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as tnn  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "vit_ref")
PATCH, DIM, DEPTH, HEADS = 16, 48, 2, 4
DEC_DIM, DEC_DEPTH, DEC_HEADS = 32, 1, 2


def reference_vit(img_size: int, num_classes: int, global_pool: bool, depth: int = DEPTH, dim: int = DIM,
                  heads: int = HEADS, patch: int = PATCH) -> VisionTransformer:
    """timm ViT exactly as RETFound configures it."""
    return VisionTransformer(img_size=img_size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                             mlp_ratio=4, qkv_bias=True, norm_layer=partial(tnn.LayerNorm, eps=1e-6),
                             num_classes=num_classes, global_pool="avg" if global_pool else "token",
                             fc_norm=True if global_pool else False)


@torch.no_grad()
def randomise(sd: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """O(1)-scale random values for every tensor: weights ~ N(0, 1/fan_in), LayerNorm weight ~ 1 + N(0, .2),
    biases and tokens ~ N(0, .1), head wide so logits are O(1)."""
    out = {}
    for k, v in sd.items():
        r = torch.randn(v.shape, generator=gen)
        if k.endswith("weight") and v.ndim >= 2:
            fan_in = int(np.prod(v.shape[1:]))
            r = r / fan_in ** 0.5 * (3.0 if k.startswith("head") else 1.0)
        elif k.endswith("weight") and v.ndim == 1:   # LayerNorm
            r = 1.0 + 0.2 * r
        else:
            r = 0.1 * r
        out[k] = r.contiguous()
    return out


def mae_decoder(gen: torch.Generator, num_patches: int) -> dict[str, torch.Tensor]:
    """Tensors named and shaped like facebookresearch/mae ``MaskedAutoencoderViT``'s decoder."""
    h = DEC_DIM * 4
    d = {"mask_token": torch.randn(1, 1, DEC_DIM, generator=gen) * 0.02,
         "decoder_embed.weight": torch.randn(DEC_DIM, DIM, generator=gen) * 0.02,
         "decoder_embed.bias": torch.zeros(DEC_DIM),
         "decoder_pos_embed": torch.randn(1, num_patches + 1, DEC_DIM, generator=gen) * 0.02}
    for i in range(DEC_DEPTH):
        p = f"decoder_blocks.{i}."
        for name, shape in [("norm1.weight", (DEC_DIM,)), ("norm1.bias", (DEC_DIM,)),
                            ("attn.qkv.weight", (3 * DEC_DIM, DEC_DIM)), ("attn.qkv.bias", (3 * DEC_DIM,)),
                            ("attn.proj.weight", (DEC_DIM, DEC_DIM)), ("attn.proj.bias", (DEC_DIM,)),
                            ("norm2.weight", (DEC_DIM,)), ("norm2.bias", (DEC_DIM,)),
                            ("mlp.fc1.weight", (h, DEC_DIM)), ("mlp.fc1.bias", (h,)),
                            ("mlp.fc2.weight", (DEC_DIM, h)), ("mlp.fc2.bias", (DEC_DIM,))]:
            d[p + name] = torch.randn(*shape, generator=gen) * 0.02
    d["decoder_norm.weight"] = torch.ones(DEC_DIM)
    d["decoder_norm.bias"] = torch.zeros(DEC_DIM)
    d["decoder_pred.weight"] = torch.randn(PATCH * PATCH * 3, DEC_DIM, generator=gen) * 0.02
    d["decoder_pred.bias"] = torch.zeros(PATCH * PATCH * 3)
    return d


def optimizer_state(model_sd: dict[str, torch.Tensor], lr: float) -> dict:
    """A torch AdamW-style ``state_dict()`` (state kept for two params only, to keep the file small)."""
    state = {i: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v)}
             for i, v in enumerate(list(model_sd.values())[:2])}
    return {"state": state, "param_groups": [{"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05,
                                              "amsgrad": False, "params": list(range(len(model_sd)))}]}


def interpolate_pos_embed_reference(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """MAE's interpolate_pos_embed, applied to one tensor (behaviour reproduced, 1 extra token)."""
    extra, tokens = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(tokens.shape[1] ** 0.5)
    tokens = tokens.reshape(-1, old, old, pos_embed.shape[-1]).permute(0, 3, 1, 2)
    tokens = torch.nn.functional.interpolate(tokens, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    tokens = tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra, tokens), dim=1)


def load_like_retfound(model: VisionTransformer, ckpt_model: dict[str, torch.Tensor], img_grid: int) -> list[str]:
    """RETFound main_finetune's loading: drop mismatched head, interpolate pos_embed, load strict=False."""
    ckpt_model = dict(ckpt_model)
    own = model.state_dict()
    for k in ["head.weight", "head.bias"]:
        if k in ckpt_model and ckpt_model[k].shape != own[k].shape:
            del ckpt_model[k]
    ckpt_model["pos_embed"] = interpolate_pos_embed_reference(ckpt_model["pos_embed"], img_grid)
    msg = model.load_state_dict(ckpt_model, strict=False)
    return sorted(msg.missing_keys)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    ref: dict[str, np.ndarray] = {}
    x64 = torch.randn(2, 3, 64, 64, generator=gen)
    x96 = torch.randn(2, 3, 96, 96, generator=gen)
    x32 = torch.randn(2, 3, 32, 32, generator=gen)
    ref.update(x64=x64.numpy(), x96=x96.numpy(), x32=x32.numpy())

    # (a) MAE pretraining checkpoint: encoder as a cls-token ViT (it has `norm`), no head, plus decoder.
    enc = reference_vit(64, 0, global_pool=False)
    enc_sd = randomise(enc.state_dict(), gen)
    mae_model = {**enc_sd, **mae_decoder(gen, num_patches=16)}
    ref["pos_embed_mae_64"] = mae_model["pos_embed"].numpy()
    mae_args = argparse.Namespace(model="mae_vit_large_patch16", input_size=64, mask_ratio=0.75, norm_pix_loss=True,
                                  batch_size=64, epochs=800, blr=1.5e-4, weight_decay=0.05, output_dir="./out")
    torch.save({"model": mae_model, "optimizer": optimizer_state(mae_model, 1e-4), "epoch": 3,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                           "_growth_tracker": 7},
                "args": mae_args}, os.path.join(OUT, "mae_pretrain.pth"))

    # MAE weights into a global-pool model at img 96 (pos_embed 4x4 -> 6x6), as RETFound fine-tuning does.
    m = reference_vit(96, 5, global_pool=True)
    missing = load_like_retfound(m, mae_model, img_grid=6)
    assert missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"], missing
    m.eval()
    with torch.no_grad():
        ref["pos_embed_96"] = m.pos_embed.detach().numpy().copy()
        ref["features_mae_gp_96"] = m.forward_head(m.forward_features(x96), pre_logits=True).numpy()
    # ... and into a cls-token model at the pretraining size (norm used, no interpolation).
    m = reference_vit(64, 5, global_pool=False)
    missing = load_like_retfound(m, mae_model, img_grid=4)
    assert missing == ["head.bias", "head.weight"], missing
    m.eval()
    with torch.no_grad():
        ref["features_mae_cls_64"] = m.forward_head(m.forward_features(x64), pre_logits=True).numpy()

    ft_args = argparse.Namespace(model="RETFound_mae", input_size=64, nb_classes=5, global_pool=True, drop_path=0.2,
                                 blr=5e-3, layer_decay=0.65, task="fixture", finetune="RETFound_mae_meh")
    # (b) fine-tuned checkpoint, global pool, 5 classes, img 64
    m = reference_vit(64, 5, global_pool=True)
    m.load_state_dict(randomise(m.state_dict(), gen))
    m.eval()
    with torch.no_grad():
        ref["logits_gp"] = m(x64).numpy()
    sd = m.state_dict()
    torch.save({"model": sd, "optimizer": optimizer_state(sd, 5e-4), "epoch": 41, "scaler": {"scale": 1024.0},
                "args": ft_args}, os.path.join(OUT, "finetuned_gp.pth"))

    # (c) fine-tuned checkpoint, cls-token pooling, 3 classes, img 32
    m = reference_vit(32, 3, global_pool=False)
    m.load_state_dict(randomise(m.state_dict(), gen))
    m.eval()
    with torch.no_grad():
        ref["logits_cls"] = m(x32).numpy()
    sd = m.state_dict()
    ft_args.global_pool, ft_args.nb_classes, ft_args.input_size = False, 3, 32
    torch.save({"model": sd, "optimizer": optimizer_state(sd, 5e-4), "epoch": 7, "args": ft_args},
               os.path.join(OUT, "finetuned_cls.pth"))

    np.savez(os.path.join(OUT, "reference.npz"), **{k: v.astype(np.float32) for k, v in ref.items()})
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {sorted(os.listdir(OUT))} to {OUT} ({total / 1e6:.2f} MB); torch {torch.__version__}")


if __name__ == "__main__":
    main()
