"""``--dataratio a,b,c``: one run per ratio of the training split (``util/adaptation.py`` draws the subsets),
as sub-runs of the evaluation-protocol driver, with a summary row of test metrics per ratio."""
from __future__ import annotations

import csv
import os

from util.adaptation import parse_dataratio, ratio_name
from util.errors import UserError


def run_ratio_sweep(cfg, script: str) -> dict[str, dict]:
    """``--dataratio a,b,c``: run ``script`` once per ratio, as sub-runs of the evaluation-protocol driver
    (``util.protocol.runs``: one child process each, finished ones kept and a stopped one resumed when the same
    command runs again), in ``<output_dir>/<task>/<task>_ratio<r>/``; then ``dataratio_summary.csv`` beside
    them, one row of test metrics per ratio. The children read the resolved config from
    ``<task>/dataratio_config.yaml`` with ``--dataratio r``. Returns {ratio: that row}."""
    from util.config import save_config
    from util.fileio import atomic_path
    from util.outputs.run_folder import RUN_RECORDS, RunFolderLock
    from util.protocol.drivers import base_folder
    from util.protocol.runs import StepSync, SubRun, is_main_process, run_subruns, say

    parent = base_folder(cfg)  # <output_dir>/<task>, the folder of the command without the list
    name = os.path.basename(os.path.normpath(parent))
    found = [f for f in (*RUN_RECORDS, "metrics_test.csv") if os.path.exists(os.path.join(parent, f))]
    if found:
        raise UserError(f"{parent}: holds a run ({', '.join(found)}), not the sub-runs of a --dataratio list (expected "
                        "a new folder or one of an earlier --dataratio command); pass another --task or --output_dir")
    os.makedirs(parent, exist_ok=True)
    lock = RunFolderLock(parent) if is_main_process() else None  # one driver per folder
    try:
        preset = save_config(cfg, os.path.join(parent, "dataratio_config.yaml"))  # every rank: before its child
        subs = {}  # ratio as written in the folder name -> its sub-run
        for r in parse_dataratio(cfg.dataratio):
            task = f"{name}_{ratio_name(r)}"
            argv = ["--config", preset, "--dataratio", f"{r:g}", "--output_dir", parent, "--task", task]
            subs[f"{r:g}"] = SubRun(f"ratio {r:g}", os.path.join(parent, task), argv)
        complete = run_subruns(list(subs.values()), script,
                               f"--dataratio {cfg.dataratio}{' --stratified' if cfg.stratified else ''}: {name}",
                               StepSync(parent))
        rows: dict[str, dict] = {}
        for ratio, sub in subs.items():
            path = os.path.join(sub.folder, "metrics_test.csv")
            if sub.ok and os.path.isfile(path):
                with open(path, encoding="utf8", newline="") as f:
                    rows[ratio] = (list(csv.DictReader(f)) or [{}])[-1]
        columns = list(dict.fromkeys(k for row in rows.values() for k in row))
        summary = os.path.join(parent, "dataratio_summary.csv")
        if is_main_process():
            with atomic_path(summary, suffix=".csv") as tmp, open(tmp, "w", encoding="utf8", newline="") as f:
                writer = csv.DictWriter(f, ["ratio", "run", "status", *columns], extrasaction="ignore")
                writer.writeheader()
                for ratio, sub in subs.items():
                    writer.writerow({"ratio": ratio, "run": sub.name, "status": sub.status, **rows.get(ratio, {})})
    finally:
        if lock is not None:
            lock.release()
    shown = [c for c in columns if c not in ("val_loss", "epoch", "checkpoint_epoch", "timestamp")][:3]
    say(f"=== --dataratio summary: {summary}",
        *(f"    ratio {r}: " + ", ".join(f"test {c} {float(row[c]):.4f}" for c in shown if row.get(c))
          for r, row in rows.items()))
    if not complete:
        raise KeyboardInterrupt
    failed = [sub.label for sub in subs.values() if not sub.ok]
    if failed:
        raise UserError(f"--dataratio {cfg.dataratio}: {', '.join(failed)} failed (their output is above; expected "
                        f"every ratio's run to finish); fix the cause and run the same command again (finished "
                        f"ratios are kept)")
    return rows


# ----------------------------------------------------------------------------------------------- freezing
