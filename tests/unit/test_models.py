"""The model contract, checked for every registered model: self-description, layer ids, LR groups;
forward (at two input sizes), backward and layer-id order for the tiny variants; family specifics
(EfficientNet SAME padding, stochastic depth wiring, default input sizes).

Full-size models are only constructed (no forward) and carry the ``slow`` marker (still run by default).
"""
from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from models import create_model, default_input_size, list_models, resolve_model_name
from util.errors import UserError

ALL = list_models()
TINY = [n for n in ALL if n.endswith("_test")]


def _param(name):
    return name if name.endswith("_test") else pytest.param(name, marks=pytest.mark.slow)


@pytest.fixture(scope="module", params=[_param(n) for n in ALL])
def model(request):
    name = request.param
    return name, create_model(name, num_classes=7, drop_path_rate=0.1)


def batch(m, size: int, n: int = 2) -> paddle.Tensor:
    shape = [n, 3, size, size] if m.num_views == 1 else [n, 2, 3, size, size]
    return paddle.randn(shape)


def test_registry_has_the_required_models():
    required = ["retfound_mae", "vit_base_patch16", "vit_small_patch16", "vit_test", "resnet18", "resnet50",
                "resnet_test", "resnet50_test", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
                "efficientnet_b3", "efficientnet_b4", "efficientnet_v2_m", "efficientnet_test",
                "efficientnet_v2_test", "convnext_tiny", "convnext_small", "convnext_test", "dual_convnext_small",
                "dual_resnet50", "dual_retfound", "dual_convnext_test", "dual_resnet_test", "dual_retfound_test"]
    assert not [n for n in required if n not in ALL]
    assert resolve_model_name("RETFound_mae") == "retfound_mae"


def test_default_input_sizes_are_the_seed_resolutions():
    expected = {"efficientnet_b0": 224, "efficientnet_b1": 240, "efficientnet_b2": 260, "efficientnet_b3": 300,
                "efficientnet_b4": 380, "efficientnet_v2_m": 380, "convnext_small": 224, "resnet50": 224,
                "dual_convnext_small": 384, "dual_resnet50": 448, "dual_retfound": 224, "retfound_mae": 224}
    assert {n: default_input_size(n) for n in expected} == expected
    m = create_model("efficientnet_test", num_classes=3)           # input_size omitted -> the factory default
    assert m.default_cfg["input_size"] == default_input_size("efficientnet_test") == 32
    assert create_model("efficientnet_test", num_classes=3, input_size=48).default_cfg["input_size"] == 48


def test_unknown_model_suggests_close_names():
    with pytest.raises(UserError) as e:
        resolve_model_name("retfound_mea")
    assert "retfound_mae" in str(e.value) and "vit_test" in str(e.value)
    with pytest.raises(UserError, match="efficientnet_b4"):
        create_model("efficientnet-b4", num_classes=2)


def test_contract(model):
    name, m = model
    assert m.num_outputs == 7 and m.num_features > 0
    assert m.num_views == (2 if name.startswith("dual_") else 1)
    cfg = m.default_cfg
    assert {"input_size", "mean", "std", "interpolation", "crop_pct"} <= set(cfg)
    assert len(cfg["mean"]) == 3 and len(cfg["std"]) == 3
    assert cfg["input_size"] == default_input_size(name)
    names = [n for n, _ in m.named_parameters()]
    ids = [m.layer_id(n) for n in names]
    # every id from 0 (stem / embeddings) to num_layers (head) is used: no empty LR-decay layer
    assert sorted(set(ids)) == list(range(m.num_layers + 1)), f"{name}: layer ids {sorted(set(ids))}"
    head = {id(m.head.weight), id(m.head.bias)}
    head_ids = {m.layer_id(n) for n, p in m.named_parameters() if id(p) in head}
    assert m.head.weight.shape[-1] == 7
    assert head_ids == {m.num_layers}, f"{name}: head parameters must get the last layer id"
    assert set(m.no_weight_decay()) <= set(names)
    if m.num_views == 2:   # backbone -> the backbone's own ids (< num_layers); fusion and head -> num_layers
        for n in names:
            if n.startswith("backbone."):
                assert m.layer_id(n) == m.backbone.layer_id(n[len("backbone."):]) < m.num_layers, n
            else:
                assert m.layer_id(n) == m.num_layers, n


def test_lr_groups_cover_every_trainable_parameter_once(model):
    from util.lr_decay import param_groups_lrd

    _, m = model
    groups = param_groups_lrd(m, weight_decay=0.05, layer_decay=0.75)
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in m.parameters() if not p.stop_gradient]
    assert len(seen) == len(set(seen)) and set(seen) == set(trainable)
    scales = sorted({g["learning_rate"] for g in groups})
    assert scales[-1] == pytest.approx(1.0) and scales[0] == pytest.approx(0.75 ** m.num_layers)


@pytest.mark.parametrize("name", TINY)
def test_forward_backward_and_head_reset(name):
    paddle.seed(0)
    for size in (32, 64):
        m = create_model(name, num_classes=4, drop_path_rate=0.1, input_size=size)
        m.train()
        y = m(batch(m, size))
        assert y.shape == [2, 4], f"{name} at {size} px"
    y.sum().backward()
    missing = [n for n, p in m.named_parameters() if not p.stop_gradient and p.grad is None]
    assert not missing, missing
    m.reset_head(std=2e-5)
    w = m.head.weight.numpy()
    assert 1e-5 < w.std() < 4e-5 and np.all(m.head.bias.numpy() == 0)


@pytest.mark.parametrize("name", TINY)
def test_layer_ids_do_not_decrease_along_the_forward_pass(name):
    """Stages are numbered in the order the data meets them (stem 0 ... head num_layers)."""
    m = create_model(name, num_classes=3)
    layer_of = {id(p): m.layer_id(n) for n, p in m.named_parameters()}
    order, hooks = [], []
    for layer in m.sublayers():
        own = [p for p in layer.parameters(include_sublayers=False)]
        if own:
            ids = {layer_of[id(p)] for p in own}
            assert len(ids) == 1, f"{name}: one layer's parameters span layer ids {ids}"
            # pre-hooks: a container owning parameters (the ViT's cls token) counts where it is entered
            hooks.append(layer.register_forward_pre_hook(lambda _l, _i, lid=ids.pop(): order.append(lid)))  # noqa: B008
    m.eval()
    with paddle.no_grad():
        m(batch(m, m.default_cfg["input_size"], n=1))
    for h in hooks:
        h.remove()
    assert order and order == sorted(order), f"{name}: layer ids in forward order {order}"
    assert order[0] == 0 and order[-1] == m.num_layers


# ------------------------------------------------------------------------------------ CNN family specifics
def _tf_same_conv(x, conv):
    """Reference TensorFlow SAME convolution: pad (total // 2 before, the rest after), then a VALID conv."""
    k, s = conv.weight.shape[-1], conv._stride[0]
    pads = []
    for n in x.shape[2:]:
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    xp = F.pad(x, [pads[1][0], pads[1][1], pads[0][0], pads[0][1]])      # [left, right, top, bottom]
    return F.conv2d(xp, conv.weight, stride=s, groups=conv._groups)


@pytest.mark.parametrize("name", ["efficientnet_test", "efficientnet_v2_test"])
def test_efficientnet_stride2_convs_use_tf_same_padding_at_any_size(name):
    m = create_model(name, num_classes=3)
    convs = [layer._conv for layer in m.backbone.sublayers() if hasattr(layer, "need_crop")]
    strided = [c for c in convs if c._stride[0] == 2]
    assert len(strided) >= 3     # the stem and the first block of each downsampling stage
    paddle.seed(1)
    for size in (37, 38, 40):    # odd / even inputs: symmetric and asymmetric SAME padding
        for conv in strided:
            x = paddle.randn([1, conv._in_channels, size, size])
            out = conv(x)
            assert out.shape[2:] == [math.ceil(size / 2)] * 2
            np.testing.assert_allclose(out.numpy(), _tf_same_conv(x, conv).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,size,expected", [("efficientnet_test", 40, 2), ("efficientnet_test", 100, 4),
                                                ("efficientnet_v2_test", 40, 3), ("convnext_test", 64, 2),
                                                ("resnet50_test", 40, 2)])
def test_feature_map_size_at_other_input_sizes(name, size, expected):
    m = create_model(name, num_classes=3)
    m.eval()
    with paddle.no_grad():
        fmap = m.forward_feature_map(paddle.randn([1, 3, size, size]))
    assert fmap.shape == [1, m.num_features, expected, expected]


def test_two_efficientnets_coexist_with_distinct_parameter_names():
    a = create_model("efficientnet_test", num_classes=3)
    b = create_model("efficientnet_test", num_classes=3)
    na = [p.name for p in a.parameters()]
    nb = [p.name for p in b.parameters()]
    assert len(set(na)) == len(na) and not set(na) & set(nb)


def test_drop_path_reaches_the_backbones():
    m = create_model("convnext_test", num_classes=3, drop_path_rate=0.2)
    rates = [blk.drop_path.drop_prob for stage in m.backbone.stages for blk in stage
             if hasattr(blk.drop_path, "drop_prob")]
    assert rates[-1] == pytest.approx(0.2) and rates == sorted(rates)
    e = create_model("efficientnet_test", num_classes=3, drop_path_rate=0.2)
    dc = [b.drop_connect_rate for b in e.backbone._ef.conv_seq]
    assert 0 < max(dc) < 0.2 and dc == sorted(dc)
    assert create_model("efficientnet_v2_test", 3, drop_path_rate=0.2).backbone.mconfig.survival_prob == \
        pytest.approx(0.8)
    assert create_model("efficientnet_v2_test", 3).backbone.mconfig.survival_prob is None
    assert max(b.drop_connect_rate for b in create_model("efficientnet_test", 3).backbone._ef.conv_seq) == 0
    with pytest.raises(UserError, match="drop_path_rate"):
        create_model("convnext_test", num_classes=3, drop_path_rate=1.5)
    # stochastic in train mode only (ConvNeXt has no BatchNorm/dropout, so any difference is drop path)
    m = create_model("convnext_test", num_classes=3, drop_path_rate=0.5)
    x = paddle.randn([4, 3, 32, 32])
    m.train()
    # not allclose: LayerScale starts at 1e-6, so a dropped branch moves the logits by about 1e-7 only
    assert not np.array_equal(m(x).numpy(), m(x).numpy())
    m.eval()
    np.testing.assert_array_equal(m(x).numpy(), m(x).numpy())


def test_headless_cnn_gives_pooled_features():
    m = create_model("convnext_test", num_classes=0)
    assert m.num_outputs == 0 and m.head.__class__.__name__ == "Identity"
    m.eval()
    x = paddle.randn([2, 3, 32, 32])
    assert m(x).shape == [2, m.num_features]
    np.testing.assert_allclose(m(x).numpy(), m.forward_features(x).numpy())
    with pytest.raises(UserError, match="num_classes"):
        create_model("resnet_test", num_classes=-1)
