"""The DINOv2 family (RETFound-DINOv2, Meta's DINOv2, RETFound-Green, VisionFM) against numbers from timm.

Fixtures in tests/fixtures/dinov2/ come from tools/make_dinov2_fixtures.py: timm's own registered models
(``vit_large_patch14_dinov2``, ``vit_small_patch14_reg4_dinov2``, ``vit_base_patch16_224``) at embed 32,
depth 2, heads 2, saved in each published checkpoint layout and loaded the way each source loads them
(RETFound's ``main_finetune.py``, RETFound-Green's README, VisionFM's ``load_pretrained_weights``). The models
here are built by the factories' own helpers at the same tiny size, so they are the registered configurations.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from helpers import FIXTURES, ROOT, make_class_folders, run_cli
from models import create_model, default_input_size, resolve_model_name
from models.checkpoint_io import read_checkpoint
from models.convert import STATE_DICT_KEYS, to_paddle_state_dict, unwrap_teacher
from models.convert import main as convert_main
from models.pretrained import load_finetuned, load_pretrained, load_weights
from models.vit import VisionTransformer, _dinov2, _green, _visionfm
from util.errors import UserError
from util.weights_files import PRETRAINED_SOURCES, find_weights

FIX = os.path.join(FIXTURES, "dinov2")
TEACHER = os.path.join(FIX, "retfound_dinov2_teacher.pth")
META = os.path.join(FIX, "dinov2_meta.pth")
FINETUNED = os.path.join(FIX, "retfound_dinov2_finetuned.pth")
GREEN = os.path.join(FIX, "retfound_green.pth")
VISIONFM = os.path.join(FIX, "visionfm_teacher.pth")
TOL = 1e-4


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    r = dict(np.load(os.path.join(FIX, "reference.npz")))
    return {k: v.astype(np.float32) for k, v in r.items()}   # the inputs are stored as float16


def dinov2(size: int, num_classes: int = 5) -> VisionTransformer:
    return _dinov2(size, num_classes, 0.0, 32, 2, 2).eval()


def green(size: int) -> VisionTransformer:
    return _green(size, 3, 0.0, 32, 2, 2).eval()


def visionfm(size: int) -> VisionTransformer:
    return _visionfm(size, 3, 0.0, 32, 2, 2).eval()


def feats(m: VisionTransformer, x: np.ndarray) -> np.ndarray:
    with paddle.no_grad():
        return m.forward_features(paddle.to_tensor(x)).numpy()


def logits(m, x: np.ndarray) -> np.ndarray:
    with paddle.no_grad():
        return m(paddle.to_tensor(x)).numpy()


def diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("size,grid", [(56, 4), (42, 3)])
def test_retfound_dinov2_teacher_checkpoint_matches_the_reference(ref, size, grid):
    paddle.seed(0)
    m = dinov2(size)
    rep = load_pretrained(m, TEACHER, verbose=False)
    assert rep["convert"]["source_key"] == "teacher" and rep["convert"]["stripped_prefix"] == "backbone."
    # the reference's renames: both blocks' MLP weight and bias, w12 -> fc1 and w3 -> fc2
    assert sorted(rep["convert"]["renamed"]) == sorted(f"blocks.{i}.mlp.{n}.{p}" for i in (0, 1)
                                                       for n in ("w12", "w3") for p in ("weight", "bias"))
    assert set(rep["missing"]) == {"head.weight", "head.bias"} and rep["head_reset"] is True
    assert "mask_token" in rep["dropped"]
    assert {k.split(".")[0] for k in rep["dropped"]} == {"mask_token", "dino_head", "ibot_head"}
    assert rep["pos_embed_resized"] == (6, grid)
    # pos_embed resized as RETFound's interpolate_pos_embed (torch bicubic, align_corners=False, cls kept)
    assert diff(m.pos_embed.numpy(), ref[f"pos_embed_dinov2_{size}"]) <= 1e-5
    assert diff(feats(m, ref[f"x{size}"]), ref[f"feat_dinov2_{size}"]) <= TOL


def test_meta_dinov2_release_layout_matches_the_reference(ref):
    m = dinov2(56)
    rep = load_pretrained(m, META, verbose=False)
    assert rep["convert"]["source_key"] is None and rep["dropped"] == ["mask_token"]
    assert diff(feats(m, ref["x56"]), ref["feat_meta_56"]) <= TOL


def test_finetuned_reference_checkpoint_evaluates_through_the_resume_path(ref):
    """RETFound's checkpoint-best.pth of a fine-tuned RETFound_dinov2 ({'model', 'epoch', 'args'}): what
    ``--eval --resume`` does with a checkpoint that is not the toolkit's (strict, head included)."""
    m = create_model("dinov2_test", num_classes=3).eval()
    assert load_weights(m, {}, resume=FINETUNED, eval_only=True, verbose=False) is None
    assert diff(logits(m, ref["x32"]), ref["logits_finetuned"]) <= TOL
    with pytest.raises(UserError, match=r"head.weight: checkpoint \[32, 3\] vs model \[32, 4\]"):
        load_finetuned(create_model("dinov2_test", num_classes=4), FINETUNED, verbose=False)


def test_finetuned_reference_checkpoint_with_the_cli_eval(tmp_path, ref):
    data = make_class_folders(tmp_path / "data", classes=("a", "b", "c"), counts={"test": 2}, size=(40, 36))
    out = tmp_path / "out"
    proc = run_cli(["--eval", "--resume", FINETUNED, "--model", "dinov2_test", "--input_size", "32", "--data_path",
                    data, "--nb_classes", "3", "--num_workers", "0", "--batch_size", "4", "--output_dir", out,
                    "--task", "ev"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Loaded {len(read_checkpoint(FINETUNED)['model'])} tensors from {FINETUNED}" in proc.stdout
    assert os.path.isfile(out / "ev" / "metrics_test.csv")


@pytest.mark.parametrize("size,resized", [(56, None), (42, (4, 3))])
def test_retfound_green_timm_state_dict_matches_its_readme(ref, size, resized):
    m = green(size)
    rep = load_pretrained(m, GREEN, verbose=False)
    assert set(rep["missing"]) == {"head.weight", "head.bias"} and rep["dropped"] == []
    assert rep["pos_embed_resized"] == resized        # no_embed_class: every pos_embed entry is a patch's
    assert diff(feats(m, ref[f"x{size}"]), ref[f"feat_green_{size}"]) <= TOL


@pytest.mark.parametrize("size", [48, 32])
def test_visionfm_teacher_checkpoint_matches_its_loader(ref, size):
    m = visionfm(size)
    rep = load_pretrained(m, VISIONFM, verbose=False)
    conv = rep["convert"]
    assert conv["source_key"] == "teacher" and conv["stripped_prefix"] == "module.backbone."
    assert set(rep["missing"]) == {"head.weight", "head.bias"}
    assert rep["dropped"] and all(k.startswith("head.") for k in rep["dropped"])   # the iBOT projection head
    assert rep["pos_embed_resized"] == (None if size == 48 else (3, 2))
    assert diff(feats(m, ref[f"x{size}"]), ref[f"feat_visionfm_{size}"]) <= TOL


def test_student_of_an_ssl_checkpoint_is_never_read():
    obj = read_checkpoint(VISIONFM, keys=STATE_DICT_KEYS)
    assert sorted(obj) == ["teacher"]


def test_convert_cli_writes_the_teacher_backbone(tmp_path, ref, capsys):
    dst = str(tmp_path / "RETFound_dinov2_tiny.pdparams")
    assert convert_main([TEACHER, dst]) == 0
    out = capsys.readouterr().out
    assert "entry 'teacher', stripped prefix 'backbone.'" in out
    assert "renamed 8 MLP keys (mlp.w12. -> mlp.fc1., mlp.w3. -> mlp.fc2.)" in out
    assert "dropped 12 self-supervised head keys" in out and "dropped 1 mask token (--keep-decoder keeps them): mask_token" in out
    m = dinov2(56)
    rep = load_pretrained(m, dst, verbose=False)
    assert rep["format"] == "paddle" and rep["dropped"] == []
    assert diff(feats(m, ref["x56"]), ref["feat_dinov2_56"]) <= TOL


# ------------------------------------------------------------------------------------------- layouts
def test_parameter_names_are_timms():
    """LayerScale (blocks.N.ls1.gamma / ls2.gamma) and register tokens (reg_token) under timm's names: the key
    sets of the timm-saved fixtures are exactly the models' (heads aside where the file has none)."""
    ft = read_checkpoint(FINETUNED)["model"]
    assert set(create_model("dinov2_test", num_classes=3).state_dict()) == set(ft)
    assert {"blocks.1.ls1.gamma", "blocks.1.ls2.gamma", "norm.weight"} <= set(ft) and "fc_norm.weight" not in ft
    g = read_checkpoint(GREEN)
    assert set(green(56).state_dict()) - {"head.weight", "head.bias"} == set(g)
    assert g["reg_token"].shape == (1, 4, 32) and g["pos_embed"].shape == (1, 16, 32)   # patches only
    assert green(56).reg_token.shape == [1, 4, 32] and green(56).pos_embed.shape == [1, 16, 32]
    v = {k[len("module.backbone."):] for k in read_checkpoint(VISIONFM)["teacher"] if ".backbone." in k}
    assert set(visionfm(48).state_dict()) - {"head.weight", "head.bias"} == v


def test_chunked_dinov2_blocks_are_flattened():
    """DINOv2 saved with block chunks: blocks.<chunk>.<i>. (i counted from the first block) -> blocks.<i>."""
    plain = read_checkpoint(TEACHER)
    chunked = {"teacher": {k.replace("backbone.blocks.1.", "backbone.blocks.1.1.")
                           .replace("backbone.blocks.0.", "backbone.blocks.0.0."): v
                           for k, v in plain["teacher"].items()}}
    assert "backbone.blocks.1.1.ls1.gamma" in chunked["teacher"]
    a, _ = to_paddle_state_dict(plain, "torch")
    b, _ = to_paddle_state_dict(chunked, "torch")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    sd, dropped, stripped = unwrap_teacher({"module.backbone.x": np.zeros(1), "module.dino_head.y": np.ones(1)})
    assert list(sd) == ["x"] and dropped == ["module.dino_head.y"] and stripped == "backbone."


def test_wrong_family_is_refused_with_the_model_to_use():
    mae_like = VisionTransformer(input_size=56, patch_size=14, num_classes=5, embed_dim=32, depth=2, num_heads=2,
                                 global_pool=False)
    with pytest.raises(UserError, match=r"LayerScale .*use --model retfound_dinov2"):
        load_pretrained(mae_like, TEACHER, verbose=False)
    with pytest.raises(UserError, match="register tokens .*--model retfound_green"):
        load_pretrained(dinov2(56), GREEN, verbose=False)
    with pytest.raises(UserError, match=r"missing from the checkpoint \[blocks\.0\.ls1\.gamma"):
        load_pretrained(_dinov2(48, 3, 0.0, 32, 2, 2, patch_size=16), VISIONFM, verbose=False)


# ------------------------------------------------------------------------------------------- registry
def test_registered_configurations():
    sizes = {"retfound_dinov2": 224, "dinov2_vits14": 224, "dinov2_vitb14": 224, "dinov2_vitl14": 224,
             "retfound_green": 392, "visionfm": 224, "dinov2_test": 32, "retfound_green_test": 32,
             "visionfm_test": 32}
    assert {n: default_input_size(n) for n in sizes} == sizes
    assert resolve_model_name("RETFound_dinov2") == "retfound_dinov2"
    assert resolve_model_name("RETFound_dinov2", "retfound_dinov2") == "retfound_dinov2"
    assert resolve_model_name("Dinov2", "dinov2_vitb14") == "dinov2_vitb14"
    with pytest.raises(UserError, match="needs --model_arch"):
        resolve_model_name("Dinov2")
    with pytest.raises(UserError, match="ViT-g/14 .* not ported"):
        resolve_model_name("Dinov2", "dinov2_vitg14")
    with pytest.raises(UserError, match="the arch names model retfound_dinov2, not RETFound_mae"):
        resolve_model_name("RETFound_mae", "retfound_dinov2")
    g, v = create_model("retfound_green_test", 3), create_model("visionfm_test", 3)
    assert g.default_cfg["mean"] == g.default_cfg["std"] == (0.5, 0.5, 0.5) and g.default_cfg["crop_pct"] == 1.0
    assert g.default_cfg["interpolation"] == "bilinear"
    assert v.default_cfg["mean"] == pytest.approx((0.4237, 0.2609, 0.1284), abs=1e-4)
    d = create_model("dinov2_test", 3)
    assert d.default_cfg["mean"] == (0.485, 0.456, 0.406) and d.default_cfg["crop_pct"] == 224 / 256


def test_pooling_is_the_sources_whatever_global_pool_says():
    x = paddle.randn([2, 3, 32, 32])
    for name in ("dinov2_test", "retfound_green_test", "visionfm_test"):
        out = []
        for gp in (True, False):
            paddle.seed(3)
            m = create_model(name, num_classes=3, global_pool=gp).eval()
            assert m.pool_from_flag is False
            out.append(logits(m, x.numpy()))
        np.testing.assert_array_equal(out[0], out[1])
    assert create_model("dinov2_test", 3).fc_norm is None and create_model("retfound_green_test", 3).fc_norm is None


def test_layer_ids_and_weight_decay_of_the_new_parameters():
    g = create_model("retfound_green_test", num_classes=3)
    assert g.layer_id("reg_token") == 0 and g.layer_id("blocks.1.ls2.gamma") == 2 and g.layer_id("norm.weight") == 3
    assert g.no_weight_decay() == {"pos_embed", "cls_token", "reg_token"}
    assert create_model("dinov2_test", num_classes=3).no_weight_decay() == {"pos_embed", "cls_token"}


# ------------------------------------------------------------------------------------------- sources
@pytest.mark.parametrize("name,needles", [
    ("RETFound_dinov2_meh", ["YukunZhou/RETFound_dinov2_meh", "CC BY-NC 4.0", "access gated: yes",
                             "--model retfound_dinov2", "{'teacher': backbone.*"]),
    ("dinov2_vitl14_pretrain.pth", ["https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
                                    "Apache-2.0", "access gated: no", "--model dinov2_vitl14"]),
    ("retfoundgreen_statedict", ["releases/download/v0.1/retfoundgreen_statedict.pth", "non-commercial",
                                 "access gated: no", "--model retfound_green"]),
    ("VFM_Fundus_weights.pth", ["drive.google.com", "ABILab-CUHK/VisionFM", "CC BY-NC 4.0", "--model visionfm"]),
])
def test_missing_weights_error_names_source_licence_and_access(tmp_path, name, needles):
    weights = str(tmp_path / "weights")
    with pytest.raises(UserError) as e:
        find_weights(name, weights)
    msg = str(e.value)
    for n in needles:
        assert n in msg, n
    stem = os.path.splitext(name)[0]
    assert f"python -m models.convert {stem}.pth {os.path.join(weights, stem)}.pdparams" in msg
    assert "python -m models.list" in msg


def test_every_new_model_has_a_known_source_and_licence():
    covered = {m for s in PRETRAINED_SOURCES.values() for m in s.models}
    assert {"retfound_mae", "retfound_dinov2", "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "retfound_green",
            "visionfm"} <= covered
    licences = {s.name: s.licence for s in PRETRAINED_SOURCES.values()}
    assert licences["RETFound_mae_meh"] == licences["RETFound_dinov2_meh"] == "CC BY-NC 4.0"
    assert licences["dinov2_vitb14_pretrain"] == "Apache-2.0" and licences["VFM_Fundus_weights"] == "CC BY-NC 4.0"


def test_models_list_prints_the_table():
    proc = subprocess.run([sys.executable, "-m", "models.list"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, GLOG_minloglevel="2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    row = next(line for line in lines if line.startswith("RETFound_dinov2_meh.pth"))
    for cell in ("retfound_dinov2", "dinov2_teacher", "224", "CC BY-NC 4.0", "yes"):
        assert cell in row, cell
    row = next(line for line in lines if line.startswith("retfoundgreen_statedict.pth"))
    assert "retfound_green" in row and "392" in row and "non-commercial" in row
    assert any(line.startswith("ResNet50_pretrained.pdparams") and "Apache-2.0" in line for line in lines)
    assert any(line.startswith("dinov2_test") for line in lines)   # the models table lists every model
