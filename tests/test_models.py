"""The model contract, checked for every registered model: self-description, layer ids, LR groups;
forward and backward for the tiny variants."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from models import create_model, list_models, resolve_model_name
from util.errors import UserError

ALL = list_models()
TINY = [n for n in ALL if n.endswith("_test")]


@pytest.fixture(scope="module", params=ALL)
def model(request):
    name = request.param
    size = 32 if name.endswith("_test") else 224
    return name, create_model(name, num_classes=7, drop_path_rate=0.1, img_size=size)


def test_registry_has_the_required_models():
    for name in ["retfound_mae", "vit_base_patch16", "vit_small_patch16", "vit_test", "resnet18", "resnet_test"]:
        assert name in ALL
    assert resolve_model_name("RETFound_mae") == "retfound_mae"


def test_unknown_model_suggests_close_names():
    with pytest.raises(UserError) as e:
        resolve_model_name("retfound_mea")
    assert "retfound_mae" in str(e.value) and "vit_test" in str(e.value)


def test_contract(model):
    name, m = model
    assert m.num_outputs == 7 and m.num_views == 1 and m.num_features > 0
    cfg = m.default_cfg
    assert {"input_size", "mean", "std", "interpolation", "crop_pct"} <= set(cfg)
    assert len(cfg["mean"]) == 3 and len(cfg["std"]) == 3
    names = [n for n, _ in m.named_parameters()]
    ids = [m.layer_id(n) for n in names]
    assert min(ids) == 0 and max(ids) == m.num_layers
    assert all(0 <= i <= m.num_layers for i in ids)
    head = {id(m.head.weight), id(m.head.bias)}
    head_ids = {m.layer_id(n) for n, p in m.named_parameters() if id(p) in head}
    assert len(head_ids) == 1 and m.head.weight.shape[-1] == 7
    assert head_ids == {m.num_layers}, f"{name}: head parameters must get the last layer id"
    assert set(m.no_weight_decay()) <= set(names)


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
    m = create_model(name, num_classes=4, drop_path_rate=0.1, img_size=32)
    x = paddle.randn([2, 3, 32, 32])
    m.train()
    y = m(x)
    assert y.shape == [2, 4]
    y.sum().backward()
    missing = [n for n, p in m.named_parameters() if not p.stop_gradient and p.grad is None]
    assert not missing, missing
    m.reset_head(std=2e-5)
    w = m.head.weight.numpy()
    assert 1e-5 < w.std() < 4e-5 and np.all(m.head.bias.numpy() == 0)
