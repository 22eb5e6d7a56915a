"""A normal run prints no warning the toolkit causes itself: Paddle's OMP_NUM_THREADS notice, the ccache
UserWarning of ``import paddle``, the BatchNorm2D notice of EfficientNet-V2 training."""
import os
import subprocess
import sys
import warnings

import numpy as np
import paddle

from helpers import ROOT, TINY_ARGS, make_class_folders
from models import create_model
from models.efficientnet import _QuietBatchNorm2D

BN_NOTICE = "we now always track global mean and variance"


def _clean_env(**extra):
    """This environment without the settings under test: OMP_NUM_THREADS unset (the entry point decides) and
    no PYTHONWARNINGS (a filter from outside would hide what the code itself prints)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONWARNINGS")}
    env.update(extra)
    return env


def test_efficientnet_v2_trains_a_step_without_the_batch_norm_notice():
    paddle.seed(0)
    model = create_model("efficientnet_v2_test", num_classes=3)
    norms = [m for m in model.sublayers() if isinstance(m, paddle.nn.BatchNorm2D)]
    assert len(norms) > 10  # the notice came from these
    opt = paddle.optimizer.AdamW(learning_rate=1e-3, parameters=model.parameters())
    model.train()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        loss = model(paddle.randn([2, 3, 32, 32])).mean()
        loss.backward()
        opt.step()
        opt.clear_grad()
    assert not [str(w.message) for w in rec if BN_NOTICE in str(w.message)]
    assert all(type(m) is _QuietBatchNorm2D for m in norms)


def _bn_pair(channels=4):
    paddle.seed(1)
    ref = paddle.nn.BatchNorm2D(channels, momentum=0.9, epsilon=1e-3)
    ours = paddle.nn.BatchNorm2D(channels, momentum=0.9, epsilon=1e-3)
    ours.set_state_dict(ref.state_dict())
    with paddle.no_grad():
        ref.weight.set_value(paddle.rand([channels]) + 0.5)
        ref.bias.set_value(paddle.rand([channels]))
    ours.set_state_dict(ref.state_dict())
    ours.__class__ = _QuietBatchNorm2D
    return ref, ours


def test_quiet_batch_norm_computes_what_paddle_does():
    ref, ours = _bn_pair()
    x = paddle.randn([3, 4, 5, 5]) * 2 + 1
    for training in (True, True, False):  # two training steps move the running statistics, then eval
        ref.train(training)
        ours.train(training)
        xr, xo = x.clone(), x.clone()
        xr.stop_gradient = xo.stop_gradient = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Paddle's own layer still warns
            yr = ref(xr)
        yo = ours(xo)
        np.testing.assert_array_equal(yo.numpy(), yr.numpy())
        (yr * yr).sum().backward()
        (yo * yo).sum().backward()
        np.testing.assert_array_equal(xo.grad.numpy(), xr.grad.numpy())
        np.testing.assert_array_equal(ours.weight.grad.numpy(), ref.weight.grad.numpy())
        for key, value in ref.state_dict().items():
            np.testing.assert_array_equal(ours.state_dict()[key].numpy(), value.numpy(), err_msg=key)
        ref.clear_gradients()
        ours.clear_gradients()


def test_models_convert_prints_no_ccache_warning():
    # needs the ccache filter at the top of models/__init__.py (the package `python -m models.convert` imports)
    res = subprocess.run([sys.executable, "-m", "models.convert", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=_clean_env())
    assert res.returncode == 0 and "usage" in res.stdout, res.stderr
    assert "ccache" not in res.stderr, res.stderr
    assert "Warning" not in res.stderr, res.stderr


def test_a_tiny_run_prints_no_omp_num_threads_warning(tmp_path):
    # needs main_finetune.py to hand the thread count to Paddle instead of setting OMP_NUM_THREADS (see
    # util/threads.py). helpers.run_cli always sets OMP_NUM_THREADS=1, which hides the warning, so the command
    # is run here without it.
    data = make_class_folders(tmp_path / "data", counts={"train": 4, "val": 2, "test": 2}, size=(24, 24))
    args = [*TINY_ARGS, "--data_path", data, "--epochs", "1", "--output_dir", tmp_path / "out"]
    res = subprocess.run([sys.executable, os.path.join(ROOT, "main_finetune.py"), *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=_clean_env())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "OMP_NUM_THREADS" not in res.stderr + res.stdout, res.stderr
    assert "ccache" not in res.stderr, res.stderr
