"""export.py: every model family exports to a folder that ``load_predictor`` runs through Paddle Inference with
the checkpoint's own outputs (max |difference| <= 1e-5 at batch 1 and 3; for a regression grade, relative to its
size), carrying over what applying it needs (class names, thresholds, temperature) and where it came from (the
checkpoint's hash); an existing folder is replaced only with --overwrite, a failed check leaves no folder, and
bf16 runs where the CPU has it."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import export
from helpers import ROOT, make_checkpoint
from util.deploy import load_predictor
from util.errors import UserError
from util.exported import bf16_support

# family -> (input size, make_checkpoint options): the three tasks, thresholds and temperatures among them
FAMILIES = {
    "vit_test": (32, dict(task_type="multi_label", class_names=("dr", "amd", "glaucoma"),
                          thresholds=(0.3, 0.55, 0.7), temperature=1.6)),
    "resnet_test": (32, dict(task_type="regression", class_names=("0", "1", "2", "3", "4"),
                             thresholds=(0.4, 1.6, 2.5, 3.2))),
    "resnet50_test": (32, dict(temperature=0.8)),
    "efficientnet_test": (32, {}),
    "efficientnet_v2_test": (32, {}),
    "convnext_test": (32, dict(temperature=1.3)),
    "dual_retfound_test": (32, dict(task_type="multi_label", thresholds=(0.4, 0.5, 0.6))),
    "dual_resnet_test": (32, {}),
    "dual_convnext_test": (64, {}),   # its smallest input: four stages of 2x down-sampling after the 4x stem
}


def _lively_checkpoint(path, family, **options):
    """``make_checkpoint``, then every batch norm's running statistics set to those of its input on random
    images (as training leaves them) and the head scaled to logits of order 1: untrained EfficientNet blocks
    shrink the signal ~30x each, to logits of 1e-11 and probabilities that are all equal, which no comparison
    could tell apart."""
    import paddle

    import engine_finetune as engine
    from models import create_model
    from models.pretrained import load_state_dict_strict
    from util.outputs.checkpoint import read_toolkit_checkpoint, save_checkpoint

    make_checkpoint(path, model=family, **options)
    state = read_toolkit_checkpoint(str(path))
    task = engine.get_task(state["meta"]["task_type"])
    model = create_model(family, num_classes=task.num_outputs(state["meta"]["nb_classes"]),
                         input_size=state["meta"]["input_size"])
    load_state_dict_strict(model, state["model"], str(path))
    model.eval()

    def match_input(layer, inputs):
        x = inputs[0]
        layer._mean.set_value(x.mean(axis=[0, 2, 3]))
        layer._variance.set_value(x.var(axis=[0, 2, 3]) + 0.1)

    norms = [m for m in model.sublayers() if isinstance(m, (paddle.nn.BatchNorm, paddle.nn.BatchNorm2D))]
    hooks = [m.register_forward_pre_hook(match_input) for m in norms]
    views = getattr(model, "num_views", 1)
    size = state["meta"]["input_size"]
    x = np.random.default_rng(99).standard_normal([16] + ([views] if views > 1 else []) + [3, size, size])
    with paddle.no_grad():
        model(paddle.to_tensor(x.astype(np.float32)))
        for h in hooks:
            h.remove()
        # then logits up to about 3, as a trained classifier gives (the recalibrated EfficientNet reached 150)
        scale = float(model(paddle.to_tensor(x.astype(np.float32))).abs().max()) / 3
        for p in model.head.parameters():
            p.set_value(p / scale)
    extra = {k: state[k] for k in ("thresholds", "temperature") if k in state}
    save_checkpoint(str(path), model=model, epoch=0, best_score=0.0, meta=state["meta"], extra=extra)
    return str(path)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """family -> (checkpoint, export folder, metadata returned), each exported once for the module."""
    root = tmp_path_factory.mktemp("export")
    done = {}

    def get(family):
        if family not in done:
            size, options = FAMILIES[family]
            ckpt = _lively_checkpoint(root / f"{family}.pdparams", family, input_size=size, seed=len(done),
                                      **options)
            out = str(root / family)
            done[family] = ckpt, out, export.export_checkpoint(ckpt, out, threads=1, say=lambda line: None)
        return done[family]

    return get


def _inputs(predictor, n, seed=0):
    size = predictor.identity.input_size
    shape = [n, 3, size, size] if predictor.num_views == 1 else [n, 2, 3, size, size]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_outputs_match_the_checkpoint(exports, family):
    ckpt, out, _ = exports(family)
    exported, dygraph = load_predictor(out, threads=1), load_predictor(ckpt)
    assert exported.backend == "paddle" and exported.model is None and dygraph.backend == "dygraph"
    assert exported.num_views == dygraph.num_views == (2 if family.startswith("dual_") else 1)
    for n in (1, 3):
        x = _inputs(dygraph, n, seed=n)
        ours, ref = exported.outputs(x), dygraph.outputs(x)
        assert ours.shape == ref.shape == (n, dygraph.task.num_outputs(len(dygraph.class_names)))
        # probabilities to 1e-5; a regression grade (0-4) relative to its size, as export.py checks logits
        assert np.abs(ours - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    assert np.ptp(ref) > 0.01   # outputs that differ between inputs and classes: a comparison that can fail
    # the same decisions: the tuned thresholds and the temperature came along
    (cal_ours, dec_ours, cuts_ours), (cal_ref, dec_ref, cuts_ref) = exported.decide(ours), dygraph.decide(ref)
    assert np.array_equal(dec_ours, dec_ref) and np.abs(cal_ours - cal_ref).max() <= 1e-5
    assert (cuts_ours is None and cuts_ref is None) or np.array_equal(cuts_ours, cuts_ref)
    assert exported.temperature == dygraph.temperature
    assert exported.identity == dygraph.identity


def test_model_json_carries_what_predict_needs(exports):
    ckpt, out, returned = exports("vit_test")
    with open(os.path.join(out, "model.json"), encoding="utf8") as f:
        meta = json.load(f)
    assert meta == returned
    assert sorted(os.listdir(out)) == ["inference.json", "inference.pdiparams", "model.json"]
    assert meta["class_names"] == ["dr", "amd", "glaucoma"] and meta["task"] == "multi_label"
    assert meta["thresholds"] == [0.3, 0.55, 0.7] and meta["temperature"] == 1.6
    assert meta["input_size"] == 32 and meta["input_shape"] == [None, 3, 32, 32] and meta["num_views"] == 1
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    assert meta["preprocessing"]["fundus_crop"] == "none" and meta["global_pool"] is True
    with open(ckpt, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert meta["source_checkpoint"] == {"file": "vit_test.pdparams", "sha256": digest, "epoch": 0}
    assert meta["meta"]["model"] == "vit_test" and meta["meta"]["inference"]["interpolation"] == "bicubic"
    assert meta["paddle_version"] and meta["toolkit_version"] and meta["exported_at"].endswith("+00:00")
    assert meta["parity"]["paddle"]["max_abs_logit_diff"] <= 1e-5
    dual = exports("dual_resnet_test")[2]
    assert dual["input_shape"] == [None, 2, 3, 32, 32] and dual["num_views"] == 2
    regression = exports("resnet_test")[2]
    assert regression["num_outputs"] == 1 and regression["thresholds"] == [0.4, 1.6, 2.5, 3.2]
    assert regression["temperature"] is None


def test_an_existing_folder_is_replaced_only_with_overwrite(exports, tmp_path):
    ckpt, out, first = exports("resnet_test")
    with pytest.raises(UserError, match="not empty.*--overwrite"):
        export.export_checkpoint(ckpt, out, say=lambda line: None)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an export"):   # --overwrite replaces exports, nothing else
        export.export_checkpoint(ckpt, str(other), overwrite=True, say=lambda line: None)
    assert os.listdir(other) == ["keep.txt"]
    again = export.export_checkpoint(ckpt, out, overwrite=True, threads=1, say=lambda line: None)
    assert again["source_checkpoint"] == first["source_checkpoint"]
    assert sorted(os.listdir(out)) == ["inference.json", "inference.pdiparams", "model.json"]
    assert not [e for e in os.listdir(os.path.dirname(out)) if e.startswith(".")]   # nothing left beside it


def test_a_failed_check_leaves_no_folder(tmp_path, monkeypatch):
    import util.exported

    real = util.exported.paddle_runner

    def off_by_a_little(prefix, **kw):
        run = real(prefix, **kw)
        return lambda batch: run(batch) + 1e-3

    monkeypatch.setattr(util.exported, "paddle_runner", off_by_a_little)
    ckpt = make_checkpoint(tmp_path / "c.pdparams", model="resnet_test")
    with pytest.raises(UserError, match=r"differ from the model's by 0\.001.*no export was written"):
        export.export_checkpoint(ckpt, str(tmp_path / "out"), threads=1, say=lambda line: None)
    assert sorted(os.listdir(tmp_path)) == ["c.pdparams"]


def test_folders_that_are_not_exports(exports, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="without model.json.*export.py --resume"):
        load_predictor(str(tmp_path / "empty"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.json").write_text(json.dumps({"format": "onnx-zoo", "inputs": ["x"]}))
    with pytest.raises(UserError, match="not the model.json export.py writes"):
        load_predictor(str(tmp_path / "other"))
    _, out, _ = exports("resnet_test")
    with pytest.raises(UserError, match="--backend dygraph.*resnet_test.pdparams"):
        load_predictor(out, backend="dygraph")
    with pytest.raises(UserError, match="no ONNX model; export with --onnx"):
        load_predictor(out, backend="onnxruntime")


def test_bf16(exports):
    reason = bf16_support()
    if reason is not None:
        pytest.skip(f"bf16: {reason}")
    ckpt, out, _ = exports("convnext_test")
    bf16, fp32 = load_predictor(out, precision="bf16", threads=1), load_predictor(out, threads=1)
    assert bf16.precision == "bf16"
    x = _inputs(fp32, 4)
    diff = float(np.abs(bf16.outputs(x) - fp32.outputs(x)).max())
    print(f"bf16 vs fp32: max |probability difference| {diff:.2g}")
    assert 0 < diff <= 0.05   # above 0: bf16 kernels really ran


def test_onnx(tmp_path):
    from util.onnx_backend import onnx_unavailable

    reason = onnx_unavailable()
    if reason is not None:
        pytest.skip(f"--onnx: {reason}")
    ckpt = _lively_checkpoint(tmp_path / "c.pdparams", "dual_resnet_test", temperature=1.2)
    meta = export.export_checkpoint(ckpt, str(tmp_path / "out"), onnx=True, threads=1, say=lambda line: None)
    assert meta["onnx"] == "model.onnx" and os.path.isfile(tmp_path / "out" / "model.onnx")
    assert meta["parity"]["onnxruntime"]["max_abs_logit_diff"] <= 1e-5 * max(1.0, meta["parity"]["onnxruntime"]
                                                                              ["max_abs_logit"])
    onnx, dygraph = load_predictor(str(tmp_path / "out"), backend="onnxruntime", threads=1), load_predictor(ckpt)
    assert onnx.backend == "onnxruntime" and onnx.temperature == 1.2
    x = _inputs(dygraph, 3)
    assert np.abs(onnx.outputs(x) - dygraph.outputs(x)).max() <= 1e-5
    with pytest.raises(UserError, match="--precision bf16.*Paddle Inference"):
        load_predictor(str(tmp_path / "out"), backend="onnxruntime", precision="bf16")


def test_cli(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c.pdparams", model="vit_test", class_names=("x", "y"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOG_minloglevel": "2"}
    cmd = [sys.executable, os.path.join(ROOT, "export.py"), "--resume", ckpt, "--output", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "max|logit difference|" in done.stdout and f"exported vit_test to {tmp_path / 'out'}" in done.stdout
    with open(tmp_path / "out" / "model.json", encoding="utf8") as f:
        assert json.load(f)["class_names"] == ["x", "y"]
    assert export.main(["--resume", ckpt, "--output", str(tmp_path / "out")]) == 2   # not empty, no --overwrite
