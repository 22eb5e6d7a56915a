"""ResNet classifiers on PaddleClas backbones, with the model self-description contract.

``resnet18`` is the demo model: RetinaMNIST images are 28 px, and the published MedMNIST baselines are
ResNet-18/50, so a ResNet-18 at a small input size (64 px) is both comparable to the published numbers and
trainable on a 2-core CPU in minutes (a ViT on 28 px photos would be neither). ``resnet_test`` is a one-block-
per-stage variant that runs the same code path in tests.

References: PaddleClas ``ppcls/arch/backbone/legendary_models/resnet.py`` (the backbone itself is imported,
not reimplemented); He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
"""
from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import paddle
from paddle import nn

from models.registry import register_model
from models.vit import trunc_normal_

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@contextlib.contextmanager
def _quiet():
    """Silence PaddleClas's import and construction chatter (faiss loading, deprecation notes)."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


class PaddleClasResNet(nn.Layer):
    """A PaddleClas ResNet with its ``fc`` as the classification head.

    Layer ids for layer-wise LR decay: stem -> 0, residual stage s (1..4) -> s, head (``fc``) -> 5.
    """

    num_views = 1

    def __init__(self, block_depth: list[int], block_type: str, num_channels: list[int], num_classes: int,
                 img_size: int = 224):
        super().__init__()
        config = {"block_type": block_type, "block_depth": block_depth, "num_channels": num_channels}
        with _quiet():
            from paddleclas.ppcls.arch.backbone.legendary_models.resnet import ResNet

            self.backbone = ResNet(config=config, stages_pattern=[], version="vb", class_num=num_classes)
        self.num_outputs = num_classes
        self.num_features = self.backbone.avg_pool_channels
        self.num_layers = len(block_depth) + 1
        # block index -> stage number (1-based)
        self._block_stage = [s + 1 for s, d in enumerate(block_depth) for _ in range(d)]
        crop_pct = 224 / 256 if img_size <= 224 else 1.0
        self.default_cfg = {"input_size": img_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                            "interpolation": "bicubic", "crop_pct": crop_pct}

    @property
    def head(self) -> nn.Linear:
        return self.backbone.fc

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.backbone(x)

    def layer_id(self, name: str) -> int:
        parts = name.split(".")
        if parts[1] == "stem":
            return 0
        if parts[1] == "blocks":
            return self._block_stage[int(parts[2])]
        return self.num_layers

    def no_weight_decay(self) -> set[str]:
        return set()

    def reset_head(self, std: float = 2e-5) -> None:
        """Head weight ~ trunc_normal(std) (the ViT's initialiser, timm semantics), bias zero."""
        trunc_normal_(self.head.weight, std=std)
        self.head.bias.set_value(np.zeros(self.head.bias.shape, dtype=np.float32))

    def prepare_pretrained(self, state_dict: dict) -> tuple[dict, set[str]]:
        """Drop a head whose shape differs (an ImageNet ``fc``); nothing else is expected to be missing."""
        own = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        out, missing = {}, set()
        for k, v in state_dict.items():
            if not k.startswith("backbone."):
                k = "backbone." + k  # PaddleClas .pdparams files have no wrapper prefix
            if k.startswith("backbone.fc.") and k in own and tuple(v.shape) != own[k]:
                missing.add(k)
                continue
            out[k] = v
        return out, missing


@register_model
def resnet18(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True, img_size: int = 224):
    """ResNet-18 (PaddleClas backbone). ``drop_path_rate`` and ``global_pool`` do not apply."""
    return PaddleClasResNet([2, 2, 2, 2], "BasicBlock", [64, 64, 128, 256], num_classes, img_size)


@register_model
def resnet_test(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True, img_size: int = 32):
    """One basic block per stage: the resnet18 code path, small enough for unit tests."""
    return PaddleClasResNet([1, 1, 1, 1], "BasicBlock", [64, 64, 128, 256], num_classes, img_size)
