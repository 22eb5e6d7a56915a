"""Dual-eye models: input layout [B, 2, 3, H, W] (0 left, 1 right), which eye goes where, the two-way
cross-attention, and the backbone / head split used by --backbone_lr_scale and --freeze_backbone."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from models import create_model
from models.dual import CrossEyeAttention, DualEyeConcat, DualEyeCrossAttention
from util.errors import UserError

DUAL_TINY = ["dual_convnext_test", "dual_resnet_test", "dual_retfound_test"]
CROSS_TINY = ["dual_convnext_test", "dual_retfound_test"]


def build(name, num_classes=5):
    paddle.seed(0)
    m = create_model(name, num_classes=num_classes)
    m.eval()
    return m


def pair(m, n=3, seed=0):
    s = m.default_cfg["input_size"]
    return paddle.to_tensor(np.random.default_rng(seed).normal(size=(n, 2, 3, s, s)).astype("float32"))


def run(m, x):
    with paddle.no_grad():
        return m(x).numpy()


@pytest.mark.parametrize("name", DUAL_TINY)
def test_single_image_input_is_rejected_with_a_hint(name):
    m = build(name)
    s = m.default_cfg["input_size"]
    with pytest.raises(UserError, match=r"expected \[batch, 2, 3, H, W\].*single-image model"):
        m(paddle.randn([2, 3, s, s]))
    with pytest.raises(UserError, match="left and a right eye"):
        m(paddle.randn([2, 3, 3, s, s]))


@pytest.mark.parametrize("name", DUAL_TINY)
def test_samples_do_not_mix_in_a_batch(name):
    """[B, 2, ...] -> [2B, ...] and back keeps every sample's two eyes together."""
    m = build(name)
    x = pair(m, n=3)
    together = run(m, x)
    alone = np.concatenate([run(m, x[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", DUAL_TINY)
def test_left_and_right_are_not_interchangeable(name):
    m = build(name)
    x = pair(m)
    swapped = paddle.flip(x, axis=[1])
    assert np.abs(run(m, x) - run(m, swapped)).max() > 1e-4


def test_concat_model_puts_the_left_eye_first():
    m = build("dual_resnet_test")
    assert isinstance(m, DualEyeConcat) and m.num_features == 2 * m.backbone.num_features
    x = pair(m, n=2)
    with paddle.no_grad():
        feats = m.forward_features(x).numpy()
        left = m.backbone.forward_features(x[:, 0]).numpy()
        right = m.backbone.forward_features(x[:, 1]).numpy()
    np.testing.assert_allclose(feats, np.concatenate([left, right], axis=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,tokens", [("dual_convnext_test", 4), ("dual_retfound_test", 4)])
def test_cross_attention_directions(name, tokens):
    """Left tokens (own branch) query the right eye's; right tokens query the left eye's."""
    m = build(name)
    assert isinstance(m, DualEyeCrossAttention) and m.num_heads == 8
    x = pair(m, n=2)
    with paddle.no_grad():
        left, right = m.forward_eye_tokens(x)
        tl = m.backbone.forward_patch_tokens(x[:, 0])
        tr = m.backbone.forward_patch_tokens(x[:, 1])
        assert tl.shape == [2, tokens, tl.shape[-1]]   # ViT: patch tokens only, the cls token is dropped
        pl, pr = m.proj_left(tl), m.proj_right(tr)
        exp_left, exp_right = m.cross_left(pl, pr), m.cross_right(pr, pl)
    assert left.shape == [2, tokens, m.embed_dim]
    np.testing.assert_allclose(left.numpy(), exp_left.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(right.numpy(), exp_right.numpy(), rtol=1e-4, atol=1e-5)


def test_cross_eye_attention_uses_the_other_eye_with_a_residual():
    paddle.seed(0)
    att = CrossEyeAttention(16, 8)
    att.eval()
    q, kv = paddle.randn([2, 5, 16]), paddle.randn([2, 3, 16])
    out = att(q, kv)
    assert out.shape == [2, 5, 16]
    assert np.abs(out.numpy() - att(q, kv * 2.0).numpy()).max() > 1e-4        # depends on the other eye
    np.testing.assert_allclose(out.numpy(), att.norm(q + att.attn(q, kv, kv)).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        CrossEyeAttention(12, 8)


@pytest.mark.parametrize("name", DUAL_TINY)
def test_freeze_backbone_leaves_the_fusion_layers_and_head_trainable(name):
    from util.lr_decay import freeze_backbone, param_groups_lrd

    m = create_model(name, num_classes=5)
    n_frozen = freeze_backbone(m)
    trainable = [n for n, p in m.named_parameters() if not p.stop_gradient]
    assert n_frozen == len([n for n, _ in m.backbone.named_parameters()])
    assert trainable and all(not n.startswith("backbone.") for n in trainable)
    assert {"head.weight", "head.bias"} <= set(trainable)
    if name in CROSS_TINY:
        assert any(n.startswith("cross_left.") for n in trainable) and any(n.startswith("proj_right.")
                                                                           for n in trainable)
    groups = param_groups_lrd(m, weight_decay=0.05, layer_decay=0.75, backbone_lr_scale=0.1)
    assert {g["layer_id"] for g in groups} == {m.num_layers}
    assert all(g["learning_rate"] == pytest.approx(1.0) for g in groups)


def test_backbone_lr_scale_applies_to_backbone_ids_only():
    from util.lr_decay import param_groups_lrd

    m = create_model("dual_retfound_test", num_classes=5)
    groups = param_groups_lrd(m, weight_decay=0.05, layer_decay=1.0, backbone_lr_scale=0.1)
    for g in groups:
        on_backbone = {n.startswith("backbone.") for n in g["param_names"]}
        assert len(on_backbone) == 1
        assert g["learning_rate"] == pytest.approx(0.1 if on_backbone.pop() else 1.0)
    # the ViT's exemptions carry the backbone prefix
    assert m.no_weight_decay() == {"backbone.pos_embed", "backbone.cls_token"}


def test_default_cfg_and_drop_path_come_from_the_backbone():
    m = create_model("dual_convnext_test", num_classes=3, drop_path_rate=0.3, input_size=96)
    assert m.default_cfg["input_size"] == 96 and m.default_cfg["mean"] == m.backbone.default_cfg["mean"]
    rates = [blk.drop_path.drop_prob for stage in m.backbone.backbone.stages for blk in stage
             if hasattr(blk.drop_path, "drop_prob")]
    assert rates[-1] == pytest.approx(0.3)
    v = create_model("dual_retfound_test", num_classes=3, drop_path_rate=0.3)
    assert v.backbone.drop_path_rates[-1] == pytest.approx(0.3)


def test_training_step_reduces_the_loss():
    """A few AdamW steps on a fixed batch fit it: gradients reach the cross-attention and the backbone."""
    from util.lr_decay import param_groups_lrd

    paddle.seed(0)
    m = create_model("dual_convnext_test", num_classes=2)
    m.train()
    x = pair(m, n=4)
    y = paddle.to_tensor(np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype="float32"))
    opt = paddle.optimizer.AdamW(learning_rate=3e-3, parameters=param_groups_lrd(m, 0.0, 1.0))
    losses = []
    for _ in range(8):
        loss = paddle.nn.functional.binary_cross_entropy_with_logits(m(x), y)
        loss.backward()
        opt.step()
        opt.clear_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
