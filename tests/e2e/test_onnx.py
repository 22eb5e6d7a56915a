"""End-to-end: every model family converts to ONNX (``util.onnx_backend.export_onnx``) and ONNX Runtime
(``onnx_runner``) returns the logits of the dygraph model, at batch 1 and 3; a program paddle2onnx cannot
convert fails with a ``UserError`` that names its operators and leaves no ``model.onnx``.

The programs are saved here with ``paddle.jit.save``, as ``export.py`` saves them, so these tests depend on
the ONNX backend only. The models are untrained; their batch norms are set from the statistics of a random
batch first, because at initialisation some families (efficientnet_test) shrink their activations to ~1e-11
and return the bias whatever the input, which no comparison of logits could fault.

Skipped when the optional extra (requirements-export.txt) is not installed, unless ``CI`` is set: CI
installs it, so there a missing extra fails.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from util.errors import UserError
from util.onnx_backend import ONNX_FILE, export_onnx, onnx_runner, onnx_unavailable, unsupported_ops

REASON = onnx_unavailable()
if REASON is not None and not os.environ.get("CI"):
    pytest.skip(REASON, allow_module_level=True)

FAMILIES = ["vit_test", "resnet_test", "resnet50_test", "efficientnet_test", "efficientnet_v2_test", "convnext_test",
            "dual_retfound_test", "dual_resnet_test", "dual_convnext_test"]
SIZE = 32
TOLERANCE = 1e-4   # max|logit difference|, relative to the logits' scale when it is above 1


def _save(layer, folder, shape: list) -> str:
    """``layer`` as export.py saves it: ``folder/inference.json`` + ``.pdiparams`` with a free batch."""
    import paddle

    spec = [paddle.static.InputSpec([None] + shape[1:], "float32", "x")]
    static = paddle.jit.to_static(layer, input_spec=spec, full_graph=True)
    paddle.jit.save(static, os.path.join(folder, "inference"), input_spec=spec)
    return str(folder)


def _set_batchnorm_statistics(model, x) -> None:
    """Each batch norm's running mean and variance := those of its input for the batch ``x`` (module docstring)."""
    import paddle

    def take_statistics(layer, inputs):
        axes = [0] + list(range(2, inputs[0].ndim))
        layer._mean.set_value(inputs[0].mean(axes))
        layer._variance.set_value(inputs[0].var(axes))

    hooks = [layer.register_forward_pre_hook(take_statistics) for layer in model.sublayers()
             if hasattr(layer, "_mean") and hasattr(layer, "_variance")]
    with paddle.no_grad():
        model(paddle.to_tensor(x))
    for hook in hooks:
        hook.remove()


def _model(name: str):
    import paddle

    from models import create_model

    paddle.seed(0)
    model = create_model(name, num_classes=3, global_pool=True, input_size=SIZE)
    model.eval()
    shape = [None, 3, SIZE, SIZE] if model.num_views == 1 else [None, model.num_views, 3, SIZE, SIZE]
    _set_batchnorm_statistics(model, np.random.default_rng(1).standard_normal([8] + shape[1:]).astype(np.float32))
    return model, shape


def test_extra_is_installed():
    assert REASON is None, REASON


@pytest.mark.parametrize("name", FAMILIES)
def test_onnxruntime_matches_dygraph(name, tmp_path):
    import paddle

    model, shape = _model(name)
    folder = _save(model, tmp_path, shape)
    assert unsupported_ops(os.path.join(folder, "inference")) == []   # the op analysis blames nothing here
    path = export_onnx(folder)
    assert path == os.path.join(folder, ONNX_FILE)
    assert sorted(os.listdir(folder)) == ["inference.json", "inference.pdiparams", ONNX_FILE]
    run = onnx_runner(folder, threads=2)
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal([batch] + shape[1:]).astype(np.float32)
        with paddle.no_grad():
            ref = model(paddle.to_tensor(x)).numpy()
        out = run(x)
        assert out.dtype == np.float32 and out.shape == ref.shape == (batch, 3)
        scale = float(np.abs(ref).max())
        diff = float(np.abs(out.astype(np.float64) - ref).max())
        assert diff <= TOLERANCE * max(1.0, scale), (name, batch, diff, scale)
    assert float(ref.std(axis=0).max()) > 1e-3, "the logits do not depend on the input; the comparison is vacuous"


def test_unconvertible_program_names_its_operators(tmp_path):
    """paddle2onnx 2.1 aborts on these without naming them; when a release converts them, this test says so."""
    import paddle
    import paddle2onnx

    class Unconvertible(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.fc = paddle.nn.Linear(4, 3)

        def forward(self, x):
            second, _ = paddle.kthvalue(x, 2, axis=-1)
            return self.fc(paddle.cummax(x, axis=-1)[0]) + second.unsqueeze(-1)

    folder = _save(Unconvertible(), tmp_path, [None, 4])
    with pytest.raises(UserError) as info:
        export_onnx(folder)
    message = str(info.value)
    assert "pd_op.cummax, pd_op.kthvalue" in message, message
    assert f"paddle2onnx {paddle2onnx.__version__}" in message and "--backend paddle" in message, message
    assert sorted(os.listdir(folder)) == ["inference.json", "inference.pdiparams"]


def test_too_low_opset_says_which_is_needed(tmp_path):
    model, shape = _model("vit_test")
    folder = _save(model, tmp_path, shape)
    with pytest.raises(UserError, match=r"--opset 10: this model needs opset 11 or higher"):
        export_onnx(folder, opset=10)
    assert ONNX_FILE not in os.listdir(folder)
    with pytest.raises(UserError, match=r"--opset 6: expected an integer of at least 7"):
        export_onnx(folder, opset=6)


def test_runner_without_onnx_model_says_how_to_export(tmp_path):
    with pytest.raises(UserError, match=r"model\.onnx: not found; export with --onnx"):
        onnx_runner(str(tmp_path))
