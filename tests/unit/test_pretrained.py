"""Loading MAE / fine-tuned RETFound checkpoints, against numbers from the PyTorch reference.

Fixtures in tests/fixtures/vit_ref/ come from tools/make_reference_fixtures.py (timm ViT in the RETFound
configuration: embed 48, depth 2, heads 4, patch 16).
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import paddle
import pytest

from helpers import FIXTURES
from models.pretrained import load_finetuned, load_pretrained, read_paddle_state_dict, resolve_weights
from models.vit import VisionTransformer
from util.errors import UserError

FIX = os.path.join(FIXTURES, "vit_ref")
MAE = os.path.join(FIX, "mae_pretrain.pth")
FT_GP = os.path.join(FIX, "finetuned_gp.pth")
FT_CLS = os.path.join(FIX, "finetuned_cls.pth")


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(FIX, "reference.npz")))


def ref_vit(input_size: int, num_classes: int, global_pool: bool, **kw) -> VisionTransformer:
    cfg = dict(input_size=input_size, patch_size=16, num_classes=num_classes, embed_dim=48, depth=2, num_heads=4,
               global_pool=global_pool)
    cfg.update(kw)
    m = VisionTransformer(**cfg)
    m.eval()
    return m


def run(m, x):
    with paddle.no_grad():
        return m(paddle.to_tensor(x)).numpy()


def features(m, x):
    with paddle.no_grad():
        return m.forward_features(paddle.to_tensor(x)).numpy()


# ------------------------------------------------------------------------------------------- parity
def test_finetuned_global_pool_checkpoint_matches_reference_logits(ref):
    m = ref_vit(64, 5, True)
    rep = load_pretrained(m, FT_GP, verbose=False)
    assert rep["missing"] == [] and rep["dropped"] == [] and rep["head_reset"] is False
    assert rep["pos_embed_resized"] is None
    assert np.abs(run(m, ref["x64"]) - ref["logits_gp"]).max() <= 1e-4


def test_finetuned_cls_token_checkpoint_matches_reference_logits(ref):
    m = ref_vit(32, 3, False)
    load_finetuned(m, FT_CLS, verbose=False)
    assert np.abs(run(m, ref["x32"]) - ref["logits_cls"]).max() <= 1e-4


def test_load_finetuned_is_strict_and_keeps_the_head(ref):
    m = ref_vit(64, 5, True)
    rep = load_finetuned(m, FT_GP, verbose=False)
    assert rep["head_reset"] is False
    assert np.abs(run(m, ref["x64"]) - ref["logits_gp"]).max() <= 1e-4
    with pytest.raises(UserError, match="head.weight: checkpoint \\[48, 5\\] vs model \\[48, 7\\]"):
        load_finetuned(ref_vit(64, 7, True), FT_GP, verbose=False)
    with pytest.raises(UserError, match="fc_norm.weight"):
        load_finetuned(ref_vit(96, 5, True), MAE, verbose=False)


def test_mae_checkpoint_into_global_pool_model_at_new_size(ref, capsys):
    paddle.seed(0)
    m = ref_vit(96, 5, True)
    rep = load_pretrained(m, MAE)
    assert set(rep["missing"]) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert "mask_token" in rep["dropped"] and "decoder_pred.weight" in rep["dropped"]
    assert {"norm.weight", "norm.bias"} <= set(rep["dropped"])   # RETFound deletes norm in global-pool mode
    assert all(k.startswith(("decoder_", "mask_token", "norm.")) for k in rep["dropped"])
    assert rep["pos_embed_resized"] == (4, 6)
    # pos_embed resized like MAE's interpolate_pos_embed (torch bicubic, align_corners=False)
    assert np.abs(m.pos_embed.numpy() - ref["pos_embed_96"]).max() <= 1e-5
    # everything before the head equals the reference model loaded the same way
    assert np.abs(features(m, ref["x96"]) - ref["features_mae_gp_96"]).max() <= 1e-4
    # head re-initialised: trunc_normal(std=2e-5), bias 0
    assert rep["head_reset"] is True
    w = m.head.weight.numpy()
    assert 1e-5 < w.std() < 3e-5 and np.abs(w).max() < 1.5e-4
    np.testing.assert_array_equal(m.head.bias.numpy(), np.zeros(5, np.float32))
    out = capsys.readouterr().out
    assert "decoder_*" in out and "4x4 -> 6x6" in out and "re-initialised" in out


def test_mae_checkpoint_into_cls_token_model_uses_encoder_norm(ref):
    m = ref_vit(64, 5, False)
    rep = load_pretrained(m, MAE, verbose=False)
    assert set(rep["missing"]) == {"head.weight", "head.bias"}
    assert "norm.weight" in rep["loaded"] and rep["pos_embed_resized"] is None
    assert np.abs(features(m, ref["x64"]) - ref["features_mae_cls_64"]).max() <= 1e-4


def test_finetuned_checkpoint_with_other_class_count_drops_only_the_head(ref):
    paddle.seed(0)
    m = ref_vit(64, 2, True)
    rep = load_pretrained(m, FT_GP, verbose=False)
    assert rep["dropped"] == ["head.bias", "head.weight"] and rep["missing"] == ["head.bias", "head.weight"]
    assert rep["head_reset"] is True
    assert "fc_norm.weight" in rep["loaded"]


def test_reinit_head_true_follows_reference_main_finetune(ref):
    paddle.seed(0)
    m = ref_vit(64, 5, True)
    rep = load_pretrained(m, FT_GP, reinit_head=True, verbose=False)
    assert rep["head_reset"] is True and m.head.weight.numpy().std() < 1e-4
    # trunc_normal_(model.head.weight) only: the loaded bias is kept, as in RETFound's main_finetune.py
    sd, _ = read_paddle_state_dict(FT_GP)
    assert np.abs(sd["head.bias"]).max() > 0
    np.testing.assert_array_equal(m.head.bias.numpy(), sd["head.bias"])


def test_pdparams_are_loaded_without_transposing(ref, tmp_path):
    sd, _ = read_paddle_state_dict(FT_GP)
    p = str(tmp_path / "ft.pdparams")
    paddle.save({k: paddle.to_tensor(v) for k, v in sd.items()}, p)
    m = ref_vit(64, 5, True)
    load_finetuned(m, p, verbose=False)
    assert np.abs(run(m, ref["x64"]) - ref["logits_gp"]).max() <= 1e-4


# ------------------------------------------------------------------------------------------- errors
def test_shape_mismatch_lists_keys_and_shapes():
    m = ref_vit(64, 5, True, mlp_ratio=2.0)
    with pytest.raises(UserError) as e:
        load_pretrained(m, MAE, verbose=False)
    msg = str(e.value)
    assert "blocks.0.mlp.fc1.weight: checkpoint [48, 192] vs model [48, 96]" in msg
    assert "blocks.1.mlp.fc2.weight" in msg and "mae_pretrain.pth" in msg


def test_missing_block_is_an_error_not_a_silent_skip():
    m = ref_vit(64, 5, True, depth=3)
    with pytest.raises(UserError, match=r"missing from the checkpoint \[blocks\.2\.attn\.proj\.bias \[48\]"):
        load_pretrained(m, MAE, verbose=False)


def test_extra_key_is_an_error(tmp_path):
    sd, _ = read_paddle_state_dict(FT_GP)
    sd["blocks.0.attn.q_norm.weight"] = np.ones(12, np.float32)
    p = str(tmp_path / "extra.pdparams")
    paddle.save({k: paddle.to_tensor(v) for k, v in sd.items()}, p)
    with pytest.raises(UserError, match=r"not in the model \[blocks\.0\.attn\.q_norm\.weight \[12\]\]"):
        load_pretrained(ref_vit(64, 5, True), p, verbose=False)


def test_global_pool_checkpoint_into_cls_model_suggests_the_flag():
    with pytest.raises(UserError, match="pass --global_pool"):
        load_pretrained(ref_vit(64, 5, False), FT_GP, verbose=False)
    with pytest.raises(UserError, match="pass --no-global_pool"):
        load_pretrained(ref_vit(32, 3, True), FT_CLS, verbose=False)


def test_bare_name_not_found_says_where_it_looked_and_how_to_convert(tmp_path):
    wd = str(tmp_path / "weights")
    with pytest.raises(UserError) as e:
        load_pretrained(ref_vit(64, 5, True), "RETFound_mae_meh", weights_dir=wd)
    msg = str(e.value)
    for ext in (".pth", ".pdparams", ".safetensors"):
        assert os.path.join(wd, "RETFound_mae_meh" + ext) in msg
    assert "YukunZhou/RETFound_mae_meh" in msg and "https://github.com/rmaphoh/RETFound_MAE" in msg
    assert f"python -m models.convert RETFound_mae_meh.pth {os.path.join(wd, 'RETFound_mae_meh')}.pdparams" in msg


def test_bare_name_resolves_in_weights_dir(tmp_path, ref):
    shutil.copy(FT_GP, tmp_path / "RETFound_ft_test.pth")
    assert resolve_weights("RETFound_ft_test", str(tmp_path)) == str(tmp_path / "RETFound_ft_test.pth")
    m = ref_vit(64, 5, True)
    load_pretrained(m, "RETFound_ft_test", weights_dir=str(tmp_path), verbose=False)
    assert np.abs(run(m, ref["x64"]) - ref["logits_gp"]).max() <= 1e-4


def test_missing_explicit_path_is_reported(tmp_path):
    with pytest.raises(UserError, match="no file found"):
        resolve_weights(str(tmp_path / "nope.pth"))


def test_bare_file_name_with_extension_resolves_in_weights_dir(tmp_path, ref, monkeypatch):
    """``--finetune RETFound_x.pth`` (no folder part) is read from --weights_dir, not only from the current folder."""
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(FT_GP, weights / "RETFound_ft_test.pth")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    m = ref_vit(64, 5, True)
    rep = load_pretrained(m, "RETFound_ft_test.pth", weights_dir=str(weights), verbose=False)
    assert rep["path"] == str(weights / "RETFound_ft_test.pth")
    assert np.abs(run(m, ref["x64"]) - ref["logits_gp"]).max() <= 1e-4
