"""EfficientNet-B0..B4 and EfficientNetV2-M classifiers on PaddleClas backbones, with the model contract.

The seed systems train EfficientNet-B4 at 380 px (multi-label fundus, external-eye photos) and
EfficientNetV2-M at 380 px (DR grading as regression). Three things are changed on the PaddleClas networks
after construction, none of them touching their parameter names (so PaddleClas ImageNet ``.pdparams`` files
still load by adding the ``backbone.`` prefix) or their numbers:

* **Padding.** PaddleClas computes TensorFlow "SAME" padding once, from a per-model table of the input size
  of every stage at the ImageNet resolution (B4: 380, V2: 384), and emulates the asymmetric case by padding
  more and cropping. At any input size whose stage sizes differ in parity from that table the windows shift
  by a pixel (V2-M at the seed's 380 px already does). Every such convolution here uses Paddle's own
  ``padding='SAME'``, which computes TensorFlow SAME padding from the actual input at every call; at the
  table's sizes the output is identical to PaddleClas's (tested).
* **Parameter names.** PaddleClas's B-series gives its parameters fixed global names (``_conv_stem_weights``),
  which Paddle allows only once per process; the network is built in a fresh name scope and its parameters
  are then renamed to process-unique names, so several models (tests, dual-eye models) can coexist.
* **Batch norm notice.** ``paddle.nn.BatchNorm2D`` warns "When training, we now always track global mean
  and variance." on every training call, whatever its settings (a fixed notice on how it keeps its running
  statistics, from ``_BatchNormBase.forward`` in Paddle's ``nn/layer/norm.py``, not about the model).
  PaddleClas's V2 uses ``BatchNorm2D`` throughout (the B-series, like ResNet, uses the older ``nn.BatchNorm``,
  which does not warn), so a V2 run printed it; its batch norms become ``_QuietBatchNorm2D``, which makes the
  same checks and the same ``F.batch_norm`` call without the notice.

``drop_path_rate`` is PaddleClas's per-block stochastic depth (B-series ``drop_connect_rate``, V2
``1 - survival_prob``), growing linearly from 0 at the first block; 0 (the default) disables it. The
dropout before the classifier is PaddleClas's default for each variant (B0/B1 0.2, B2/B3 0.3, B4 0.4,
V2-M 0.3). ``global_pool`` does not apply (always global average pooling).

Layer ids: stem 0, block stage s (1..7) s, the final 1x1 conv ("conv head") with the last stage, the
classifier ``_fc`` num_layers (8).

References: PaddleClas ``ppcls/arch/backbone/model_zoo/efficientnet.py`` and ``efficientnet_v2.py`` (the
networks are imported, not reimplemented); Tan & Le, "EfficientNet", ICML 2019 and "EfficientNetV2", ICML 2021;
TensorFlow's SAME padding (``tf.nn.conv2d``).
"""
from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddle import nn
from paddle.utils import unique_name

from models.cnn import PaddleClasCNN, _quiet, check_drop_path
from models.cpu_kernels import use_in as use_cpu_kernels
from models.registry import register_model

# efficientnet_test: the B0 layout at width x0.25 and depth x0.5 (1-2 blocks per stage, repeated blocks
# with residuals and drop connect in stages 4-6).
_TEST_WIDTH, _TEST_DEPTH = 0.25, 0.5
# efficientnet_v2_test: fused and depthwise (SE) MBConv stages, each with a repeated (residual) block.
_V2_TEST_BLOCKS = ["r1_k3_s1_e1_i16_o16_c1", "r2_k3_s2_e4_i16_o24_c1", "r2_k3_s2_e4_i24_o32_se0.25",
                   "r1_k3_s2_e6_i32_o48_se0.25"]
_V2_TEST_FEATURES = 64


def use_dynamic_same_padding(net: nn.Layer, conv_cls: type) -> int:
    """Give every PaddleClas ``Conv2ds`` (``conv_cls``) in ``net`` TensorFlow SAME padding computed from the
    actual input at each call, in place of the static, table-derived padding + crop. The convolution's
    parameters are moved over unchanged. Returns how many convolutions were changed."""
    n = 0
    for layer in net.sublayers():
        if not isinstance(layer, conv_cls):
            continue
        old = layer._conv
        new = nn.Conv2D(old._in_channels, old._out_channels, old._kernel_size, stride=old._stride,
                        padding="SAME", dilation=old._dilation, groups=old._groups,
                        bias_attr=False if old.bias is None else None)
        new.weight = old.weight
        if old.bias is not None:
            new.bias = old.bias
        layer._conv = new
        layer.need_crop = False
        n += 1
    return n


class _QuietBatchNorm2D(nn.BatchNorm2D):
    """``nn.BatchNorm2D`` without the notice its forward prints in training (see the module docstring): the
    same input checks and the same functional call, so outputs, gradients and running statistics are
    identical."""

    def forward(self, input: paddle.Tensor) -> paddle.Tensor:
        self._check_data_format(self._data_format)
        self._check_input_dim(input)
        return F.batch_norm(input, self._mean, self._variance, weight=self.weight, bias=self.bias,
                            training=self.training, momentum=self._momentum, epsilon=self._epsilon,
                            data_format=self._data_format, use_global_stats=self._use_global_stats)


def quiet_batch_norms(net: nn.Layer) -> int:
    """Turn every ``nn.BatchNorm2D`` of ``net`` into a ``_QuietBatchNorm2D`` in place (parameters, buffers and
    settings kept). Returns how many were changed."""
    n = 0
    for layer in net.sublayers():
        if type(layer) is nn.BatchNorm2D:
            layer.__class__ = _QuietBatchNorm2D
            n += 1
    return n


def _split(blocks: list, repeats: list[int], where: str) -> list[list]:
    if sum(repeats) != len(blocks):
        raise RuntimeError(f"{where}: {len(blocks)} blocks but the stage repeats add up to {sum(repeats)}")
    bounds = [sum(repeats[:s]) for s in range(len(repeats) + 1)]
    return [blocks[bounds[s]:bounds[s + 1]] for s in range(len(repeats))]


class PaddleClasEfficientNet(PaddleClasCNN):
    """EfficientNet-B``variant`` (PaddleClas ``EfficientNet``, SE blocks, SAME padding)."""

    def __init__(self, variant: str, num_classes: int, input_size: int, drop_path_rate: float = 0.0,
                 width: float | None = None, depth: float | None = None):
        super().__init__()
        drop_path_rate = check_drop_path(f"efficientnet_{variant}", drop_path_rate)
        with _quiet():
            from paddleclas.ppcls.arch.backbone.model_zoo import efficientnet as E
        override = {"drop_connect_rate": drop_path_rate}
        if width is not None:
            override.update(width_coefficient=width, depth_coefficient=depth)
        block_args, global_params = E.get_model_params(f"efficientnet-{variant}", override)
        with unique_name.guard():   # PaddleClas names its parameters explicitly; see the module docstring
            net = E.EfficientNet(block_args, global_params, name=variant, padding_type="SAME", use_se=True,
                                 class_num=max(num_classes, 1))
        for p in net.parameters():
            p.name = unique_name.generate(p.name)
        use_dynamic_same_padding(net, E.Conv2ds)
        use_cpu_kernels(net)   # stride-1 depthwise convolutions on the compiled CPU kernel (same parameters)
        self.backbone = net
        self.drop_path_rate = drop_path_rate

        repeats = [E.round_repeats(b.num_repeat, global_params) for b in block_args]
        stages = [[net._ef._conv_stem]] + _split(list(net._ef.conv_seq), repeats, type(self).__name__)
        stages[-1] = stages[-1] + [net._conv]     # the 1x1 conv head belongs to the backbone's last stage
        self._describe(num_classes, input_size, head_attr="_fc", num_features=net._fc.weight.shape[0],
                       stages=stages)

    def forward_feature_map(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.backbone._conv(self.backbone._ef(x))

    def forward_head(self, features: paddle.Tensor) -> paddle.Tensor:
        if self.backbone._global_params.dropout_rate:
            features = self.backbone._drop(features)
        return self.head(features)


class PaddleClasEfficientNetV2(PaddleClasCNN):
    """EfficientNetV2 (PaddleClas ``EfficientNetV2``: fused-MBConv early stages, SE MBConv later ones)."""

    def __init__(self, model_name: str, num_classes: int, input_size: int, drop_path_rate: float = 0.0,
                 blocks: list[str] | None = None, feature_size: int | None = None):
        super().__init__()
        drop_path_rate = check_drop_path(model_name, drop_path_rate)
        with _quiet():
            from paddleclas.ppcls.arch.backbone.model_zoo import efficientnet_v2 as V2
        cfg = V2.efficientnetv2_config(model_name).model
        if blocks is not None:
            cfg.blocks_args = V2.BlockDecoder().decode(blocks)
        if feature_size is not None:
            cfg.feature_size = feature_size
        # PaddleClas drops each block with probability (1 - survival_prob) * index / num_blocks
        cfg.survival_prob = 1.0 - drop_path_rate if drop_path_rate > 0 else None
        net = V2.EfficientNetV2(model_name, cfg.blocks_args, cfg, include_top=True, class_num=max(num_classes, 1),
                                padding_type="SAME")
        use_dynamic_same_padding(net, V2.Conv2ds)
        use_cpu_kernels(net)   # stride-1 depthwise convolutions on the compiled CPU kernel (same parameters)
        quiet_batch_norms(net)
        self.backbone = net
        self.drop_path_rate = drop_path_rate

        repeats = [b.num_repeat for b in net.blocks_args]   # already scaled by the constructor
        stages = [[net._stem]] + _split(list(net._blocks), repeats, type(self).__name__)
        stages[-1] = stages[-1] + [net._head]      # 1x1 conv head + BN (the dropout has no parameters)
        self._describe(num_classes, input_size, head_attr="_fc", num_features=net._fc.weight.shape[0],
                       stages=stages)

    def forward_feature_map(self, x: paddle.Tensor) -> paddle.Tensor:
        net = self.backbone
        x = net._stem(x)
        survival = net.mconfig.survival_prob
        for idx, block in enumerate(net._blocks):
            p = 1.0 - (1.0 - survival) * idx / len(net._blocks) if survival else None
            x = block(x, survival_prob=p)
        head = net._head
        return head._act(head._norm(head._conv_head(x)))

    def forward_head(self, features: paddle.Tensor) -> paddle.Tensor:
        if self.backbone._head._dropout is not None:
            features = self.backbone._head._dropout(features)
        return self.head(features)


# ----------------------------------------------------------------------------------------------- factories
@register_model
def efficientnet_b0(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True, input_size: int = 224):
    """EfficientNet-B0 (1280 features)."""
    return PaddleClasEfficientNet("b0", num_classes, input_size, drop_path_rate)


@register_model
def efficientnet_b1(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True, input_size: int = 240):
    """EfficientNet-B1 (1280 features)."""
    return PaddleClasEfficientNet("b1", num_classes, input_size, drop_path_rate)


@register_model
def efficientnet_b2(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True, input_size: int = 260):
    """EfficientNet-B2 (1408 features)."""
    return PaddleClasEfficientNet("b2", num_classes, input_size, drop_path_rate)


@register_model
def efficientnet_b3(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True, input_size: int = 300):
    """EfficientNet-B3 (1536 features)."""
    return PaddleClasEfficientNet("b3", num_classes, input_size, drop_path_rate)


@register_model
def efficientnet_b4(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True, input_size: int = 380):
    """EfficientNet-B4 (1792 features), the seed systems' multi-label and external-eye model at 380 px."""
    return PaddleClasEfficientNet("b4", num_classes, input_size, drop_path_rate)


@register_model
def efficientnet_v2_m(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                      input_size: int = 380):
    """EfficientNetV2-M (1280 features), the seed's DR-grading model at 380 px."""
    return PaddleClasEfficientNetV2("efficientnetv2-m", num_classes, input_size, drop_path_rate)


@register_model
def efficientnet_test(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True, input_size: int = 32):
    """The efficientnet_b0 code path at width x0.25 / depth x0.5 (320 features) for unit tests."""
    return PaddleClasEfficientNet("b0", num_classes, input_size, drop_path_rate, width=_TEST_WIDTH, depth=_TEST_DEPTH)


@register_model
def efficientnet_v2_test(num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                         input_size: int = 32):
    """The efficientnet_v2_m code path with four small stages (64 features) for unit tests."""
    return PaddleClasEfficientNetV2("efficientnetv2-m", num_classes, input_size, drop_path_rate,
                                    blocks=_V2_TEST_BLOCKS, feature_size=_V2_TEST_FEATURES)
