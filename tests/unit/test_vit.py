"""ViT model: structure, contract attributes, stochastic depth, head init, parity with the timm reference.

Reference numbers come from tests/fixtures/vit_ref/reference.npz, written by
tools/make_reference_fixtures.py with PyTorch + timm; the checkpoint-loading parity tests are in
test_pretrained.py.
"""
from __future__ import annotations

import os

import numpy as np
import paddle
import pytest

import models
from helpers import FIXTURES
from models import vit
from models.vit import VisionTransformer, drop_path, resize_pos_embed, trunc_normal_
from util.errors import UserError

REF = os.path.join(FIXTURES, "vit_ref", "reference.npz")

BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
              "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
              "mlp.fc2.bias"]


def expected_keys(depth: int, global_pool: bool) -> set[str]:
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "head.weight",
            "head.bias"}
    keys |= {f"blocks.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS}
    keys |= {"fc_norm.weight", "fc_norm.bias"} if global_pool else {"norm.weight", "norm.bias"}
    return keys


@pytest.mark.parametrize("global_pool", [True, False])
def test_state_dict_names_and_shapes_follow_timm(global_pool):
    m = models.create_model("vit_test", num_classes=5, global_pool=global_pool, input_size=32)
    sd = m.state_dict()
    assert set(sd) == expected_keys(2, global_pool)
    assert tuple(sd["cls_token"].shape) == (1, 1, 32)
    assert tuple(sd["pos_embed"].shape) == (1, 1 + 4, 32)
    assert tuple(sd["patch_embed.proj.weight"].shape) == (32, 3, 16, 16)
    assert tuple(sd["blocks.0.attn.qkv.weight"].shape) == (32, 96)       # Paddle Linear: [in, out]
    assert tuple(sd["blocks.0.mlp.fc1.weight"].shape) == (32, 128)
    assert tuple(sd["head.weight"].shape) == (32, 5)


@pytest.mark.parametrize("global_pool", [True, False])
def test_forward_backward_shapes(global_pool):
    paddle.seed(0)
    m = models.create_model("vit_test", num_classes=3, drop_path_rate=0.1, global_pool=global_pool, input_size=32)
    x = paddle.randn([4, 3, 32, 32])
    out = m(x)
    assert out.shape == [4, 3]
    assert m.forward_features(x).shape == [4, m.num_features]
    out.sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name


def test_wrong_input_size_raises_user_error():
    m = models.create_model("vit_test", num_classes=2, input_size=32)
    with pytest.raises(UserError, match="64x64.*32x32"):
        m(paddle.zeros([1, 3, 64, 64]))


def test_global_pool_excludes_cls_token_and_cls_mode_uses_only_it():
    paddle.seed(1)
    x = paddle.randn([2, 3, 32, 32])
    gp = models.create_model("vit_test", num_classes=2, global_pool=True, input_size=32)
    gp.eval()
    tokens = gp.forward_tokens(x).numpy()
    pooled = tokens[:, 1:].mean(1)
    mu, var = pooled.mean(-1, keepdims=True), pooled.var(-1, keepdims=True)
    np.testing.assert_allclose(gp.forward_features(x).numpy(), (pooled - mu) / np.sqrt(var + 1e-6), atol=1e-5)

    cls = models.create_model("vit_test", num_classes=2, global_pool=False, input_size=32)
    cls.eval()
    t = cls.forward_tokens(x).numpy()[:, 0]
    mu, var = t.mean(-1, keepdims=True), t.var(-1, keepdims=True)
    np.testing.assert_allclose(cls.forward_features(x).numpy(), (t - mu) / np.sqrt(var + 1e-6), atol=1e-5)


def test_contract_attributes():
    m = models.create_model("vit_test", num_classes=7, input_size=32)
    assert (m.num_outputs, m.num_features, m.num_views, m.num_layers) == (7, 32, 1, 3)
    assert m.default_cfg == {"input_size": 32, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                             "interpolation": "bicubic", "crop_pct": 224 / 256}
    assert models.create_model("vit_test", 2, input_size=224).default_cfg["crop_pct"] == pytest.approx(0.875)
    assert models.create_model("vit_test", 2, input_size=256).default_cfg["crop_pct"] == 1.0
    assert m.no_weight_decay() == {"pos_embed", "cls_token"}


def test_layer_id():
    m = models.create_model("vit_test", num_classes=2, input_size=32)
    ids = {n: m.layer_id(n) for n, _ in m.named_parameters()}
    assert ids["cls_token"] == ids["pos_embed"] == ids["patch_embed.proj.weight"] == ids["patch_embed.proj.bias"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.1.mlp.fc2.bias"] == 2
    assert ids["fc_norm.weight"] == ids["head.weight"] == ids["head.bias"] == m.num_layers == 3
    assert m.layer_id("norm.weight") == 3
    assert all(0 <= i <= m.num_layers for i in ids.values())


def test_drop_path_rates_increase_linearly_to_the_given_rate():
    m = VisionTransformer(input_size=32, patch_size=16, num_classes=2, embed_dim=16, depth=5, num_heads=2,
                          drop_path_rate=0.2)
    got = [blk.drop_path.drop_prob for blk in m.blocks]
    np.testing.assert_allclose(got, [0.0, 0.05, 0.1, 0.15, 0.2], atol=1e-7)


def test_drop_path_is_per_sample_scaled_and_identity_at_eval():
    paddle.seed(0)
    x = paddle.ones([4000, 3, 2])
    y = drop_path(x, 0.25, training=True).numpy()
    per_sample = y.reshape(4000, -1)
    # each sample is either dropped entirely or kept and scaled by 1/keep_prob
    assert np.all((per_sample.min(1) == per_sample.max(1)))
    vals = np.unique(per_sample)
    assert len(vals) == 2 and vals[0] == 0.0 and vals[1] == pytest.approx(1 / 0.75)
    assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.03
    np.testing.assert_array_equal(drop_path(x, 0.25, training=False).numpy(), x.numpy())
    m = models.create_model("vit_test", num_classes=2, drop_path_rate=0.5, input_size=32)
    m.eval()
    xi = paddle.randn([2, 3, 32, 32])
    np.testing.assert_array_equal(m(xi).numpy(), m(xi).numpy())


def test_reset_head_is_trunc_normal_2e5_with_zero_bias():
    paddle.seed(0)
    m = VisionTransformer(input_size=32, patch_size=16, num_classes=1000, embed_dim=64, depth=1, num_heads=2)
    with paddle.no_grad():
        m.head.bias.set_value(paddle.ones([1000]))
    m.reset_head(2e-5)
    w = m.head.weight.numpy()
    assert abs(w.std() - 2e-5) < 0.02 * 2e-5
    assert abs(w.mean()) < 5e-7
    assert np.abs(w).max() < 7 * 2e-5       # bounds are absolute (+-2), so no clipping at 2 std ...
    assert np.abs(w).max() > 3 * 2e-5       # ... and values beyond 2 std do occur (64k draws)
    np.testing.assert_array_equal(m.head.bias.numpy(), np.zeros(1000, np.float32))


def test_trunc_normal_respects_absolute_bounds():
    paddle.seed(0)
    p = paddle.create_parameter([200000], "float32")
    trunc_normal_(p, std=1.0)                      # bounds -2..2 = 2 std here
    v = p.numpy()
    assert v.min() >= -2 and v.max() <= 2 and v.max() > 1.95
    assert abs(v.std() - 0.8796) < 0.01              # std of N(0,1) truncated to [-2, 2]
    trunc_normal_(p, std=1.0, mean=0.5, a=0.0, b=1.0)
    v = p.numpy()
    assert v.min() >= 0.0 and v.max() <= 1.0 and abs(v.mean() - 0.5) < 0.01


def test_random_init_scales():
    paddle.seed(0)
    m = VisionTransformer(input_size=64, patch_size=16, num_classes=10, embed_dim=64, depth=1, num_heads=2)
    assert abs(m.pos_embed.numpy().std() - 0.02) < 0.003
    w = m.blocks[0].mlp.fc1.weight.numpy()            # xavier uniform: limit sqrt(6 / (64 + 256))
    assert np.abs(w).max() <= np.sqrt(6 / 320) + 1e-6 and np.abs(w).max() > 0.9 * np.sqrt(6 / 320)
    pw = m.patch_embed.proj.weight.numpy()            # conv seen as [64, 3*16*16] linear
    assert np.abs(pw).max() <= np.sqrt(6 / (768 + 64)) + 1e-6
    assert np.all(m.blocks[0].attn.qkv.bias.numpy() == 0)
    assert np.all(m.fc_norm.weight.numpy() == 1) and np.all(m.fc_norm.bias.numpy() == 0)


def test_factories_use_the_reference_sizes(monkeypatch):
    seen = {}
    monkeypatch.setattr(vit, "VisionTransformer", lambda **kw: seen.setdefault("kw", kw))
    cfgs = {"retfound_mae": (1024, 24, 16), "vit_base_patch16": (768, 12, 12), "vit_small_patch16": (384, 12, 6)}
    for name, (dim, depth, heads) in cfgs.items():
        seen.clear()
        getattr(vit, name)(num_classes=5, drop_path_rate=0.2, global_pool=False, input_size=256)
        kw = seen["kw"]
        assert (kw["embed_dim"], kw["depth"], kw["num_heads"], kw["patch_size"], kw["mlp_ratio"]) == \
            (dim, depth, heads, 16, 4.0)
        assert (kw["num_classes"], kw["drop_path_rate"], kw["global_pool"], kw["input_size"]) == (5, 0.2, False, 256)
    assert models.resolve_model_name("RETFound_mae") == "retfound_mae"


def test_prepare_pretrained_drops_decoder_norm_and_mismatched_head():
    m = models.create_model("vit_test", num_classes=4, input_size=32)
    sd = {k: v.numpy() for k, v in m.state_dict().items() if not k.startswith(("fc_norm", "head"))}
    sd.update({"norm.weight": np.ones(32, np.float32), "norm.bias": np.zeros(32, np.float32),
               "mask_token": np.zeros((1, 1, 8), np.float32), "decoder_pred.weight": np.zeros((8, 768), np.float32),
               "head.weight": np.zeros((32, 1000), np.float32), "head.bias": np.zeros(1000, np.float32)})
    out, missing = m.prepare_pretrained(sd)
    assert not any(k.startswith(("decoder_", "mask_token", "norm.", "head.")) for k in out)
    assert missing == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    # head kept (same shape) -> its fc_norm must come from the checkpoint too
    same_head = models.create_model("vit_test", num_classes=1000, input_size=32)
    assert same_head.prepare_pretrained(sd)[1] == set()
    cls = models.create_model("vit_test", num_classes=1000, global_pool=False, input_size=32)
    out, missing = cls.prepare_pretrained(sd)
    assert "norm.weight" in out and "head.weight" in out and missing == set()


def test_resize_pos_embed_matches_reference_interpolation():
    ref = np.load(REF)
    src = ref["pos_embed_mae_64"]                      # [1, 1 + 4*4, D] from the MAE fixture
    got = resize_pos_embed(src, new_grid=6)
    assert got.shape == ref["pos_embed_96"].shape == (1, 37, src.shape[-1])
    np.testing.assert_array_equal(got[:, 0], src[:, 0])  # cls token untouched
    assert np.abs(got - ref["pos_embed_96"]).max() <= 1e-5
    assert resize_pos_embed(src, new_grid=4) is src


def test_resize_pos_embed_rejects_non_square_grid():
    with pytest.raises(UserError, match="square"):
        resize_pos_embed(np.zeros((1, 1 + 6, 8), np.float32), new_grid=2)
