"""Vision Transformer (ViT) in the RETFound configuration and the DINOv2 family's, written for Paddle.

The encoder is timm's ``VisionTransformer``: patch embedding by a stride-``patch`` convolution, a learned cls
token (optionally followed by register tokens) and learned absolute position embedding, pre-norm blocks
(LayerNorm eps 1e-6, multi-head attention with a qkv bias, exact-erf GELU MLP, optional LayerScale) with
per-sample stochastic depth, and no dropout. Three ways to pool the tokens for the head:

* ``global_pool=True`` (RETFound MAE default): mean of the patch tokens (the prefix tokens are left out: MAE
  trained the cls token only as a placeholder, not as a summary) -> ``fc_norm`` -> ``head``. The encoder's
  final ``norm`` does not exist in this mode.
* ``global_pool=True, fc_norm=False`` (RETFound-Green, as its README sets timm's ``global_pool='avg'`` on a
  model built without ``fc_norm``): ``norm`` -> mean of the patch tokens -> ``head``.
* ``global_pool=False``: ``norm`` -> cls token -> ``head`` (timm's ``'token'`` pooling; the DINOv2 models).

The DINOv2 family adds three timm options: ``init_values`` (LayerScale: each residual branch scaled by a
learned per-channel ``gamma``, ``blocks.N.ls1.gamma`` / ``ls2.gamma``), ``reg_tokens`` (register tokens after
the cls token, ``reg_token`` [1, R, D]) and ``no_embed_class`` (the position embedding covers the patches
only and is added before the prefix tokens are put in front). Parameter names are those of timm's
``VisionTransformer``, so PyTorch checkpoints map by name.

References: timm ``vision_transformer.py`` (VisionTransformer, Block, Attention, LayerScale, DropPath,
``_pos_embed``, ``vit_*_patch14_dinov2``, ``vit_small_patch14_reg4_dinov2``), facebookresearch/mae
``models_vit.py`` / ``util/pos_embed.py``, rmaphoh/RETFound ``models_vit.py`` / ``main_finetune.py``,
justinengelmann/RETFound_Green README, ABILab-CUHK/VisionFM ``models/vision_transformer.py`` and ``utils.py``.
"""
from __future__ import annotations

import math
import re

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from models.cpu_kernels import GELU, LayerNorm, Linear, attention, linear_gelu, patch_embed, softmax
from models.registry import register_model
from util.errors import UserError
from util.image_io import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

LN_EPS = 1e-6


# ----------------------------------------------------------------------------------------------- init helpers
@paddle.no_grad()
def trunc_normal_(param: paddle.Tensor, std: float = 1.0, mean: float = 0.0, a: float = -2.0,
                  b: float = 2.0) -> paddle.Tensor:
    """Fill ``param`` in place from N(mean, std^2) truncated to the **absolute** interval [a, b].

    Same semantics as timm's / PyTorch's ``trunc_normal_``: the bounds are not in units of ``std``, so with
    the default bounds and a small std (2e-5 for the RETFound head) the draw is effectively untruncated.
    Sampling is by the inverse CDF of a uniform draw between the CDF values of the bounds; Paddle's global
    generator is used, so ``paddle.seed`` makes it reproducible.
    """
    def cdf(v: float) -> float:
        return 0.5 * (1.0 + math.erf(v / math.sqrt(2.0)))

    lo, hi = cdf((a - mean) / std), cdf((b - mean) / std)
    u = paddle.uniform(param.shape, dtype="float32", min=2 * lo - 1, max=2 * hi - 1)
    # keep erfinv finite at the edges of the interval (u = +-1 only when the truncation is vacuous)
    u = paddle.clip(u, -1 + 1e-7, 1 - 1e-7)
    v = paddle.erfinv(u) * (std * math.sqrt(2.0)) + mean
    param.set_value(paddle.clip(v, a, b).astype(param.dtype))
    return param


@paddle.no_grad()
def _xavier_uniform_(param: paddle.Tensor, fan_in: int, fan_out: int) -> None:
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    param.set_value(paddle.uniform(param.shape, dtype="float32", min=-limit, max=limit).astype(param.dtype))


@paddle.no_grad()
def _fill_(param: paddle.Tensor, value: float) -> None:
    param.set_value(paddle.full(param.shape, value, dtype=param.dtype))


# ----------------------------------------------------------------------------------------------- layers
def drop_path(x: paddle.Tensor, drop_prob: float, training: bool) -> paddle.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale survivors by 1/keep_prob."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = [x.shape[0]] + [1] * (x.ndim - 1)
    mask = paddle.floor(keep_prob + paddle.rand(shape, dtype=x.dtype))
    return x * (mask / keep_prob)


class DropPath(nn.Layer):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.4f}"


class PatchEmbed(nn.Layer):
    """Image [B, C, H, W] -> patch tokens [B, N, D] by a kernel = stride = patch convolution."""

    def __init__(self, input_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if input_size % patch_size:
            raise UserError(f"ViT: input size {input_size} is not a multiple of the patch size {patch_size} "
                            f"(expected e.g. {patch_size * max(1, round(input_size / patch_size))}); "
                            f"pass a --input_size divisible by {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2D(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if x.shape[-2] != self.input_size or x.shape[-1] != self.input_size:
            raise UserError(f"ViT: input image is {x.shape[-2]}x{x.shape[-1]} but the model was built for "
                            f"{self.input_size}x{self.input_size}; build the model with input_size matching "
                            f"--input_size (position embeddings are resized when loading weights)")
        if not self.proj._forward_pre_hooks and not self.proj._forward_post_hooks:
            tokens = patch_embed(x, self.proj.weight, self.proj.bias)   # on CPU: patches as rows, one product
            if tokens is not None:
                return tokens
        x = self.proj(x)                       # [B, D, h, w]
        return x.flatten(2).transpose([0, 2, 1])  # [B, h*w, D], row-major over the grid like timm


class Attention(nn.Layer):
    # Where ``util/explain.py`` collects the attention weights for attention rollout: a list set on the
    # instance receives ``attn`` [B, heads, N, N] at every forward. None (the class default) keeps nothing, so
    # training and inference are unchanged (same kernels, same outputs, no extra memory). The compiled CPU
    # kernel keeps the weights for its backward and hands them over; a fused path that never materialises them
    # (``F.scaled_dot_product_attention``, flash attention) may be taken only while ``attn_sink is None``.
    attn_sink: list | None = None

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = Linear(dim, dim * 3)
        self.proj = Linear(dim, dim)

    def forward(self, x: paddle.Tensor, residual: paddle.Tensor | None = None) -> paddle.Tensor:
        """The attention branch; with ``residual``, ``residual +`` the branch (added with ``proj``'s bias)."""
        B, N, C = x.shape
        qkv = self.qkv(x)
        # the compiled kernel on CPU (models/cpu_kernels.py): same math, no copies; it hands the sink its weights
        out = attention(qkv, self.num_heads, self.scale, self.attn_sink)
        if out is not None:
            return self.proj(out, residual)
        if not paddle.in_dynamic_mode():   # a static program (export): see _static_attention
            return self.proj(self._static_attention(qkv, B, N, C), residual)
        # unbind, not qkv[0]/qkv[1]/qkv[2]: indexing makes backward scatter three full-size zero-padded
        # gradients (measured ViT-B/16 CPU train step: 0.51 -> 0.85 img/s). Paddle's
        # scaled_dot_product_attention runs this same math on CPU (identical output, same speed) but would
        # pick flash attention on GPU, which needs fp16, so the explicit form is used on every device.
        q, k, v = qkv.reshape([B, N, 3, self.num_heads, self.head_dim]).unbind(2)   # [B, N, H, Dh]
        # einsum, not .transpose([0, 2, 1, 3]) + matmul: with Paddle's default stride kernels a transpose is
        # a view and making it contiguous goes through a slow element-wise strided copy (6.8 ms for one
        # [4, 12, 197, 64] tensor on CPU, 0.7 ms via the transpose kernel einsum uses). Same kernels
        # otherwise, bit-identical outputs and gradients; ViT-B/16 CPU train step 1.38 -> 1.76 img/s.
        attn = softmax(paddle.einsum('bnhd,bmhd->bhnm', q * self.scale, k))
        if self.attn_sink is not None:
            self.attn_sink.append(attn)
        x = paddle.einsum('bhnm,bmhd->bnhd', attn, v).reshape([B, N, C])
        return self.proj(x, residual)


    def _static_attention(self, qkv, B, N, C):
        """The same math as transposes and batched matmuls, the form Paddle Inference's oneDNN passes fuse
        and run in oneDNN (bf16 on request); einsum has no oneDNN kernel and runs as a slow native fp32 op
        between bf16 ones."""
        qkv = qkv.reshape([B, N, 3, self.num_heads, self.head_dim]).transpose([2, 0, 3, 1, 4])  # [3, B, H, N, Dh]
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = softmax(paddle.matmul(q * self.scale, k, transpose_y=True))
        if self.attn_sink is not None:
            self.attn_sink.append(attn)
        return paddle.matmul(attn, v).transpose([0, 2, 1, 3]).reshape([B, N, C])


class Mlp(nn.Layer):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = GELU()
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: paddle.Tensor, residual: paddle.Tensor | None = None) -> paddle.Tensor:
        """fc1 -> GELU -> fc2; with ``residual``, ``residual +`` that (added with fc2's bias). On CPU the bias
        of fc1 and the GELU are one kernel (``linear_gelu``) unless fc1 has hooks (LoRA, explanations)."""
        h = None
        if type(self.fc1) is Linear and type(self.act) is GELU and not self.fc1._forward_pre_hooks \
                and not self.fc1._forward_post_hooks and not self.act._forward_pre_hooks \
                and not self.act._forward_post_hooks and paddle.in_dynamic_mode():
            h = linear_gelu(x, self.fc1.weight, self.fc1.bias)
        if h is None:
            h = self.act(self.fc1(x))
        return self.fc2(h, residual)


class LayerScale(nn.Layer):
    """Per-channel scale of a residual branch, ``x * gamma`` (CaiT; DINOv2 starts it at 1e-5)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = self.create_parameter([dim], dtype="float32",
                                           default_initializer=nn.initializer.Constant(float(init_values)))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x * self.gamma


class Block(nn.Layer):
    """Pre-norm transformer block: x + DropPath(LS(Attn(LN(x)))), then x + DropPath(LS(MLP(LN(x)))); the
    LayerScales ``ls1``/``ls2`` exist only with ``init_values`` (timm: None means none)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path_rate: float,
                 init_values: float | None = None):
        super().__init__()
        self.norm1 = LayerNorm(dim, epsilon=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else None
        self.norm2 = LayerNorm(dim, epsilon=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else None
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.drop_path.drop_prob == 0.0 or not self.training:   # no stochastic depth: the branches' last
            if self.ls1 is None:                                      # layers add the residual themselves
                x = self.attn(self.norm1(x), residual=x)
            else:
                x = x + self.ls1(self.attn(self.norm1(x)))
            if self.ls2 is None:
                return self.mlp(self.norm2(x), residual=x)
            return x + self.ls2(self.mlp(self.norm2(x)))
        y = self.attn(self.norm1(x))
        x = x + self.drop_path(y if self.ls1 is None else self.ls1(y))
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.ls2 is None else self.ls2(y))


# ----------------------------------------------------------------------------------------------- model
_HEAD_KEYS = ("head.weight", "head.bias")
_FC_NORM_KEYS = ("fc_norm.weight", "fc_norm.bias")
_NORM_KEYS = ("norm.weight", "norm.bias")
# pretraining-only parameters no classifier uses: the mask tokens of MAE ([1, 1, D]) and DINOv2 ([1, D]), and
# the iBOT student's masked_embed (VisionFM's pretraining)
_PRETRAIN_ONLY_KEYS = ("mask_token", "masked_embed")


class VisionTransformer(nn.Layer):
    """ViT classifier (RETFound / MAE, DINOv2, RETFound-Green, VisionFM). See the module docstring for the
    pooling modes; ``fc_norm=None`` means "with global pooling" as in timm."""

    def __init__(self, input_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, global_pool: bool = True, fc_norm: bool | None = None,
                 init_values: float | None = None, reg_tokens: int = 0, no_embed_class: bool = False):
        super().__init__()
        if not 0.0 <= drop_path_rate < 1.0:
            raise UserError(f"ViT: drop_path_rate {drop_path_rate} out of range (expected 0 <= p < 1); "
                            f"pass e.g. --drop_path 0.2")
        self.global_pool = bool(global_pool)
        use_fc_norm = self.global_pool if fc_norm is None else bool(fc_norm) and self.global_pool
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_embed = PatchEmbed(input_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches

        self.num_reg_tokens = int(reg_tokens)
        self.num_prefix_tokens = 1 + self.num_reg_tokens          # cls, then the registers
        self.no_embed_class = bool(no_embed_class)
        # how many leading entries of pos_embed belong to prefix tokens (0: the patches' only)
        self.pos_embed_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        self.cls_token = self.create_parameter([1, 1, embed_dim], dtype="float32")
        self.reg_token = (self.create_parameter([1, self.num_reg_tokens, embed_dim], dtype="float32")
                          if self.num_reg_tokens else None)
        self.pos_embed = self.create_parameter([1, num_patches + self.pos_embed_prefix, embed_dim], dtype="float32")

        # stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last
        self.drop_path_rates = [float(r) for r in np.linspace(0.0, drop_path_rate, depth)]
        self.blocks = nn.LayerList([Block(embed_dim, num_heads, mlp_ratio, r, init_values)
                                    for r in self.drop_path_rates])

        if use_fc_norm:
            # RETFound deletes the encoder norm in this mode; the pooled feature gets its own LayerNorm.
            self.norm = None
            self.fc_norm = LayerNorm(embed_dim, epsilon=LN_EPS)
        else:
            self.norm = LayerNorm(embed_dim, epsilon=LN_EPS)
            self.fc_norm = None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        # model self-description (see the project contract)
        self.num_outputs = num_classes
        self.num_features = embed_dim
        self.num_views = 1
        self.num_layers = depth + 1
        # False for the models whose source fixes the pooling (they ignore --global_pool; see the factories)
        self.pool_from_flag = True
        self.default_cfg = {
            "input_size": input_size,
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "interpolation": "bicubic",
            "crop_pct": 224 / 256 if input_size <= 224 else 1.0,
        }
        self._init_weights()

    # ------------------------------------------------------------------ init
    @paddle.no_grad()
    def _init_weights(self) -> None:
        """Random init as in MAE / timm: trunc-normal(0.02) tokens, xavier-uniform linears and patch
        projection (the conv seen as a [D, C*p*p] linear), zero biases, LayerNorm ones/zeros; LayerScale
        gammas keep ``init_values``."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if self.reg_token is not None:
            trunc_normal_(self.reg_token, std=0.02)
        w = self.patch_embed.proj.weight            # [D, C, p, p]
        _xavier_uniform_(w, fan_in=int(np.prod(w.shape[1:])), fan_out=w.shape[0])
        _fill_(self.patch_embed.proj.bias, 0.0)
        for layer in self.sublayers():
            if isinstance(layer, nn.Linear):
                fan_in, fan_out = layer.weight.shape  # Paddle Linear weight is [in, out]
                _xavier_uniform_(layer.weight, fan_in, fan_out)
                _fill_(layer.bias, 0.0)
            elif isinstance(layer, nn.LayerNorm):
                _fill_(layer.weight, 1.0)
                _fill_(layer.bias, 0.0)

    def reset_head(self, std: float = 2e-5) -> None:
        """Head weight ~ trunc_normal(std) with absolute bounds [-2, 2] (as timm), bias zero."""
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=std)
            _fill_(self.head.bias, 0.0)

    # ------------------------------------------------------------------ forward
    def forward_tokens(self, x: paddle.Tensor) -> paddle.Tensor:
        """Image [B, 3, H, W] -> all tokens after the last block [B, prefix + N, D] (cls, registers, patches)."""
        x = self.patch_embed(x)
        prefix = [self.cls_token.expand([x.shape[0], -1, -1])]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand([x.shape[0], -1, -1]))
        if self.no_embed_class:   # the position embedding covers the patches only: add, then put the prefix in front
            x = paddle.concat(prefix + [x + self.pos_embed], axis=1)
        else:
            x = paddle.concat(prefix + [x], axis=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward_features(self, x: paddle.Tensor) -> paddle.Tensor:
        """Image -> pooled, normalised feature [B, num_features] (the head's input)."""
        x = self.forward_tokens(x)
        if not self.global_pool:
            return self.norm(x)[:, 0]
        if self.fc_norm is not None:
            return self.fc_norm(x[:, self.num_prefix_tokens:, :].mean(axis=1))
        return self.norm(x)[:, self.num_prefix_tokens:, :].mean(axis=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(self.forward_features(x))

    # ------------------------------------------------------------------ optimisation helpers
    def no_weight_decay(self) -> set[str]:
        # timm's set (the dist_token of DeiT does not exist here)
        return {"pos_embed", "cls_token"} | ({"reg_token"} if self.reg_token is not None else set())

    def layer_id(self, param_name: str) -> int:
        """Layer index for layer-wise LR decay: embeddings 0 (the register tokens too, as timm's group_matcher
        places them), block i -> i + 1, norms/head -> num_layers."""
        if param_name in ("cls_token", "reg_token", "pos_embed") or param_name.startswith("patch_embed."):
            return 0
        m = re.match(r"blocks\.(\d+)\.", param_name)
        if m:
            return int(m.group(1)) + 1
        return self.num_layers

    # ------------------------------------------------------------------ pretrained weights
    def prepare_pretrained(self, sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], set[str]]:
        """Adapt a Paddle-layout state dict (pretraining or fine-tuned checkpoint) to this model.

        Drops what this model never uses (MAE ``decoder_*``, the mask tokens; the encoder ``norm`` when the
        model has ``fc_norm`` instead, which RETFound deletes), drops ``head.*`` when its shape differs, and
        resizes the patch part of ``pos_embed`` bicubically to this model's grid (entries of prefix tokens
        kept). Returns the new dict and the keys allowed to be missing from it: the head, plus ``fc_norm`` when
        the head is not loaded either (an MAE checkpoint has neither).
        """
        own = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        out: dict[str, np.ndarray] = {}
        for k, v in sd.items():
            if k.startswith("decoder_") or k in _PRETRAIN_ONLY_KEYS:
                continue
            if self.norm is None and k in _NORM_KEYS:
                continue
            if k in _HEAD_KEYS and k in own and tuple(v.shape) != own[k]:
                continue
            out[k] = v
        # with register tokens on one side only the checkpoint is of another family: its pos_embed is left as it
        # is, and the key check below names the model to use
        if "pos_embed" in out and ("reg_token" in out) == (self.reg_token is not None):
            out["pos_embed"] = resize_pos_embed(out["pos_embed"], self.patch_embed.grid_size, self.pos_embed_prefix)
        # A checkpoint without a head (pretraining, or head dropped above) may also lack fc_norm; a
        # checkpoint whose head is used must bring the norm that head was trained after.
        allowed = set(_HEAD_KEYS)
        if self.fc_norm is not None and not any(k in out for k in _HEAD_KEYS):
            allowed |= set(_FC_NORM_KEYS)
        expected_missing = {k for k in allowed if k in own and k not in out}
        return out, expected_missing


def resize_pos_embed(pos_embed: np.ndarray, new_grid: int, num_prefix_tokens: int = 1) -> np.ndarray:
    """Resize the patch-token part of a [1, prefix + g*g, D] position embedding to ``new_grid`` squared.

    Bicubic, align_corners=False, without antialiasing, as MAE's / RETFound's ``interpolate_pos_embed`` (which
    RETFound applies to every ``--finetune`` checkpoint, DINOv2's 37x37 grid included; timm's own pretrained
    loader antialiases when it shrinks a grid, the reference's loading does not). The ``num_prefix_tokens``
    leading entries (cls, registers; 0 for a ``no_embed_class`` model) are kept as they are. Returns the
    input unchanged when the grid already matches.
    """
    pos_embed = np.asarray(pos_embed)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise UserError(f"pos_embed: shape {tuple(pos_embed.shape)} is not [1, tokens, dim]; "
                        f"the checkpoint is not a ViT checkpoint")
    n_patch = pos_embed.shape[1] - num_prefix_tokens
    old_grid = int(round(math.sqrt(n_patch)))
    if old_grid * old_grid != n_patch:
        raise UserError(f"pos_embed: {n_patch} patch tokens do not form a square grid "
                        f"(expected g*g + {num_prefix_tokens} tokens); use a checkpoint of a square-input ViT")
    if old_grid == new_grid:
        return pos_embed
    dim = pos_embed.shape[2]
    prefix = pos_embed[:, :num_prefix_tokens]
    grid = pos_embed[:, num_prefix_tokens:].reshape(1, old_grid, old_grid, dim).transpose(0, 3, 1, 2)
    resized = F.interpolate(paddle.to_tensor(grid.astype(np.float32)), size=[new_grid, new_grid],
                            mode="bicubic", align_corners=False)
    resized = resized.numpy().transpose(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim)
    return np.concatenate([prefix, resized.astype(pos_embed.dtype)], axis=1)


# ----------------------------------------------------------------------------------------------- factories
@register_model
def retfound_mae(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                 input_size: int = 224) -> VisionTransformer:
    """RETFound ViT-L/16 (embed 1024, depth 24, heads 16)."""
    return VisionTransformer(input_size=input_size, patch_size=16, num_classes=num_classes, embed_dim=1024, depth=24,
                             num_heads=16, mlp_ratio=4.0, drop_path_rate=drop_path_rate, global_pool=global_pool)


@register_model
def vit_base_patch16(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                     input_size: int = 224) -> VisionTransformer:
    """ViT-B/16 (embed 768, depth 12, heads 12)."""
    return VisionTransformer(input_size=input_size, patch_size=16, num_classes=num_classes, embed_dim=768, depth=12,
                             num_heads=12, mlp_ratio=4.0, drop_path_rate=drop_path_rate, global_pool=global_pool)


@register_model
def vit_small_patch16(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                      input_size: int = 224) -> VisionTransformer:
    """ViT-S/16 (embed 384, depth 12, heads 6)."""
    return VisionTransformer(input_size=input_size, patch_size=16, num_classes=num_classes, embed_dim=384, depth=12,
                             num_heads=6, mlp_ratio=4.0, drop_path_rate=drop_path_rate, global_pool=global_pool)


@register_model
def vit_test(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
             input_size: int = 224) -> VisionTransformer:
    """Tiny ViT for tests: patch 16, embed 32, depth 2, heads 2 (same code path as retfound_mae)."""
    return VisionTransformer(input_size=input_size, patch_size=16, num_classes=num_classes, embed_dim=32, depth=2,
                             num_heads=2, mlp_ratio=4.0, drop_path_rate=drop_path_rate, global_pool=global_pool)


# ----------------------------------------------------------------------------------------------- DINOv2 family
# These models keep the pooling their source uses and ignore --global_pool (``pool_from_flag`` False): RETFound
# builds RETFound_dinov2 and Dinov2 with timm's default ('token': cls token after the final norm) and passes
# global_pool to its MAE model only; RETFound-Green's README averages the patch tokens after the final norm;
# VisionFM's fine-tuning reads the cls token (--avgpool_patchtokens 0).
def _fixed_pool(model: VisionTransformer) -> VisionTransformer:
    model.pool_from_flag = False
    return model


def _dinov2(input_size: int, num_classes: int, drop_path_rate: float, embed_dim: int, depth: int, num_heads: int,
            patch_size: int = 14) -> VisionTransformer:
    """timm's ``vit_*_patch14_dinov2`` as RETFound builds it (``img_size=224``): LayerScale 1e-5, cls-token
    pooling after the final norm, ImageNet mean/std (RETFound's transforms)."""
    return _fixed_pool(VisionTransformer(input_size=input_size, patch_size=patch_size, num_classes=num_classes,
                                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0,
                                         drop_path_rate=drop_path_rate, global_pool=False, init_values=1e-5))


@register_model
def retfound_dinov2(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                    input_size: int = 224) -> VisionTransformer:
    """RETFound-DINOv2 ViT-L/14 (embed 1024, depth 24, heads 16; weights: RETFound_dinov2_meh / _shanghai)."""
    return _dinov2(input_size, num_classes, drop_path_rate, 1024, 24, 16)


@register_model
def dinov2_vits14(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                  input_size: int = 224) -> VisionTransformer:
    """Meta's DINOv2 ViT-S/14 (embed 384, depth 12, heads 6; weights: dinov2_vits14_pretrain.pth)."""
    return _dinov2(input_size, num_classes, drop_path_rate, 384, 12, 6)


@register_model
def dinov2_vitb14(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                  input_size: int = 224) -> VisionTransformer:
    """Meta's DINOv2 ViT-B/14 (embed 768, depth 12, heads 12; weights: dinov2_vitb14_pretrain.pth)."""
    return _dinov2(input_size, num_classes, drop_path_rate, 768, 12, 12)


@register_model
def dinov2_vitl14(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                  input_size: int = 224) -> VisionTransformer:
    """Meta's DINOv2 ViT-L/14 (embed 1024, depth 24, heads 16; weights: dinov2_vitl14_pretrain.pth)."""
    return _dinov2(input_size, num_classes, drop_path_rate, 1024, 24, 16)


@register_model
def dinov2_test(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                input_size: int = 32) -> VisionTransformer:
    """Tiny DINOv2-family ViT for tests: patch 16 (so 32 and 64 px fit), embed 32, depth 2, heads 2, LayerScale."""
    return _dinov2(input_size, num_classes, drop_path_rate, 32, 2, 2, patch_size=16)


# RETFound-Green's normalisation (its README and data.py) and VisionFM's fundus statistics (utils.get_stats)
GREEN_MEAN = GREEN_STD = (0.5, 0.5, 0.5)
VISIONFM_FUNDUS_MEAN = (0.423737496137619, 0.2609460651874542, 0.128403902053833)
VISIONFM_FUNDUS_STD = (0.29482534527778625, 0.20167365670204163, 0.13668020069599152)


def _green(input_size: int, num_classes: int, drop_path_rate: float, embed_dim: int, depth: int, num_heads: int,
           patch_size: int = 14) -> VisionTransformer:
    """timm's ``vit_small_patch14_reg4_dinov2`` as RETFound-Green's README uses it: 4 register tokens, position
    embedding for the patches only, mean of the patch tokens after the final norm (timm ``global_pool='avg'``
    set after building, so no fc_norm); images resized to the input size (bilinear, no crop), mean/std 0.5."""
    m = VisionTransformer(input_size=input_size, patch_size=patch_size, num_classes=num_classes, embed_dim=embed_dim,
                          depth=depth, num_heads=num_heads, mlp_ratio=4.0, drop_path_rate=drop_path_rate,
                          global_pool=True, fc_norm=False, init_values=1e-5, reg_tokens=4, no_embed_class=True)
    m.default_cfg.update(mean=GREEN_MEAN, std=GREEN_STD, interpolation="bilinear", crop_pct=1.0)
    return _fixed_pool(m)


@register_model
def retfound_green(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                   input_size: int = 392) -> VisionTransformer:
    """RETFound-Green ViT-S/14 with 4 registers at 392 px (embed 384, depth 12, heads 6)."""
    return _green(input_size, num_classes, drop_path_rate, 384, 12, 6)


@register_model
def retfound_green_test(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                        input_size: int = 32) -> VisionTransformer:
    """Tiny RETFound-Green for tests: patch 16, embed 32, depth 2, heads 2, 4 registers, no_embed_class."""
    return _green(input_size, num_classes, drop_path_rate, 32, 2, 2, patch_size=16)


def _visionfm(input_size: int, num_classes: int, drop_path_rate: float, embed_dim: int, depth: int,
              num_heads: int) -> VisionTransformer:
    """VisionFM's ViT (iBOT's: timm's ViT-B/16 layout, no LayerScale) with cls-token pooling after the final
    norm; images resized to the input size (bicubic, no crop), normalised with VisionFM's fundus statistics."""
    m = VisionTransformer(input_size=input_size, patch_size=16, num_classes=num_classes, embed_dim=embed_dim,
                          depth=depth, num_heads=num_heads, mlp_ratio=4.0, drop_path_rate=drop_path_rate,
                          global_pool=False)
    m.default_cfg.update(mean=VISIONFM_FUNDUS_MEAN, std=VISIONFM_FUNDUS_STD, interpolation="bicubic", crop_pct=1.0)
    return _fixed_pool(m)


@register_model
def visionfm(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
             input_size: int = 224) -> VisionTransformer:
    """VisionFM fundus encoder, ViT-B/16 (embed 768, depth 12, heads 12; weights: VFM_Fundus_weights.pth)."""
    return _visionfm(input_size, num_classes, drop_path_rate, 768, 12, 12)


@register_model
def visionfm_test(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                  input_size: int = 32) -> VisionTransformer:
    """Tiny VisionFM-layout ViT for tests: patch 16, embed 32, depth 2, heads 2."""
    return _visionfm(input_size, num_classes, drop_path_rate, 32, 2, 2)
