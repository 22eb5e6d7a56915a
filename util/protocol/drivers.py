"""The three protocols as sub-runs of ``main_finetune.py`` (``runs.run_subruns``) and a summary (``summary``).

``<base>`` is the run folder the command would use without the protocol flag (``<output_dir>/<task>``, the
task defaulting to ``<model>_<data name>`` as in ``main_finetune.main``).

- ``run_seeds``: sub-runs ``<base>/<name>_seed<k>`` for k = 0..N-1 with ``--seed`` + k (the split stays the
  one ``--split_seed`` makes, as the RETFound protocol keeps its splits), then ``seeds_summary.csv/.md``.
  The reference has no convention of its own for this: its ``--seed`` seeds one run.
- ``run_kfold``: sub-runs ``<base>/<name>_fold<k>`` with ``--kfold K --fold k``, then ``kfold_summary.csv/.md``
  and ``kfold_predictions.csv`` (every fold's test predictions, a ``fold`` column first: the out-of-fold
  predictions of every row). Fold test sets that overlap (dataset code that ignores ``--kfold``) are reported.
- ``run_external``: the checkpoint of this command (trained here, in ``<base>``; or ``--eval --resume CKPT``,
  first scored as the plain ``--eval`` command would) evaluated on the test split of each ``--external``
  dataset in ``<base>/external/<name>/``, then ``external_summary.csv/.md``. An external dataset is read with
  its own defaults (format detected, its classes matched to the checkpoint's by name); only the flags of
  ``EVAL_FLAGS`` (how to run, not what to read) are passed on, and ``IDENTITY_FLAGS`` for a checkpoint that
  does not say which model it holds.

Each returns the exit status: 0 every sub-run finished, 1 some failed (the summary names them), 130
interrupted.
"""
from __future__ import annotations

import argparse
import csv
import os

from util.errors import UserError
from util.fileio import atomic_path
from util.protocol.options import external_paths
from util.protocol.runs import INTERRUPTED, StepSync, SubRun, is_main_process, run_subruns, say
from util.protocol.summary import write_external_summary, write_repeat_summary

# flags passed on to the evaluation of an external dataset: how to run it, not what to read
EVAL_FLAGS = ("batch_size", "num_workers", "device", "print_freq", "amp", "amp_dtype", "skip_image_check",
              "cache_dir", "pin_mem")
# ... and, for a checkpoint without the toolkit's identity record (a RETFound .pth), the flags that build its model
IDENTITY_FLAGS = ("model", "input_size", "global_pool", "nb_classes", "task_type", "crop_pct", "fundus_crop",
                  "fov_threshold", "preprocess_size")
# files in a folder that mean it holds one run of its own, not a protocol's sub-runs
_RUN_RECORDS = ("log.txt", "metrics_val.csv", "checkpoint-last.pdparams", "metrics_test.csv")


def base_folder(cfg: argparse.Namespace) -> str:
    """``<output_dir>/<task>``: the run folder of the command without the protocol flag."""
    if not cfg.output_dir:
        raise UserError("--output_dir '': a protocol writes its sub-runs and summary into the run folder "
                        "(--output_dir/--task); pass --output_dir")
    name = cfg.task
    if not name:
        from models import resolve_model_name

        data_name = os.path.splitext(os.path.basename(os.path.normpath(cfg.data_path)))[0]
        name = f"{resolve_model_name(cfg.model)}_{data_name}"
    return os.path.join(cfg.output_dir, name)


def _check_protocol_folder(base: str, what: str) -> None:
    found = [f for f in _RUN_RECORDS if os.path.exists(os.path.join(base, f))]
    if found:
        raise UserError(f"{base}: holds a run of its own ({', '.join(found)}), not the sub-runs of {what}; pick "
                        f"another --task or --output_dir for them")


def _status(subruns: list[SubRun], completed: bool) -> int:
    if not completed:
        return INTERRUPTED
    return 0 if all(s.ok for s in subruns) else 1


def _report(paths_lines: tuple[str, str, list[str]]) -> None:
    csv_path, md_path, lines = paths_lines
    say("", *lines, "", f"written: {csv_path}, {md_path}")


def _repeat(cfg, argv: list[str], script: str, kind: str, count: int, flags) -> int:
    """The seeds or kfold driver: ``flags(k)`` are the sub-run's own flags."""
    from util.outputs.run_folder import RunFolderLock

    base = base_folder(cfg)
    name = os.path.basename(os.path.normpath(base))
    what = "seed" if kind == "seeds" else "fold"
    _check_protocol_folder(base, f"--{kind} {count}")
    lock = RunFolderLock(base) if is_main_process() else None  # one driver per folder
    try:
        subruns = []
        for k in range(count):
            own, label = flags(k)
            sub = f"{name}_{what}{k}"
            subruns.append(SubRun(label, os.path.join(base, sub),
                                  [*argv, *own, "--output_dir", base, "--task", sub]))
        completed = run_subruns(subruns, script, f"--{kind} {count}: {name}", StepSync(base))
        if is_main_process():
            notes = _fold_predictions(base, subruns) if kind == "kfold" else []
            _report(write_repeat_summary(base, kind, subruns, what, notes))
        return _status(subruns, completed)
    finally:
        if lock is not None:
            lock.release()


def run_seeds(cfg: argparse.Namespace, argv: list[str], script: str) -> int:
    """``--seeds N``: N runs with seeds ``--seed`` + k, then ``seeds_summary.csv/.md`` (module docstring)."""
    return _repeat(cfg, argv, script, "seeds", cfg.seeds,
                   lambda k: (["--seeds", "0", "--seed", str(cfg.seed + k)], f"seed {cfg.seed + k}"))


def run_kfold(cfg: argparse.Namespace, argv: list[str], script: str) -> int:
    """``--kfold K``: a run per fold (``--kfold K --fold k``), then ``kfold_summary.csv/.md``."""
    return _repeat(cfg, argv, script, "kfold", cfg.kfold,
                   lambda k: (["--kfold", str(cfg.kfold), "--fold", str(k)], f"fold {k}"))


def _fold_predictions(base: str, subruns: list[SubRun]) -> list[str]:
    """``kfold_predictions.csv`` from the finished folds; lines for the summary when fold test sets overlap."""
    rows, header, seen, overlap = [], None, {}, []
    for k, sub in enumerate(subruns):
        path = os.path.join(sub.folder, "predictions_test.csv")
        if not (sub.ok or sub.status is None) or not os.path.isfile(path):  # None: not reached this time
            continue
        with open(path, newline="", encoding="utf8") as f:
            reader = csv.reader(f)
            head = next(reader, None)
            if head is None:
                continue
            header = header or head
            for r in reader:
                key = r[1] if len(r) > 1 else ""
                if key in seen and seen[key] != k:
                    overlap.append(key)
                seen.setdefault(key, k)
                rows.append([k, *r])
    if header is None:
        return []
    with atomic_path(os.path.join(base, "kfold_predictions.csv"), suffix=".csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf8") as f:
            w = csv.writer(f)
            w.writerow(["fold", *header])
            w.writerows(rows)
    if overlap:
        return ["", f"warning: {len(overlap)} test images are in the test split of more than one fold (e.g. "
                    f"{', '.join(overlap[:3])}): the folds are not a partition of the data, so these are not "
                    "cross-validation results; check that the data format supports --kfold"]
    return []


def _unique_names(paths: list[str]) -> list[str]:
    names, out = {}, []
    for p in paths:
        stem = os.path.splitext(os.path.basename(os.path.normpath(p)))[0] or "data"
        names[stem] = names.get(stem, 0) + 1
        out.append(stem if names[stem] == 1 else f"{stem}_{names[stem]}")
    return out


def _eval_flags(cfg: argparse.Namespace, checkpoint: str) -> list[str]:
    """The flags of an external evaluation: ``EVAL_FLAGS``; and ``IDENTITY_FLAGS`` when the checkpoint does
    not describe its model itself (a toolkit checkpoint does, and a flag would then have to agree with it)."""
    from util.run_config import checkpoint_meta

    keys = EVAL_FLAGS
    if not (checkpoint.lower().endswith(".pdparams") and os.path.isfile(checkpoint) and checkpoint_meta(checkpoint)):
        keys += IDENTITY_FLAGS if cfg.eval else ()  # trained here: a toolkit checkpoint
    out = []
    for key in keys:
        value = getattr(cfg, key, None)
        if value is None or value == "":
            continue
        if isinstance(value, bool):
            out.append(f"--{key}" if value else f"--no-{key}")
        else:
            out += [f"--{key}", str(value)]
    return out


def _trained_on(checkpoint: str) -> str | None:
    """The data path a toolkit checkpoint was trained on (its meta), or ``None``."""
    from util.run_config import checkpoint_meta

    meta = checkpoint_meta(checkpoint) if checkpoint.lower().endswith(".pdparams") else None
    return (meta or {}).get("data_path")


def run_external(cfg: argparse.Namespace, argv: list[str], script: str) -> int:
    """``--external B,C``: the checkpoint of this command on the test split of each dataset (module docstring)."""
    base = base_folder(cfg)
    plain = [*argv, "--external", ""]  # the command itself, without the protocol
    if cfg.eval:
        checkpoint = cfg.resume  # resolve_config made a run folder its checkpoint-best file
        trained = _trained_on(checkpoint)
        role = "internal" if trained and os.path.abspath(cfg.data_path) == os.path.abspath(trained) else "given"
        first = SubRun(os.path.splitext(os.path.basename(os.path.normpath(cfg.data_path)))[0], base, plain,
                       resumable=False, after=checkpoint, info={"role": role, "data_path": cfg.data_path})
    else:
        checkpoint = os.path.join(base, "checkpoint-best.pdparams")
        first = SubRun(os.path.splitext(os.path.basename(os.path.normpath(cfg.data_path)))[0], base, plain,
                       info={"role": "internal", "data_path": cfg.data_path})
    paths = external_paths(cfg.external)
    folder = os.path.join(base, "external")
    flags = _eval_flags(cfg, checkpoint)
    evals = [SubRun(name, os.path.join(folder, name),
                    ["--eval", "--resume", checkpoint, "--data_path", path, *flags, "--output_dir", folder, "--task",
                     name], resumable=False, after=checkpoint, info={"role": "external", "data_path": path})
             for name, path in zip(_unique_names(paths), paths)]
    title = f"--external: {os.path.basename(base)} on {len(paths)} dataset(s)"
    sync = StepSync(base)
    completed = run_subruns([first], script, title + (": --data_path" if cfg.eval else ": training"), sync)
    if completed:
        if os.path.isfile(checkpoint):
            completed = run_subruns(evals, script, title, sync)
        else:
            for sub in evals:
                sub.status = f"not run (no checkpoint {checkpoint})"
    if is_main_process():
        _report(write_external_summary(base, [first, *evals]))
    return _status([first, *evals], completed)
