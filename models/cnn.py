"""Shared wrapper that gives a PaddleClas CNN backbone the toolkit's model contract.

A ``PaddleClasCNN`` holds the PaddleClas network as ``self.backbone`` (so a PaddleClas ImageNet ``.pdparams``
maps onto it by adding the ``backbone.`` prefix) and describes itself: ``num_outputs``, ``num_features``,
``num_views``, ``default_cfg``, ``num_layers`` and ``layer_id(name)`` by stage (stem 0, stages 1..S, classifier
and anything after the pooling S + 1 = ``num_layers``), ``no_weight_decay()``, ``reset_head(std)`` and
``prepare_pretrained(sd)``. Layer ids are assigned once at construction from the sub-layers each subclass
names per stage, and every parameter must land in exactly one stage, so a PaddleClas change that adds a
parameter fails loudly instead of silently landing in the head group.

The forward is split so the dual-eye models can reuse the backbone: ``forward_feature_map`` (last feature
map ``[B, C, h, w]``), ``forward_features`` (pooled ``[B, num_features]``, the classifier's input),
``forward_patch_tokens`` (the feature map as tokens ``[B, h*w, C]``) and ``forward_head``.

``num_classes=0`` builds a headless feature extractor (the classifier becomes ``nn.Identity``), as timm does.

References: PaddleClas ``ppcls/arch/backbone`` (the networks are imported, not reimplemented); timm
``layer_decay`` / ``group_matcher`` (stage-wise layer ids for CNNs).
"""
from __future__ import annotations

import abc
import contextlib
import io
import logging
from typing import Iterable, Sequence

import numpy as np
import paddle
from paddle import nn

from models.vit import trunc_normal_
from util.errors import UserError
from util.image_io import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


@contextlib.contextmanager
def _quiet():
    """Silence PaddleClas's import and construction chatter (faiss loading, deprecation notes)."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def default_data_cfg(input_size: int, interpolation: str = "bicubic") -> dict:
    """ImageNet statistics; eval crop 224/256 up to 224 px, no crop above (as the ViT models)."""
    return {"input_size": int(input_size), "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "interpolation": interpolation, "crop_pct": 224 / 256 if input_size <= 224 else 1.0}


def check_drop_path(where: str, rate: float) -> float:
    if not 0.0 <= rate < 1.0:
        raise UserError(f"{where}: drop_path_rate {rate} out of range (expected 0 <= p < 1); pass e.g. --drop_path 0.1")
    return float(rate)


class PaddleClasCNN(nn.Layer, abc.ABC):
    """Base of the CNN classifiers. Subclasses build ``self.backbone`` then call ``_describe``."""

    num_views = 1

    # ------------------------------------------------------------------ set-up (called by subclasses)
    def _describe(self, num_classes: int, input_size: int, head_attr: str, num_features: int,
                  stages: Sequence[Iterable[nn.Layer]], top: Iterable[nn.Layer] = ()) -> None:
        """Record the self-description and the layer table.

        Args:
            num_classes: classifier outputs; 0 replaces the classifier by ``nn.Identity``.
            input_size: the input size the model is meant for (``default_cfg['input_size']``).
            head_attr: attribute of ``self.backbone`` holding the classifier ``nn.Linear``.
            num_features: width of the pooled feature (the classifier's input).
            stages: sub-layers per layer id: ``stages[0]`` the stem, ``stages[s]`` stage s.
            top: sub-layers after the pooling other than the classifier (e.g. ConvNeXt's final norm); they
                share the classifier's id ``num_layers``.
        """
        if num_classes < 0:
            raise UserError(f"{type(self).__name__}: num_classes {num_classes} < 0 (expected >= 1, or 0 for a "
                            f"headless feature extractor); check --nb_classes")
        self._head_attr = head_attr
        if num_classes == 0:
            setattr(self.backbone, head_attr, nn.Identity())
        self.num_outputs = int(num_classes)
        self.num_features = int(num_features)
        self.num_layers = len(stages)
        self.default_cfg = default_data_cfg(input_size)

        by_param: dict[int, int] = {}
        for lid, layers in enumerate(list(stages) + [list(top) + [self.head]]):
            for layer in layers:
                for p in layer.parameters():
                    if id(p) in by_param and by_param[id(p)] != lid:
                        raise RuntimeError(f"{type(self).__name__}: a parameter is in stages {by_param[id(p)]} "
                                           f"and {lid}")
                    by_param[id(p)] = lid
        self._layer_of = {}
        unassigned = []
        for name, p in self.named_parameters():
            if id(p) in by_param:
                self._layer_of[name] = by_param[id(p)]
            else:
                unassigned.append(name)
        if unassigned:   # a PaddleClas version with layers this wrapper does not know
            raise RuntimeError(f"{type(self).__name__}: parameters without a stage: {unassigned[:5]}")

    # ------------------------------------------------------------------ forward
    @property
    def head(self) -> nn.Layer:
        return getattr(self.backbone, self._head_attr)

    @abc.abstractmethod
    def forward_feature_map(self, x: paddle.Tensor) -> paddle.Tensor:
        """Image [B, 3, H, W] -> last feature map [B, C, h, w]."""

    def forward_features(self, x: paddle.Tensor) -> paddle.Tensor:
        """Image -> pooled feature [B, num_features] (the classifier's input)."""
        return self.forward_feature_map(x).mean(axis=[2, 3])

    def forward_patch_tokens(self, x: paddle.Tensor) -> paddle.Tensor:
        """Image -> the last feature map as a token sequence [B, h*w, C] (row-major over the map)."""
        return self.forward_feature_map(x).flatten(2).transpose([0, 2, 1])

    def forward_head(self, features: paddle.Tensor) -> paddle.Tensor:
        return self.head(features)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ contract
    def layer_id(self, name: str) -> int:
        """Stem 0, stage s -> s, classifier (and post-pooling layers) -> num_layers."""
        try:
            return self._layer_of[name]
        except KeyError:
            raise KeyError(f"{type(self).__name__}.layer_id: {name!r} is not a parameter of this model") from None

    def no_weight_decay(self) -> set[str]:
        # biases and norm scales are 1-D and exempt by rule (util/lr_decay.py); a CNN has no other exemptions
        return set()

    def reset_head(self, std: float = 2e-5) -> None:
        """Classifier weight ~ trunc_normal(std) (the ViT's initialiser, timm semantics), bias zero."""
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=std)
            self.head.bias.set_value(np.zeros(self.head.bias.shape, dtype=np.float32))

    def prepare_pretrained(self, state_dict: dict) -> tuple[dict, set[str]]:
        """Adapt a PaddleClas ImageNet state dict (keys without the ``backbone.`` prefix) or one of this
        wrapper's own checkpoints (keys with it).

        A classifier whose shape differs from this model's (an ImageNet 1000-class ``fc``), or any classifier
        when the model is headless, is dropped; the classifier is then expected to be missing. Everything
        else must match (checked by ``models.pretrained``).
        """
        own = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        head_prefix = f"backbone.{self._head_attr}."
        out = {}
        for k, v in state_dict.items():
            if not k.startswith("backbone."):
                k = "backbone." + k
            if k.startswith(head_prefix) and (k not in own or tuple(np.shape(v)) != own[k]):
                continue
            out[k] = v
        missing = {k for k in own if k.startswith(head_prefix) and k not in out}
        return out, missing
