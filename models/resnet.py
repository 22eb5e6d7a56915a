"""ResNet classifiers on PaddleClas backbones, with the model self-description contract.

``resnet18`` is the demo model: RetinaMNIST images are 28 px, and the published MedMNIST baselines are
ResNet-18/50, so a ResNet-18 at a small input size (64 px) is both comparable to the published numbers and
trainable on a 2-core CPU in minutes (a ViT on 28 px photos would be neither). ``resnet50`` (bottleneck blocks)
is the CNN baseline of the seed systems and the backbone of ``dual_resnet50``. ``resnet_test`` and
``resnet50_test`` are one-block-per-stage variants that run the basic-block and bottleneck code paths in tests.

Layer ids: stem (7x7 conv; the max pool has no parameters) 0, residual stage s (1..4) s, ``fc`` 5.
Parameter names are PaddleClas's under ``backbone.``, so PaddleClas ImageNet ``ResNet18/50_pretrained.pdparams``
files load through ``--finetune`` (their 1000-class ``fc`` is dropped). ``drop_path_rate`` and ``global_pool``
do not apply (PaddleClas's ResNet has no stochastic depth; pooling is always global average).

References: PaddleClas ``ppcls/arch/backbone/legendary_models/resnet.py`` (the backbone itself is imported,
not reimplemented); He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
"""
from __future__ import annotations

import paddle

from models.cnn import PaddleClasCNN, _quiet
from models.registry import register_model


class PaddleClasResNet(PaddleClasCNN):
    """A PaddleClas ResNet ("vb" stem) with its ``fc`` as the classification head."""

    def __init__(self, block_depth: list[int], block_type: str, num_channels: list[int], num_classes: int,
                 input_size: int = 224):
        super().__init__()
        config = {"block_type": block_type, "block_depth": block_depth, "num_channels": num_channels}
        with _quiet():
            from paddleclas.ppcls.arch.backbone.legendary_models.resnet import ResNet

            self.backbone = ResNet(config=config, stages_pattern=[], version="vb",
                                   class_num=max(num_classes, 1))
        net = self.backbone
        blocks = list(net.blocks)
        bounds = [sum(block_depth[:s]) for s in range(len(block_depth) + 1)]
        stages = [[net.stem]] + [blocks[bounds[s]:bounds[s + 1]] for s in range(len(block_depth))]
        self._describe(num_classes, input_size, head_attr="fc", num_features=net.avg_pool_channels, stages=stages)

    def forward_feature_map(self, x: paddle.Tensor) -> paddle.Tensor:
        net = self.backbone
        x = net.stem(x)
        if net.max_pool:
            x = net.max_pool(x)
        return net.blocks(x)


@register_model
def resnet18(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True, input_size: int = 224):
    """ResNet-18 (PaddleClas backbone, basic blocks)."""
    return PaddleClasResNet([2, 2, 2, 2], "BasicBlock", [64, 64, 128, 256], num_classes, input_size)


@register_model
def resnet50(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True, input_size: int = 224):
    """ResNet-50 (PaddleClas backbone, bottleneck blocks, 2048 features)."""
    return PaddleClasResNet([3, 4, 6, 3], "BottleneckBlock", [64, 256, 512, 1024], num_classes, input_size)


@register_model
def resnet_test(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True, input_size: int = 32):
    """One basic block per stage: the resnet18 code path, small enough for unit tests."""
    return PaddleClasResNet([1, 1, 1, 1], "BasicBlock", [64, 64, 128, 256], num_classes, input_size)


@register_model
def resnet50_test(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True, input_size: int = 32):
    """One bottleneck block per stage: the resnet50 code path for unit tests (PaddleClas fixes the widths)."""
    return PaddleClasResNet([1, 1, 1, 1], "BottleneckBlock", [64, 256, 512, 1024], num_classes, input_size)
