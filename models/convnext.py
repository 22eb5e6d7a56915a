"""ConvNeXt-Tiny / -Small classifiers on the PaddleClas backbone, with the model contract.

ConvNeXt-Small is the backbone of the seed's ODIR-5K dual-eye model (``dual_convnext_small``); the
single-image variants are baselines. ``drop_path_rate`` is ConvNeXt's stochastic depth (linear from 0 to the
rate over all blocks); ``global_pool`` does not apply (ConvNeXt always averages the last map, then LayerNorm).

Layer ids: stem (4x4 patchify conv + LayerNorm) 0; stage s (1..4) = the downsampling layer in front of it (for
s >= 2) and its blocks; the final LayerNorm and the classifier ``head`` num_layers (5), as in the official
ConvNeXt layer-decay recipe. Parameter names are PaddleClas's under ``backbone.``, so PaddleClas ImageNet
``ConvNeXt_tiny/small_pretrained.pdparams`` load through ``--finetune`` (their 1000-class head is dropped).

References: PaddleClas ``ppcls/arch/backbone/model_zoo/convnext.py`` (imported, not reimplemented); Liu et al.,
"A ConvNet for the 2020s", CVPR 2022, and facebookresearch/ConvNeXt ``optim_factory.py`` (layer ids).
"""
from __future__ import annotations

import functools

import paddle

from models.cnn import PaddleClasCNN, _quiet, check_drop_path
from models.cpu_kernels import channels_first_layer_norm
from models.cpu_kernels import use_in as use_cpu_kernels
from models.registry import register_model


@functools.lru_cache(maxsize=None)
def _fast_channels_first_norm() -> type:
    """PaddleClas's ``ChannelsFirstLayerNorm`` (mean, pow, divide ops) on the compiled CPU kernel
    (``models/cpu_kernels.py``) where it applies; its own forward elsewhere."""
    from paddleclas.ppcls.arch.backbone.model_zoo.convnext import ChannelsFirstLayerNorm

    class FastChannelsFirstLayerNorm(ChannelsFirstLayerNorm):
        def forward(self, x):
            out = channels_first_layer_norm(x, self.weight, self.bias, self.epsilon)
            return super().forward(x) if out is None else out

    return FastChannelsFirstLayerNorm


class PaddleClasConvNeXt(PaddleClasCNN):
    """A PaddleClas ConvNeXt with its ``head`` as the classifier."""

    def __init__(self, depths: list[int], dims: list[int], num_classes: int, input_size: int,
                 drop_path_rate: float = 0.0):
        super().__init__()
        drop_path_rate = check_drop_path("convnext", drop_path_rate)
        with _quiet():
            from paddleclas.ppcls.arch.backbone.model_zoo.convnext import ConvNeXt

            self.backbone = ConvNeXt(depths=depths, dims=dims, drop_path_rate=drop_path_rate,
                                     class_num=max(num_classes, 1))
        # the blocks' depthwise convolution, LayerNorm, pointwise Linears and GELU on the compiled CPU kernels
        use_cpu_kernels(self.backbone)
        fast = _fast_channels_first_norm()
        for layer in self.backbone.sublayers():
            if type(layer) is fast.__base__:
                layer.__class__ = fast   # same parameters; the stem's and downsampling layers' LayerNorm
        net = self.backbone
        self.drop_path_rate = drop_path_rate
        stages = [[net.downsample_layers[0]], [net.stages[0]]]
        stages += [[net.downsample_layers[s], net.stages[s]] for s in range(1, len(depths))]
        self._describe(num_classes, input_size, head_attr="head", num_features=dims[-1], stages=stages,
                       top=[net.norm])

    def forward_feature_map(self, x: paddle.Tensor) -> paddle.Tensor:
        net = self.backbone
        for down, stage in zip(net.downsample_layers, net.stages):
            x = stage(down(x))
        return x

    def forward_features(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.backbone.norm(self.forward_feature_map(x).mean(axis=[2, 3]))

    def forward_patch_tokens(self, x: paddle.Tensor) -> paddle.Tensor:
        """Tokens [B, h*w, C] through the final LayerNorm (per token; it normalises channels only)."""
        return self.backbone.norm(super().forward_patch_tokens(x))


@register_model
def convnext_tiny(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True, input_size: int = 224):
    """ConvNeXt-Tiny (depths 3-3-9-3, dims 96-768)."""
    return PaddleClasConvNeXt([3, 3, 9, 3], [96, 192, 384, 768], num_classes, input_size, drop_path_rate)


@register_model
def convnext_small(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True, input_size: int = 224):
    """ConvNeXt-Small (depths 3-3-27-3, dims 96-768)."""
    return PaddleClasConvNeXt([3, 3, 27, 3], [96, 192, 384, 768], num_classes, input_size, drop_path_rate)


@register_model
def convnext_test(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True, input_size: int = 32):
    """Tiny ConvNeXt for tests (depths 1-1-2-1, dims 16-64): the convnext_small code path."""
    return PaddleClasConvNeXt([1, 1, 2, 1], [16, 32, 48, 64], num_classes, input_size, drop_path_rate)
