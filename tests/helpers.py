"""Test helpers: the repository root, the fixtures folder, synthetic class-folder datasets, a CLI runner and
warning checks. Imported by the tests as ``helpers`` (``tests/`` is on the path: conftest.py sits there)."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def make_class_folders(root, classes=("a", "b", "c"), counts=None, size=(40, 36), seed=0):
    """Write ``root/<split>/<class>/*.png`` with a class-dependent colour so a model can learn it."""
    counts = counts or {"train": 8, "val": 4, "test": 5}
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for ci, cls in enumerate(classes):
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                base = np.zeros((size[1], size[0], 3), dtype=np.float32)
                base[..., ci % 3] = 160 + 60 * (ci // 3)
                img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(folder, f"{cls}_{i}.png"))
    return str(root)




def run_cli(args, cwd=ROOT, timeout=600, env_extra=None):
    """Run ``python main_finetune.py ARGS`` in a subprocess; returns CompletedProcess (text)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, "main_finetune.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


TINY_ARGS = ["--model", "vit_test", "--input_size", "32", "--batch_size", "4", "--num_workers", "0",
             "--warmup_epochs", "1", "--blr", "1e-2", "--print_freq", "100"]


def call_quietly(fn, *a, **kw):
    """``fn(*a, **kw)``, asserting it warns about nothing."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn(*a, **kw)
    assert not rec, [str(w.message) for w in rec]
    return out


def call_with_one_warning(fn, category, *a, **kw):
    """``fn(*a, **kw)``, asserting exactly one warning of ``category``; returns (result, message)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn(*a, **kw)
    assert len(rec) == 1 and issubclass(rec[0].category, category), [str(w.message) for w in rec]
    return out, str(rec[0].message)


def make_checkpoint(path, model="vit_test", task_type="single_label", class_names=("a", "b", "c"), input_size=32,
                    thresholds=None, temperature=None, fundus_crop="none", seed=0, **identity):
    """A checkpoint as training writes it (meta, thresholds, temperature), for a randomly initialised model
    (seeded), without training: what predict.py, export.py and serve.py need, in well under a second."""
    import paddle

    import engine_finetune as engine
    from models import create_model
    from util.inference import RunIdentity
    from util.outputs.checkpoint import save_checkpoint

    paddle.seed(seed)
    task = engine.get_task(task_type)
    net = create_model(model, num_classes=task.num_outputs(len(class_names)), global_pool=True,
                       input_size=input_size)
    fields = dict(model=model, num_classes=len(class_names), class_names=tuple(class_names), input_size=input_size,
                  global_pool=True, data_path=str(path), task_type=task_type, mean=(0.485, 0.456, 0.406),
                  std=(0.229, 0.224, 0.225), fundus_crop=fundus_crop)
    fields.update(identity)
    extra = {}
    if thresholds is not None:
        extra["thresholds"] = [float(t) for t in thresholds]
    if temperature is not None:
        extra["temperature"] = float(temperature)
    save_checkpoint(str(path), model=net, epoch=0, best_score=0.0, meta=RunIdentity(**fields).meta(), extra=extra)
    return str(path)


def same_prediction_rows(got: list[dict], want: list[dict], tol: float = 1.5e-6) -> bool:
    """Result rows equal column by column; the probabilities, printed to 6 decimals, within one unit of the
    last decimal (``tol``). A matrix product of another batch size may round the last bit differently (MKL
    picks its kernel by shape), which can flip the 6th decimal; the decisions and text columns must match."""
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if list(g) != list(w):
            return False
        for key, value in w.items():
            try:
                if abs(float(g[key]) - float(value)) > tol:
                    return False
            except ValueError:
                if g[key] != value:
                    return False
    return True


def assert_same_tree(a, b, where: str = "state") -> None:
    """Every key, container type, array (dtype, shape, values) and scalar of ``a`` equals ``b``'s."""
    import numpy as np

    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, where
