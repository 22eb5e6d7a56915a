"""Run checkpoints: atomic writes, resume with a compatibility check, RNG state.

Every checkpoint is read through the restricted reader of ``models.checkpoint_io`` (never ``paddle.load``,
which is plain ``pickle.load``): a file that names anything but arrays, plain containers, numbers and
strings is refused before any of it runs. So the RNG state is stored as plain values too (Paddle's
``GeneratorState`` objects are converted to and from tuples here).

``checkpoint-last.pdparams`` is written after every epoch (model, optimizer, AMP scaler, epoch, best
score, RNG state, and the run's identity in ``meta``); ``checkpoint-best.pdparams`` whenever the
validation score improves. A file is written to a temporary name in the same folder and moved into place
with ``os.replace``, so a crash while writing leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random

import numpy as np
import paddle

from util.errors import UserError
from util.fileio import atomic_path

# Fields of ``meta`` that must agree for a resume to make sense.
RESUME_KEYS = ("model", "nb_classes", "class_names", "input_size", "global_pool", "data_path", "task_type")


def atomic_save(obj, path: str) -> None:
    """``paddle.save`` to ``path`` through a temporary file, so ``path`` is never half-written."""
    with atomic_path(path, suffix=".pdparams") as tmp:
        paddle.save(obj, tmp)


def _generator_to_plain(g) -> list:
    # GeneratorState pickles as (device, seed, offset, [bytes of the Mersenne Twister state as text]);
    # keep the same fields as plain values
    device, seed, offset, text, *rest = g.__getstate__()
    return [int(device), int(seed), int(offset), np.asarray(text, dtype=np.uint8), *rest]


def _generator_from_plain(fields):
    cls = type(paddle.get_rng_state()[0])
    device, seed, offset, text, *rest = fields
    g = cls.__new__(cls)
    g.__setstate__((int(device), int(seed), int(offset), [int(b) for b in np.asarray(text).reshape(-1)], *rest))
    return g


def seed_everything(seed: int) -> int:
    """Seed python's, numpy's and Paddle's generators with ``seed``; returns it."""
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)
    return seed


def rng_state() -> dict:
    """The python, numpy and paddle RNG states as plain values (tuples, lists, ints, numpy arrays)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "paddle": [_generator_to_plain(g) for g in paddle.get_rng_state()]}


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))  # pickled tuples may come back as lists
    np.random.set_state(tuple(state["numpy"]))
    paddle.set_rng_state([_generator_from_plain(f) for f in state["paddle"]])


def _param_names(model) -> dict[str, str]:
    """Paddle's generated parameter name (``linear_3.w_0``) -> structured name (``blocks.0.attn.qkv.weight``)."""
    return {p.name: n for n, p in model.named_parameters()}


def optimizer_state_by_name(optimizer, model) -> dict:
    """The optimizer's state dict keyed by structured parameter names.

    Paddle keys accumulators by generated names (``linear_3.w_0_moment1_0``) that depend on how many layers
    the process created before; structured names make a checkpoint resumable in any process.
    """
    generated = _param_names(model)
    out = {}
    for key, value in optimizer.state_dict().items():
        owner = max((g for g in generated if key.startswith(g + "_")), key=len, default=None)
        out[f"{generated[owner]}::{key[len(owner) + 1:]}" if owner else key] = value
    return out


def load_optimizer_state_by_name(optimizer, model, state: dict) -> None:
    """Inverse of ``optimizer_state_by_name`` for the parameters of ``model`` in this process."""
    structured = {n: p.name for n, p in model.named_parameters()}
    renamed = {}
    for key, value in state.items():
        name, sep, suffix = key.partition("::")
        if sep and name in structured:
            key = f"{structured[name]}_{suffix}"
            if hasattr(value, "name"):
                value.name = key
        renamed[key] = value
    optimizer.set_state_dict(renamed)


def save_checkpoint(path: str, *, model, optimizer=None, scaler=None, epoch: int, best_score: float,
                    meta: dict, extra: dict | None = None) -> None:
    """Write a resumable checkpoint atomically."""
    state = {
        "model": model.state_dict(),
        "epoch": epoch,
        "best_score": best_score,
        "meta": meta,
        "rng": rng_state(),
    }
    if optimizer is not None:
        state["optimizer"] = optimizer_state_by_name(optimizer, model)
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if extra:
        state.update(extra)
    atomic_save(state, path)


def _read(path: str):
    """The checkpoint's object tree (numpy arrays for tensors) through the restricted reader; a missing,
    unreadable or code-carrying file raises ``UserError`` (nothing from it runs)."""
    from models.checkpoint_io import read_checkpoint

    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint not found; pass an existing file to --resume")
    try:
        return read_checkpoint(path, mmap=False)
    except UserError:
        raise
    except Exception as exc:  # corrupt or foreign file
        raise UserError(f"{path}: could not read the checkpoint ({type(exc).__name__}: {exc}); "
                        "pass a checkpoint written by this toolkit, a converted .pdparams or a RETFound .pth") from exc


def load_checkpoint(path: str) -> dict:
    """Load one of our checkpoints; a missing or unreadable file raises ``UserError``."""
    state = _read(path)
    if not isinstance(state, dict) or "model" not in state:
        keys = list(state)[:10] if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path}: not a checkpoint of this toolkit (top-level keys {keys}, expected 'model')")
    return state


def is_toolkit_checkpoint(state) -> bool:
    return isinstance(state, dict) and "meta" in state and "model" in state


def read_toolkit_checkpoint(path: str) -> dict | None:
    """The checkpoint at ``path`` if this toolkit wrote it (``.pdparams`` with ``meta``), else ``None``
    (a RETFound ``.pth``, a converted state dict, ...); a missing file raises ``UserError``."""
    if path.lower().endswith(".pdparams"):
        state = _read(path)
        return state if is_toolkit_checkpoint(state) else None
    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint not found; pass an existing file to --resume")
    return None


def check_resume_compatible(saved_meta: dict, meta: dict, path: str) -> None:
    """Raise ``UserError`` listing every identity field that differs between a checkpoint and this run."""
    diffs = []
    for key in RESUME_KEYS:
        if key in saved_meta and key in meta and saved_meta[key] != meta[key]:
            diffs.append(f"{key}: checkpoint {saved_meta[key]!r} vs now {meta[key]!r}")
    if diffs:
        raise UserError(f"{path}: cannot resume, the run differs from the checkpoint's ("
                        + "; ".join(diffs) + "); resume with the original settings or start a new run "
                        "(use --finetune to start from its weights)")


def match_eval_classes(saved_meta: dict | None, class_names, task_type: str, data_path: str,
                       path: str) -> list[int] | None:
    """External validation on data that holds some of a checkpoint's classes: for each class of the data,
    its index among the checkpoint's classes (matched by name); ``None`` when the names are the same, in the
    same order, or the checkpoint has none. Classes the checkpoint does not know, or a regression grade
    scale that differs, raise ``UserError``."""
    saved = (saved_meta or {}).get("class_names")
    if saved is None or list(saved) == list(class_names):
        return None
    unknown = [c for c in class_names if c not in saved]
    if unknown or task_type == "regression" or len(set(class_names)) != len(list(class_names)):
        what = (f"has classes {unknown} the checkpoint does not know" if unknown else
                "grades a different scale" if task_type == "regression" else "repeats class names")
        raise UserError(f"{path}: the checkpoint was trained on classes {list(saved)} but the data at {data_path} "
                        f"{what} (its classes: {list(class_names)}); rename the class folders / label columns to "
                        "the checkpoint's names (a subset of them may be evaluated)")
    return [list(saved).index(c) for c in class_names]
