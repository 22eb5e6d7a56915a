"""``--resume`` and ``--eval --resume``: the checkpoint knows best.

A run folder holds ``config.yaml`` (the run's resolved config) beside its checkpoints, and every checkpoint
this toolkit writes holds the run's identity in ``meta`` (model, classes, input size, pooling, task,
preprocessing). So the command line does not have to repeat any of it:

- ``--resume RUN/checkpoint-last.pdparams`` (or ``--resume RUN``) continues the run with its own config.
  Flags given on the command line may change only what does not change the run (``RESUME_MAY_CHANGE``:
  ``--epochs`` to extend it, workers, device, logging, ...); any other flag that differs from the run's
  value is an error naming both values.
- ``--eval --resume CKPT`` (or ``--eval --resume RUN``, which picks ``checkpoint-best.pdparams``) builds the
  model the checkpoint describes: model, input size, pooling, task, fundus preprocessing and crop ratio come
  from its ``meta``; a flag that contradicts them is an error naming both values. Without ``--data_path``
  the run's own data (and its table options) are evaluated; with ``--data_path`` the new data is read with
  the flags given (external validation).

A checkpoint that this toolkit did not write (a RETFound ``.pth``) carries no identity: the flags decide.
"""
from __future__ import annotations

import argparse
import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from util.errors import UserError

RUN_CONFIG = "config.yaml"

# Flags a resumed training run may change: none of them changes what is being trained or how.
RESUME_MAY_CHANGE = frozenset({
    "config", "resume", "eval", "epochs", "num_workers", "device", "print_freq", "pin_mem", "cache_dir",
    "skip_image_check", "log_dir", "savemodel", "weights_dir", "patience", "output_dir", "task", "world_size",
    "local_rank", "dist_on_itp", "dist_url", "start_epoch", "calibrate", "explain", "save_last_every", "async_save",
})

# The data's location and how to read it: restored for --eval only when --data_path is not given.
DATA_KEYS = ("data_path", "data_format", "image_col", "label_cols", "grade_col", "split_col", "val_ratio",
             "test_ratio", "split_seed", "image_root", "left_col", "right_col", "patient_col", "eye_mode", "sheet",
             "allow_outside_paths", "kfold", "fold")

# cfg key -> where the checkpoint's meta keeps it ("inference" entries are one level down)
_META_KEYS = {"model": ("model",), "input_size": ("input_size",), "global_pool": ("global_pool",),
              "task_type": ("task_type",), "crop_pct": ("inference", "crop_pct"),
              "fundus_crop": ("inference", "fundus_crop"), "fov_threshold": ("inference", "fov_threshold"),
              "preprocess_size": ("inference", "preprocess_size")}

_FLAG_SPELLING = {"global_pool": "--global_pool / --cls_token"}


def _flag(key: str) -> str:
    return _FLAG_SPELLING.get(key, f"--{key}")


def resolve_checkpoint_path(resume: str, eval_only: bool) -> str:
    """``--resume`` as a file: a run folder stands for its ``checkpoint-best`` (``--eval``) or
    ``checkpoint-last`` (training) file."""
    if not resume or not os.path.isdir(resume):
        return resume
    name = "checkpoint-best.pdparams" if eval_only else "checkpoint-last.pdparams"
    path = os.path.join(resume, name)
    if not os.path.isfile(path):
        found = sorted(f for f in os.listdir(resume) if f.endswith((".pdparams", ".pth")))
        raise UserError(f"--resume {resume}: the folder has no {name} (found: {', '.join(found) or 'no checkpoint'}); "
                        "pass a run folder written by main_finetune.py, or the checkpoint file itself")
    return path


@functools.lru_cache(maxsize=4)
def checkpoint_meta(path: str) -> dict | None:
    """The identity record of a checkpoint this toolkit wrote, or ``None`` (another kind of file)."""
    from util.outputs.checkpoint import read_toolkit_checkpoint

    state = read_toolkit_checkpoint(path)
    if state is None or "inference" not in state.get("meta", {}):
        return None
    return state["meta"]


def _meta_value(meta: dict, where: tuple) -> Any:
    value = meta
    for k in where:
        if not isinstance(value, dict) or k not in value:
            return None
        value = value[k]
    return value


def _same(key: str, given: Any, saved: Any, model_arch: str | None = None) -> bool:
    if key == "model":  # (``model_arch``: the reference's --model Dinov2 --model_arch dinov2_vitl14)
        from models import resolve_model_name

        try:
            return resolve_model_name(given, model_arch) == resolve_model_name(saved)
        except UserError:
            return False
    if isinstance(given, float) or isinstance(saved, float):
        try:
            return abs(float(given) - float(saved)) <= 1e-9 * max(1.0, abs(float(saved)))
        except (TypeError, ValueError):
            return False
    if isinstance(given, (list, tuple)) or isinstance(saved, (list, tuple)):
        return list(given or []) == list(saved or [])
    return given == saved


def restore_run(cfg: argparse.Namespace, explicit: dict, run_config: dict | None = None) -> list[str]:
    """Fill ``cfg`` from what ``cfg.resume`` knows (see the module docstring), in place; ``explicit`` holds
    the flags given on the command line, ``run_config`` the run folder's ``config.yaml`` (read by the caller,
    ``None`` when there is none). Returns the lines to print; raises ``UserError`` on a contradiction."""
    if not cfg.resume:
        return []
    cfg.resume = resolve_checkpoint_path(cfg.resume, cfg.eval)
    return _restore_eval(cfg, explicit, run_config) if cfg.eval else _restore_training(cfg, explicit, run_config)


def _restore_training(cfg, explicit: dict, run_config: dict | None) -> list[str]:
    run_dir = os.path.dirname(os.path.abspath(cfg.resume))
    if run_config is None:
        return []  # a checkpoint outside its run folder: the flags (and the resume check of its meta) decide
    clashes = [f"{_flag(k)} {explicit[k]!r} (the run used {v!r})" for k, v in run_config.items()
               if k in explicit and k not in RESUME_MAY_CHANGE
               and not _same(k, explicit[k], v, explicit.get("model_arch"))]
    if clashes:
        raise UserError(f"--resume {cfg.resume}: the command line changes the run: " + "; ".join(clashes)
                        + f" (a resumed run keeps its config, {os.path.join(run_dir, RUN_CONFIG)}; only "
                        + ", ".join(f"--{k}" for k in sorted(RESUME_MAY_CHANGE - {'config', 'resume', 'eval'}))
                        + " may change); drop those flags, or start a new run with --finetune "
                        + f"{cfg.resume} to begin from its weights")
    for key, value in run_config.items():
        if key not in explicit and key not in ("resume", "eval", "config"):
            setattr(cfg, key, value)
    if "output_dir" not in explicit and "task" not in explicit:  # this folder, wherever the run was started
        cfg.output_dir, cfg.task = os.path.dirname(run_dir), os.path.basename(run_dir)
    return [f"resume: the run's config from {os.path.join(run_dir, RUN_CONFIG)}"
            + (f" (given on the command line: {', '.join(sorted(k for k in explicit if k != 'resume'))})"
               if set(explicit) - {"resume"} else "")]


def _restore_eval(cfg, explicit: dict, run_config: dict | None) -> list[str]:
    meta = checkpoint_meta(cfg.resume) if cfg.resume.lower().endswith(".pdparams") else None
    if meta is None:
        return []
    clashes, restored = [], []
    if "nb_classes" in explicit and explicit["nb_classes"] != meta.get("nb_classes"):
        clashes.append(f"--nb_classes {explicit['nb_classes']!r} (the checkpoint's is {meta.get('nb_classes')!r})")
    for key, where in _META_KEYS.items():
        saved = _meta_value(meta, where)
        if saved is None and key != "crop_pct":
            continue
        if key in explicit:
            if not _same(key, explicit[key], saved, explicit.get("model_arch")):
                clashes.append(f"{_flag(key)} {explicit[key]!r} (the checkpoint's is {saved!r})")
            continue
        if saved is not None and getattr(cfg, key, None) != saved:
            restored.append(key)
        setattr(cfg, key, saved)
    if clashes:
        raise UserError(f"--eval --resume {cfg.resume}: the command line contradicts the checkpoint: "
                        + "; ".join(clashes) + " (the model would be built or fed differently from how it was "
                        "trained); leave those flags out: the checkpoint's values are used")
    lines = []
    if run_config is not None and "data_path" not in explicit:
        for key in DATA_KEYS:
            if key in run_config and key not in explicit:
                setattr(cfg, key, run_config[key])
        lines.append(f"eval: the run's data {run_config.get('data_path')} (from its {RUN_CONFIG}); pass --data_path "
                     "to evaluate other data")
    lines.insert(0, f"eval: model {meta['model']}, input {meta['input_size']} px, task {meta['task_type']}, "
                    f"{len(meta.get('class_names') or [])} classes and the preprocessing from the checkpoint")
    return lines


def read_run_config(resume: str, eval_only: bool, load_preset) -> dict | None:
    """The ``config.yaml`` beside the checkpoint ``resume`` stands for (``None`` when there is none), read
    with ``load_preset`` (the strict preset reader)."""
    if not resume:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(resolve_checkpoint_path(resume, eval_only))), RUN_CONFIG)
    return load_preset(path) if os.path.isfile(path) else None


@dataclass
class EvalClasses:
    """How the data's classes meet the checkpoint's in ``--eval`` (see ``match_eval_classes``)."""
    model_classes: list  # the checkpoint's class names: the model is built and loaded with these
    class_names: list  # the names the metrics report
    macro_over: list | None = None  # single-label: the classes present (the macro averages run over them)
    columns: list | None = None  # multi-label: the model's output columns that the data has labels for

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def apply(self, model, thresholds):
        """(model, thresholds, class names, class count) for scoring the data: multi-label keeps the output
        columns and tuned thresholds of the labels the data has."""
        if self.columns is not None:
            from util.inference import SelectOutputs

            model = SelectOutputs(model, self.columns)
            thresholds = None if thresholds is None else [thresholds[c] for c in self.columns]
        return model, thresholds, self.class_names, self.num_classes


def eval_classes(datasets: dict, checkpoint: str, data_path: str, say) -> EvalClasses | None:
    """For ``--eval`` of a toolkit checkpoint on data holding a subset of its classes (matched by name):
    relabel single-label data into the checkpoint's class indices, or pick the multi-label outputs the data
    has labels for, and say which classes are absent. ``None``: the classes agree (or nothing is known)."""
    from util.outputs.checkpoint import match_eval_classes

    meta = checkpoint_meta(checkpoint) if checkpoint.lower().endswith(".pdparams") else None
    first = next(iter(datasets.values()))
    index = match_eval_classes(meta, list(first.class_names), first.task_type, data_path, checkpoint)
    if index is None:
        return None
    saved = list(meta["class_names"])
    absent = [c for i, c in enumerate(saved) if i not in index]
    if first.task_type == "multi_label":
        out = EvalClasses(saved, list(first.class_names), columns=index)
    else:
        mapping = np.asarray(index, dtype=np.int64)
        for ds in datasets.values():
            ds.targets = mapping[ds.targets]
            ds.class_names = list(saved)
        out = EvalClasses(saved, saved, macro_over=sorted(index))
    say(f"eval: the data at {data_path} holds {len(index)} of the checkpoint's {len(saved)} classes (matched by "
        f"name); absent: {', '.join(absent) or 'none'}; "
        + ("the metrics cover the labels present" if out.columns is not None else
           "macro averages run over the classes present, accuracy and kappa count every prediction"))
    return out
