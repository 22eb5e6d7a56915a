"""Finding the weights ``--finetune`` names (``util.weights_files``) without Paddle: the seed presets' PaddleClas
file names in ``--weights_dir``, the lookup order, paths kept as paths, and missing-file advice that fits the
family of the weights (PaddleClas model zoo or RETFound on the Hugging Face hub)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from helpers import ROOT
from util.errors import UserError
from util.weights_files import PADDLECLAS_URL, PADDLECLAS_WEIGHTS, RETFOUND_URL, find_weights

CNN_PRESETS = ("multilabel_effb4", "external_eye_effb4", "dr_regression_effv2m", "odir_dual_convnext",
               "odir_dual_resnet50")


def preset(name: str) -> dict:
    with open(os.path.join(ROOT, "configs", f"{name}.yaml"), encoding="utf8") as f:
        return yaml.safe_load(f)


def missing_message(name: str, weights_dir: str) -> str:
    with pytest.raises(UserError) as e:
        find_weights(name, weights_dir)
    return str(e.value)


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from an empty folder, so a file is found only where the lookup is meant to look."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.mark.parametrize("name", CNN_PRESETS)
def test_cnn_preset_weights_are_a_paddleclas_file_the_preset_model_takes(name):
    cfg = preset(name)
    assert cfg["finetune"] in PADDLECLAS_WEIGHTS, cfg["finetune"]
    models, url = PADDLECLAS_WEIGHTS[cfg["finetune"]]
    assert cfg["model"] in models and url.endswith("/" + cfg["finetune"])


@pytest.mark.parametrize("name", CNN_PRESETS)
def test_cnn_preset_file_name_is_found_in_the_weights_dir(name, tmp_path, elsewhere):
    file_name = preset(name)["finetune"]
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / file_name).write_bytes(b"only existence matters here")
    assert find_weights(file_name, str(weights)) == str(weights / file_name)


def test_bare_file_name_is_looked_for_in_the_current_folder_then_the_weights_dir(tmp_path, elsewhere):
    weights = tmp_path / "weights"
    weights.mkdir()
    name = "ResNet50_pretrained.pdparams"
    (weights / name).write_bytes(b"x")
    assert find_weights(name, str(weights)) == str(weights / name)
    (elsewhere / name).write_bytes(b"x")
    assert find_weights(name, str(weights)) == name   # as before: the current folder's file is the one read
    msg = missing_message("ResNet18_pretrained.pdparams", str(weights))
    assert f"(looked at: ResNet18_pretrained.pdparams, {weights / 'ResNet18_pretrained.pdparams'})" in msg


def test_a_path_with_a_folder_is_not_looked_up_in_the_weights_dir(tmp_path, elsewhere):
    weights = tmp_path / "weights"
    weights.mkdir()
    name = "EfficientNetB4_pretrained.pdparams"
    (weights / name).write_bytes(b"x")
    given = os.path.join("sub", name)
    msg = missing_message(given, str(weights))
    assert f"(looked at: {given}; a path with a folder part is not looked up in {weights}/)" in msg
    assert PADDLECLAS_URL in msg and "Hugging Face" not in msg
    (elsewhere / "sub").mkdir()
    (elsewhere / "sub" / name).write_bytes(b"x")
    assert find_weights(given, str(weights)) == given


@pytest.mark.parametrize("name", CNN_PRESETS)
def test_missing_cnn_weights_give_paddleclas_advice_not_hugging_face(name, tmp_path, elsewhere):
    cfg = preset(name)
    file_name, weights = cfg["finetune"], str(tmp_path / "weights")
    msg = missing_message(file_name, weights)
    models, url = PADDLECLAS_WEIGHTS[file_name]
    assert f"looked at: {file_name}, {os.path.join(weights, file_name)})" in msg
    assert f"{file_name} is PaddleClas's ImageNet checkpoint for {', '.join(models)}" in msg
    assert PADDLECLAS_URL in msg and "Apache-2.0" in msg and url in msg
    assert f"copy it into {weights}/ (--weights_dir; run.sh passes WEIGHTS_DIR, default ./weights)" in msg
    for retfound_only in ("Hugging Face", "YukunZhou", "RETFound", "models.convert"):
        assert retfound_only not in msg


def test_other_paddleclas_name_points_to_the_closest_file_a_model_takes(tmp_path, elsewhere):
    msg = missing_message("efficientnetb4_pretrained.pdparams", str(tmp_path))
    assert "closest one this toolkit's models take is EfficientNetB4_pretrained.pdparams (efficientnet_b4)" in msg
    assert PADDLECLAS_URL in msg and "Hugging Face" not in msg


@pytest.mark.parametrize("name", ["RETFound_mae_meh", "RETFound_mae_meh.pth", "RETFound_mae_meh.pdparams",
                                  "RETFound_mae_meh.safetensors"])
def test_missing_retfound_name_keeps_the_retfound_advice(name, tmp_path, elsewhere):
    weights = str(tmp_path / "weights")
    msg = missing_message(name, weights)
    tried = [name + e for e in (".pth", ".pdparams", ".safetensors")] if "." not in name else [name]
    for t in tried:
        assert os.path.join(weights, t) in msg   # a bare RETFound file name is looked for in the weights dir
    assert "Hugging Face hub" in msg and "YukunZhou/RETFound_mae_meh" in msg and RETFOUND_URL in msg
    assert "licence" in msg
    assert f"python -m models.convert RETFound_mae_meh.pth {os.path.join(weights, 'RETFound_mae_meh')}.pdparams" in msg
    assert PADDLECLAS_URL not in msg


def test_bare_retfound_file_name_is_found_in_the_weights_dir(tmp_path, elsewhere):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "RETFound_mae_meh.pth").write_bytes(b"x")
    assert find_weights("RETFound_mae_meh.pth", str(weights)) == str(weights / "RETFound_mae_meh.pth")
    assert find_weights("RETFound_mae_meh", str(weights)) == str(weights / "RETFound_mae_meh.pth")


def test_importing_the_lookup_does_not_import_paddle():
    code = ("import sys; import util.weights_files; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('paddle', 'paddleclas', 'models')))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"
