"""--finetune for the CNN and dual-eye models: PaddleClas ImageNet .pdparams files (a PaddleClas-built network's
state dict with its 1000-class head, keys without our ``backbone.`` prefix) and single-backbone weights into
dual-eye models, through ``models.pretrained.load_pretrained`` with its strict key check.

The PaddleClas networks are built here directly from PaddleClas with the configurations our factories
document, so a wrapper that renamed, dropped or re-created a parameter would not load.
"""
from __future__ import annotations

import numpy as np
import paddle
import pytest
from paddle.utils import unique_name

from models import create_model
from models.cnn import _quiet
from models.pretrained import load_pretrained
from models.vit import VisionTransformer
from util.errors import UserError

with _quiet():
    from paddleclas.ppcls.arch.backbone.legendary_models.resnet import ResNet
    from paddleclas.ppcls.arch.backbone.model_zoo import efficientnet as E
    from paddleclas.ppcls.arch.backbone.model_zoo import efficientnet_v2 as V2
    from paddleclas.ppcls.arch.backbone.model_zoo.convnext import ConvNeXt


def pc_resnet(block_type, channels):
    return ResNet(config={"block_type": block_type, "block_depth": [1, 1, 1, 1], "num_channels": channels},
                  stages_pattern=[], class_num=1000)


def pc_efficientnet_test():
    args, params = E.get_model_params("efficientnet-b0", {"width_coefficient": 0.25, "depth_coefficient": 0.5})
    with unique_name.guard():
        return E.EfficientNet(args, params, name="b0", class_num=1000)


def pc_efficientnet_b0():
    with unique_name.guard():
        return E.EfficientNetB0(class_num=1000)


def pc_efficientnet_v2_test():
    cfg = V2.efficientnetv2_config("efficientnetv2-m").model
    cfg.blocks_args = V2.BlockDecoder().decode(["r1_k3_s1_e1_i16_o16_c1", "r2_k3_s2_e4_i16_o24_c1",
                                                "r2_k3_s2_e4_i24_o32_se0.25", "r1_k3_s2_e6_i32_o48_se0.25"])
    cfg.feature_size = 64
    return V2.EfficientNetV2("efficientnetv2-m", cfg.blocks_args, cfg, class_num=1000)


PADDLECLAS = {
    "resnet_test": lambda: pc_resnet("BasicBlock", [64, 64, 128, 256]),
    "resnet50_test": lambda: pc_resnet("BottleneckBlock", [64, 256, 512, 1024]),
    "efficientnet_test": pc_efficientnet_test,
    "efficientnet_b0": pc_efficientnet_b0,
    "efficientnet_v2_test": pc_efficientnet_v2_test,
    "convnext_test": lambda: ConvNeXt(depths=[1, 1, 2, 1], dims=[16, 32, 48, 64], class_num=1000),
}
HEAD = {"resnet_test": "fc", "resnet50_test": "fc", "efficientnet_test": "_fc", "efficientnet_b0": "_fc",
        "efficientnet_v2_test": "_fc", "convnext_test": "head"}


def save_paddleclas(name, path):
    """A PaddleClas network with non-trivial weights and BatchNorm statistics, saved as .pdparams."""
    paddle.seed(3)
    net = PADDLECLAS[name]()
    sd = net.state_dict()
    rng = np.random.default_rng(0)
    with paddle.no_grad():
        for k, v in sd.items():   # distinct values everywhere (running stats too), so a mix-up would show
            if v.dtype == paddle.float32:
                v.set_value((v.numpy() + rng.normal(0, 0.05, v.shape)).astype("float32"))
            if k.endswith(("_variance", "_var")):
                v.set_value(np.abs(v.numpy()) + 0.5)
    paddle.save(sd, path)
    return net, {k: v.numpy() for k, v in sd.items()}


@pytest.mark.parametrize("name", list(PADDLECLAS))
def test_paddleclas_imagenet_weights_load_into_the_wrapper(name, tmp_path):
    path = str(tmp_path / f"{name}.pdparams")
    net, ref = save_paddleclas(name, path)
    paddle.seed(0)
    m = create_model(name, num_classes=5)
    rep = load_pretrained(m, path, reinit_head=True, verbose=False)
    head = HEAD[name]
    assert set(rep["missing"]) == {f"backbone.{head}.weight", f"backbone.{head}.bias"}
    # everything but the 1000-class ImageNet classifier is loaded, under the wrapper's prefix
    assert set(rep["loaded"]) == {"backbone." + k for k in ref if not k.startswith(head + ".")}
    own = m.state_dict()
    for k, v in ref.items():
        if not k.startswith(head + "."):
            np.testing.assert_array_equal(own["backbone." + k].numpy(), v, err_msg=k)
    w = m.head.weight.numpy()
    assert w.shape == (m.num_features, 5) and 1e-5 < w.std() < 4e-5 and rep["head_reset"]
    np.testing.assert_array_equal(m.head.bias.numpy(), np.zeros(5, np.float32))
    # the same features as the PaddleClas network: at 64 px the stages have the parity of PaddleClas's
    # padding table, so its static SAME padding and ours agree
    net.eval()
    m.eval()
    x = paddle.to_tensor(np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype("float32"))
    with paddle.no_grad():
        ours = m.forward_head(m.forward_features(x))   # eval: dropout off
        m_head = m.head.weight.numpy(), m.head.bias.numpy()
        ref_net = paddle.nn.Linear(m_head[0].shape[0], 5)
        ref_net.weight.set_value(m_head[0])
        ref_net.bias.set_value(m_head[1])
        setattr(net, head, ref_net)
        theirs = net(x)
    scale = float(np.abs(theirs.numpy()).max())
    assert scale > 0
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-4, atol=1e-4 * scale)


def test_weights_of_another_architecture_are_rejected(tmp_path):
    path = str(tmp_path / "resnet50.pdparams")
    save_paddleclas("resnet50_test", path)
    with pytest.raises(UserError) as e:
        load_pretrained(create_model("efficientnet_test", num_classes=5), path, verbose=False)
    msg = str(e.value)
    assert "resnet50.pdparams: checkpoint does not fit the model" in msg
    assert "missing from the checkpoint [backbone._conv._bn" in msg and "backbone._ef._blocks.0.." in msg
    assert "not in the model [backbone.blocks.0.conv0" in msg
    assert "--model" in msg
    with pytest.raises(UserError, match=r"shape mismatch \[backbone\.blocks\.0\.conv0\.conv\.weight"):
        load_pretrained(create_model("resnet_test", num_classes=5), path, verbose=False)


def test_toolkit_checkpoint_of_the_same_model_round_trips(tmp_path):
    paddle.seed(0)
    src = create_model("efficientnet_v2_test", num_classes=5)
    path = str(tmp_path / "ft.pdparams")
    paddle.save(src.state_dict(), path)
    m = create_model("efficientnet_v2_test", num_classes=5)
    rep = load_pretrained(m, path, reinit_head=False, verbose=False)
    assert rep["missing"] == [] and rep["dropped"] == []
    for k, v in src.state_dict().items():
        np.testing.assert_array_equal(m.state_dict()[k].numpy(), v.numpy(), err_msg=k)


# ------------------------------------------------------------------------------------------- dual-eye
@pytest.mark.parametrize("dual,single", [("dual_resnet_test", "resnet_test"), ("dual_convnext_test", "convnext_test")])
def test_dual_model_loads_single_backbone_paddleclas_weights(dual, single, tmp_path):
    path = str(tmp_path / f"{single}.pdparams")
    _, ref = save_paddleclas(single, path)
    paddle.seed(0)
    m = create_model(dual, num_classes=8)
    fusion_before = {k: v.numpy().copy() for k, v in m.state_dict().items() if not k.startswith("backbone.")}
    rep = load_pretrained(m, path, reinit_head=True, verbose=False)
    head = HEAD[single]
    assert set(rep["loaded"]) == {"backbone.backbone." + k for k in ref if not k.startswith(head + ".")}
    assert set(rep["missing"]) == set(fusion_before)      # everything after the backbone, head included
    own = m.state_dict()
    for k, v in ref.items():
        if not k.startswith(head + "."):
            np.testing.assert_array_equal(own["backbone.backbone." + k].numpy(), v, err_msg=k)
    assert rep["head_reset"] and 1e-5 < m.head.weight.numpy().std() < 4e-5
    for k, v in fusion_before.items():      # the fusion layers keep their initialisation
        if not k.startswith("head."):
            np.testing.assert_array_equal(own[k].numpy(), v, err_msg=k)


def vit_test_state(global_pool, num_classes=1000, mae_extras=False):
    paddle.seed(5)
    v = VisionTransformer(input_size=32, patch_size=16, num_classes=num_classes, embed_dim=32, depth=2, num_heads=2,
                          global_pool=global_pool)
    sd = {k: t.numpy() + 0.01 for k, t in v.state_dict().items()}
    if mae_extras:   # an MAE pretraining checkpoint (already converted) also holds the decoder
        sd["mask_token"] = np.zeros([1, 1, 16], np.float32)
        sd["decoder_embed.weight"] = np.zeros([32, 16], np.float32)
    return sd


def save(sd, path):
    paddle.save({k: paddle.to_tensor(v) for k, v in sd.items()}, path)
    return path


def test_dual_retfound_loads_an_mae_style_vit_checkpoint(tmp_path):
    sd = vit_test_state(global_pool=False, mae_extras=True)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}   # MAE: encoder + norm + decoder, no head
    path = save(sd, str(tmp_path / "mae.pdparams"))
    paddle.seed(0)
    m = create_model("dual_retfound_test", num_classes=8)
    rep = load_pretrained(m, path, verbose=False)
    dropped = {"mask_token", "decoder_embed.weight"}
    assert set(rep["loaded"]) == {"backbone." + k for k in sd if k not in dropped}
    assert rep["missing"] and all(not k.startswith("backbone.") for k in rep["missing"])
    own = m.state_dict()
    for k, v in sd.items():
        if k not in dropped:
            np.testing.assert_array_equal(own["backbone." + k].numpy(), v, err_msg=k)
    assert rep["head_reset"]


def test_dual_retfound_loads_a_finetuned_global_pool_checkpoint_without_its_head(tmp_path):
    sd = vit_test_state(global_pool=True, num_classes=5)       # fc_norm + head, no encoder norm
    path = save(sd, str(tmp_path / "ft.pdparams"))
    m = create_model("dual_retfound_test", num_classes=8)
    rep = load_pretrained(m, path, verbose=False)
    assert not [k for k in rep["loaded"] if k.startswith(("backbone.head.", "backbone.fc_norm."))]
    assert {"backbone.norm.weight", "backbone.norm.bias"} <= set(rep["missing"])
    np.testing.assert_array_equal(m.state_dict()["backbone.blocks.1.mlp.fc2.weight"].numpy(),
                                  sd["blocks.1.mlp.fc2.weight"])


def test_dual_model_rejects_another_backbone_and_reloads_its_own_checkpoint(tmp_path):
    path = str(tmp_path / "resnet50.pdparams")
    save_paddleclas("resnet50_test", path)
    with pytest.raises(UserError, match="shape mismatch"):
        load_pretrained(create_model("dual_resnet_test", num_classes=8), path, verbose=False)
    vit_path = save(vit_test_state(global_pool=False), str(tmp_path / "vit.pdparams"))
    with pytest.raises(UserError, match="does not fit the model"):
        load_pretrained(create_model("dual_convnext_test", num_classes=8), vit_path, verbose=False)

    paddle.seed(1)
    src = create_model("dual_convnext_test", num_classes=8)
    own_path = str(tmp_path / "dual.pdparams")
    paddle.save(src.state_dict(), own_path)
    m = create_model("dual_convnext_test", num_classes=8)
    rep = load_pretrained(m, own_path, verbose=False)
    assert rep["missing"] == [] and rep["dropped"] == [] and not rep["head_reset"]
    for k, v in src.state_dict().items():
        np.testing.assert_array_equal(m.state_dict()[k].numpy(), v.numpy(), err_msg=k)
    # another class count: only the head is dropped and re-drawn
    m3 = create_model("dual_convnext_test", num_classes=3)
    rep = load_pretrained(m3, own_path, verbose=False)
    assert rep["missing"] == ["head.bias", "head.weight"] and rep["head_reset"]
    np.testing.assert_array_equal(m3.state_dict()["cross_left.attn.q_proj.weight"].numpy(),
                                  src.state_dict()["cross_left.attn.q_proj.weight"].numpy())


def test_dual_retfound_checkpoint_at_another_input_size_gets_its_pos_embed_resized(tmp_path):
    paddle.seed(2)
    src = create_model("dual_retfound_test", num_classes=8, input_size=32)
    path = str(tmp_path / "dual32.pdparams")
    paddle.save(src.state_dict(), path)
    m = create_model("dual_retfound_test", num_classes=8, input_size=64)
    rep = load_pretrained(m, path, verbose=False)
    assert rep["missing"] == [] and not rep["head_reset"]
    assert m.backbone.pos_embed.shape == [1, 1 + 16, 32]
    own, ref = m.state_dict(), src.state_dict()
    np.testing.assert_array_equal(own["backbone.pos_embed"].numpy()[:, :1], ref["backbone.pos_embed"].numpy()[:, :1])
    np.testing.assert_array_equal(own["cross_right.norm.weight"].numpy(), ref["cross_right.norm.weight"].numpy())
    np.testing.assert_array_equal(own["head.weight"].numpy(), ref["head.weight"].numpy())


@pytest.mark.parametrize("name", ["resnet_test", "efficientnet_test", "convnext_test"])
def test_fitting_head_is_kept_and_nothing_reported_dropped(tmp_path, name):
    """A checkpoint of the same model (head included) loaded with the default reinit_head=None keeps its head;
    the report lists no key as dropped even though the CNN wrapper prefixes PaddleClas keys."""
    paddle.seed(3)
    src = create_model(name, num_classes=4)
    path = str(tmp_path / "w.pdparams")
    paddle.save({k[len("backbone."):]: v for k, v in src.state_dict().items()}, path)  # PaddleClas key layout
    paddle.seed(4)
    dst = create_model(name, num_classes=4)
    report = load_pretrained(dst, path, verbose=False)
    assert report["dropped"] == [] and not report["head_reset"]
    for k, v in src.state_dict().items():
        np.testing.assert_array_equal(dst.state_dict()[k].numpy(), v.numpy(), err_msg=k)


# ------------------------------------------------------------------------------------------- finding the file
def test_paddleclas_file_name_is_found_in_weights_dir_and_loaded(tmp_path, monkeypatch):
    """The presets' ``finetune: <Model>_pretrained.pdparams`` is a bare file name: it is read from
    ``--weights_dir``, not from the folder the run starts in."""
    weights = tmp_path / "weights"
    weights.mkdir()
    _, ref = save_paddleclas("resnet_test", str(weights / "ResNet18_pretrained.pdparams"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    m = create_model("resnet_test", num_classes=5)
    rep = load_pretrained(m, "ResNet18_pretrained.pdparams", weights_dir=str(weights), verbose=False)
    assert rep["path"] == str(weights / "ResNet18_pretrained.pdparams")
    np.testing.assert_array_equal(m.state_dict()["backbone.stem.0.conv.weight"].numpy(), ref["stem.0.conv.weight"])


def test_missing_paddleclas_weights_give_model_zoo_advice(tmp_path):
    with pytest.raises(UserError) as e:
        load_pretrained(create_model("efficientnet_test", num_classes=5), "EfficientNetB4_pretrained.pdparams",
                        weights_dir=str(tmp_path / "weights"), verbose=False)
    msg = str(e.value)
    assert str(tmp_path / "weights" / "EfficientNetB4_pretrained.pdparams") in msg
    assert "PaddleClas's ImageNet checkpoint for efficientnet_b4" in msg and "github.com/PaddlePaddle/PaddleClas" in msg
    assert "Hugging Face" not in msg and "models.convert" not in msg


def test_paddleclas_weights_table_matches_paddleclas_and_the_registry():
    """Each file the missing-weights advice names is PaddleClas's (same download address as its MODEL_URLS) and
    every registered CNN model (not a ViT, not a ``*_test``) has one."""
    from paddleclas.ppcls.arch.backbone.legendary_models import resnet as R
    from paddleclas.ppcls.arch.backbone.model_zoo import convnext as C

    from models import list_models
    from util.weights_files import PADDLECLAS_WEIGHTS

    published = {**R.MODEL_URLS, **E.MODEL_URLS, **V2.MODEL_URLS, **C.MODEL_URLS}
    for file_name, (_, url) in PADDLECLAS_WEIGHTS.items():
        assert published[file_name[: -len("_pretrained.pdparams")]] == url, file_name
    covered = {m for models, _ in PADDLECLAS_WEIGHTS.values() for m in models}
    cnn = {m for m in list_models() if not m.endswith("_test") and "retfound" not in m and not m.startswith(("vit_", "dinov2_", "visionfm"))}
    assert covered == cnn
