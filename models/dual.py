"""Dual-eye models: one sample = (left, right) fundus photographs, input ``[B, 2, 3, H, W]`` (0 left, 1 right).

Both eyes go through one shared backbone as a batch of ``2B`` images; what follows depends on the model:

* ``dual_convnext_small`` / ``dual_retfound`` (the seed's ODIR-5K ConvNeXt-Small design, also over the
  RETFound ViT-L/16): the backbone's last feature map as tokens ``[B, N, C]`` per eye (ConvNeXt: the
  ``h*w`` map positions after its final LayerNorm; ViT: the patch tokens after the encoder norm, cls token
  dropped) -> a branch per eye (``proj_left`` / ``proj_right``: Linear C->D + LayerNorm) -> cross-attention in
  both directions (``cross_left``: left tokens query the right eye's; ``cross_right``: the reverse; 8 heads,
  residual + LayerNorm) -> mean over tokens per eye -> concat ``[B, 2D]`` -> ``fusion`` (Linear 2D->D, GELU,
  Dropout) -> ``head`` (Linear D->num_classes). D = 512 for the full models.
* ``dual_resnet50`` (the seed's ODIR-5K ResNet-50 design): pooled 2048-d features of both eyes concatenated
  ``[B, 4096]`` -> Dropout -> ``head``.

The two eyes have their own branch weights (and the ResNet head sees them in fixed slots), so left and right
are not interchangeable: a horizontal flip must swap the eyes as well (``util/transforms/dual.py`` does).

Contract: ``num_views = 2``; backbone parameters (prefix ``backbone.``) take the backbone's own layer ids,
everything after it (branches, cross-attention, fusion, head) takes ``num_layers`` = 1 + the backbone's
largest id, so ``layer_id < num_layers`` means "backbone" for ``--backbone_lr_scale`` / ``--freeze_backbone``.
``prepare_pretrained`` takes either this model's own checkpoint or a single-backbone one (a PaddleClas
ImageNet ``.pdparams``, a toolkit checkpoint of the single-image model, or a RETFound / MAE checkpoint
converted by ``models.pretrained``): the latter goes through the backbone's own ``prepare_pretrained``, is put
under ``backbone.``, and everything after the backbone is expected to be missing (freshly initialised; the
head is then re-drawn by ``load_pretrained``). ``drop_path_rate`` reaches the backbone where it has stochastic
depth (ConvNeXt, ViT); ``global_pool`` does not apply (tokens are always mean-pooled).

References: Vaswani et al., "Attention Is All You Need" (multi-head attention, post-norm residual); the
ODIR-5K seed systems (README.md, Seed systems).
"""
from __future__ import annotations

import abc

import numpy as np
import paddle
from paddle import nn

from models.convnext import convnext_small, convnext_test
from models.registry import register_model
from models.resnet import resnet50, resnet_test
from models.vit import VisionTransformer, trunc_normal_
from util.errors import UserError

_PREFIX = "backbone."


def split_eyes(x: paddle.Tensor, where: str) -> tuple[paddle.Tensor, int]:
    """[B, 2, 3, H, W] -> ([2B, 3, H, W] ordered b0-left, b0-right, b1-left, ..., B)."""
    if x.ndim != 5 or x.shape[1] != 2:
        raise UserError(f"{where}: input of shape {list(x.shape)} (expected [batch, 2, 3, H, W]: a left and a "
                        f"right eye per sample); use a dual-eye dataset (e.g. --data_format odir) or a "
                        f"single-image model")
    b = x.shape[0]
    return x.reshape([b * 2] + list(x.shape[2:])), b


class ViTPatchTokens(VisionTransformer):
    """A headless RETFound/MAE ViT whose output is its normalised patch tokens (cls token dropped).

    Built with ``global_pool=False`` so the encoder's final ``norm`` (part of every MAE / RETFound pretraining
    checkpoint) exists; parameter names are those of ``VisionTransformer``.
    """

    def __init__(self, **kwargs):
        super().__init__(num_classes=0, global_pool=False, **kwargs)

    def forward_patch_tokens(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.norm(self.forward_tokens(x))[:, 1:]

    def prepare_pretrained(self, sd: dict) -> tuple[dict, set[str]]:
        """As ``VisionTransformer.prepare_pretrained``, minus the classifier and its pooled-feature norm
        (``head.*``, ``fc_norm.*``) that this model does not have. A fine-tuned global-pool checkpoint has no
        encoder ``norm``; it is then allowed to stay at its initialisation (ones / zeros)."""
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
        out, missing = super().prepare_pretrained(sd)
        missing = set(missing) | {k for k in ("norm.weight", "norm.bias") if k not in out}
        return out, missing


class CrossEyeAttention(nn.Layer):
    """Tokens of one eye attend to the other eye's tokens: ``LayerNorm(q + MHA(q, kv, kv))``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CrossEyeAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.attn = nn.MultiHeadAttention(dim, num_heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, query: paddle.Tensor, other: paddle.Tensor) -> paddle.Tensor:
        return self.norm(query + self.attn(query, other, other))


class DualEyeModel(nn.Layer, abc.ABC):
    """Shared-backbone dual-eye base: contract plumbing around ``self.backbone`` and ``self.head``."""

    num_views = 2

    def _describe(self, num_classes: int, input_size: int, num_features: int) -> None:
        if num_classes < 1:
            raise UserError(f"{type(self).__name__}: num_classes {num_classes} (expected >= 1); check --nb_classes")
        self.num_outputs = int(num_classes)
        self.num_features = int(num_features)
        self.num_layers = 1 + max(self.backbone.layer_id(n) for n, _ in self.backbone.named_parameters())
        self.default_cfg = dict(self.backbone.default_cfg, input_size=int(input_size))
        self.reset_head(0.02)

    @abc.abstractmethod
    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """[B, 2, 3, H, W] -> [B, num_outputs]."""

    def layer_id(self, name: str) -> int:
        if name.startswith(_PREFIX):
            return int(self.backbone.layer_id(name[len(_PREFIX):]))
        return self.num_layers

    def no_weight_decay(self) -> set[str]:
        return {_PREFIX + n for n in self.backbone.no_weight_decay()}

    def reset_head(self, std: float = 2e-5) -> None:
        """Final classifier weight ~ trunc_normal(std), bias zero (fusion layers keep their weights)."""
        trunc_normal_(self.head.weight, std=std)
        self.head.bias.set_value(np.zeros(self.head.bias.shape, dtype=np.float32))

    def prepare_pretrained(self, sd: dict) -> tuple[dict, set[str]]:
        own = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        if any(k in own and not k.startswith("head.") for k in sd):
            # this model's own layout (a dual-eye checkpoint): the backbone part still goes through the
            # backbone's adaptation (e.g. ViT pos_embed resized to this input size); only a head of another
            # shape is dropped
            rest = {k: v for k, v in sd.items() if not k.startswith(_PREFIX)}
            sub, sub_missing = self.backbone.prepare_pretrained(
                {k[len(_PREFIX):]: v for k, v in sd.items() if k.startswith(_PREFIX)})
            out = {_PREFIX + k: v for k, v in sub.items()}
            out.update({k: v for k, v in rest.items()
                        if not (k.startswith("head.") and k in own and tuple(np.shape(v)) != own[k])})
            missing = {_PREFIX + k for k in sub_missing} | {k for k in own if k.startswith("head.") and k not in out}
            return out, missing
        sub, sub_missing = self.backbone.prepare_pretrained(sd)
        out = {_PREFIX + k: v for k, v in sub.items()}
        missing = {_PREFIX + k for k in sub_missing} | {k for k in own if not k.startswith(_PREFIX)}
        return out, missing


class DualEyeCrossAttention(DualEyeModel):
    """Shared backbone -> per-eye branch -> two-way cross-attention -> pooled, concatenated -> fusion -> head."""

    def __init__(self, backbone: nn.Layer, token_dim: int, num_classes: int, input_size: int, embed_dim: int = 512,
                 num_heads: int = 8, drop_rate: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.proj_left = nn.Sequential(nn.Linear(token_dim, embed_dim), nn.LayerNorm(embed_dim))
        self.proj_right = nn.Sequential(nn.Linear(token_dim, embed_dim), nn.LayerNorm(embed_dim))
        self.cross_left = CrossEyeAttention(embed_dim, num_heads)    # left queries right
        self.cross_right = CrossEyeAttention(embed_dim, num_heads)   # right queries left
        self.fusion = nn.Sequential(nn.Linear(2 * embed_dim, embed_dim), nn.GELU(), nn.Dropout(drop_rate))
        self.head = nn.Linear(embed_dim, num_classes)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self._describe(num_classes, input_size, num_features=embed_dim)

    def forward_eye_tokens(self, x: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """[B, 2, 3, H, W] -> per-eye tokens after the branches and the cross-attention, each [B, N, D]."""
        eyes, b = split_eyes(x, type(self).__name__)
        tokens = self.backbone.forward_patch_tokens(eyes)              # [2B, N, C]
        left, right = tokens.reshape([b, 2] + list(tokens.shape[1:])).unbind(1)
        left, right = self.proj_left(left), self.proj_right(right)
        return self.cross_left(left, right), self.cross_right(right, left)

    def forward_features(self, x: paddle.Tensor) -> paddle.Tensor:
        left, right = self.forward_eye_tokens(x)
        return self.fusion(paddle.concat([left.mean(axis=1), right.mean(axis=1)], axis=-1))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(self.forward_features(x))


class DualEyeConcat(DualEyeModel):
    """Shared backbone -> pooled features of both eyes concatenated [left, right] -> Dropout -> head."""

    def __init__(self, backbone: nn.Layer, num_classes: int, input_size: int, drop_rate: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(2 * backbone.num_features, num_classes)
        self._describe(num_classes, input_size, num_features=2 * backbone.num_features)

    def forward_features(self, x: paddle.Tensor) -> paddle.Tensor:
        eyes, b = split_eyes(x, type(self).__name__)
        return self.backbone.forward_features(eyes).reshape([b, -1])   # [B, 2F]: left then right

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(self.dropout(self.forward_features(x)))


# ----------------------------------------------------------------------------------------------- factories
@register_model
def dual_convnext_small(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                        input_size: int = 384) -> DualEyeCrossAttention:
    """ODIR-5K seed design over a shared ConvNeXt-Small (768-d tokens, 12x12 per eye at 384 px)."""
    backbone = convnext_small(0, drop_path_rate=drop_path_rate, input_size=input_size)   # headless
    return DualEyeCrossAttention(backbone, 768, num_classes, input_size, embed_dim=512, num_heads=8)


@register_model
def dual_resnet50(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                  input_size: int = 448) -> DualEyeConcat:
    """ODIR-5K seed design: shared ResNet-50, both eyes' 2048-d features concatenated -> classifier."""
    backbone = resnet50(0, input_size=input_size)
    return DualEyeConcat(backbone, num_classes, input_size)


@register_model
def dual_retfound(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                  input_size: int = 224) -> DualEyeCrossAttention:
    """The cross-attention design over the RETFound ViT-L/16 patch tokens (196 per eye at 224 px)."""
    vit = ViTPatchTokens(input_size=input_size, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                         drop_path_rate=drop_path_rate)
    return DualEyeCrossAttention(vit, 1024, num_classes, input_size, embed_dim=512, num_heads=8)


@register_model
def dual_convnext_test(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                       input_size: int = 64) -> DualEyeCrossAttention:
    """dual_convnext_small's code path over convnext_test (64-d tokens), D = 32, 8 heads."""
    backbone = convnext_test(0, drop_path_rate=drop_path_rate, input_size=input_size)
    return DualEyeCrossAttention(backbone, 64, num_classes, input_size, embed_dim=32, num_heads=8)


@register_model
def dual_resnet_test(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                     input_size: int = 32) -> DualEyeConcat:
    """dual_resnet50's code path over resnet_test (512-d features per eye)."""
    backbone = resnet_test(0, input_size=input_size)
    return DualEyeConcat(backbone, num_classes, input_size)


@register_model
def dual_retfound_test(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                       input_size: int = 32) -> DualEyeCrossAttention:
    """dual_retfound's code path over vit_test (embed 32, depth 2, heads 2), D = 32, 8 heads."""
    vit = ViTPatchTokens(input_size=input_size, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0,
                         drop_path_rate=drop_path_rate)
    return DualEyeCrossAttention(vit, 32, num_classes, input_size, embed_dim=32, num_heads=8)
