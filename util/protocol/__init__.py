"""Evaluation protocols on top of single runs: repeated seeds, K-fold cross-validation, external validation.

    python main_finetune.py ... --seeds 5             # 5 runs (seed, seed + 1, ...), mean and 95% t-interval
    python main_finetune.py ... --kfold 5             # 5 runs, fold k tested by run k (patient-level folds)
    python main_finetune.py ... --kfold 5 --fold 2    # fold 2 alone: a plain run
    python main_finetune.py --data_path A ... --external B,C      # train on A, then test on B and C
    python main_finetune.py --eval --resume RUN --external B,C    # an existing checkpoint on A (its own), B, C

A protocol is a driver that starts plain runs of ``main_finetune.py`` one after another (``runs``), each in
its own folder under the run folder, and then writes a summary table from their files (``summary``). Run
the same command again after an interruption or a failure: finished sub-runs are kept, a stopped training
run resumes from its last checkpoint, and the summary is rebuilt. ``main_finetune.cli`` hands every command
line to ``protocol_cli``, which runs the driver the flags ask for, or the plain run.

Paired comparisons of two runs on the same test set (bootstrap, DeLong) are ``tools/compare_runs.py`` over
``util.metrics.compare``.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

from util.protocol.drivers import run_external, run_kfold, run_seeds
from util.protocol.options import protocol_of, validate_protocol

DRIVERS = {"seeds": run_seeds, "kfold": run_kfold, "external": run_external}

__all__ = ["DRIVERS", "protocol_cli", "protocol_of", "run_external", "run_kfold", "run_seeds", "validate_protocol"]


def protocol_cli(argv: list[str] | None, script: str, main: Callable) -> int:
    """The exit status of ``main_finetune.py ARGV`` (``sys.argv[1:]`` when ``None``): the protocol driver the
    flags ask for, which starts ``python script ...`` once per sub-run (``script``: ``main_finetune.py``), or
    the plain run ``main(resolve_config(argv))``. Errors are reported as the plain run reports them
    (``util.cli.run_command``: ``error: ...``, exit status 2)."""
    from util.cli import run_command
    from util.config import resolve_config

    argv = list(sys.argv[1:] if argv is None else argv)
    resolved: list = []
    status = run_command(lambda: resolved.append(resolve_config(argv)))
    if status:
        return status
    kind = protocol_of(resolved[0])
    if kind is None:
        return run_command(lambda: main(resolve_config(argv)))  # resolved again: the run prints its notes
    result: list[int] = []
    status = run_command(lambda: result.append(DRIVERS[kind](resolved[0], argv, os.path.abspath(script))))
    return status or result[0]
