"""Run outputs: console progress, ``log.txt`` JSON lines, metric CSVs and VisualDL scalars.

Only the main process writes; other ranks get a ``RunLogger`` whose writers are no-ops.
VisualDL (``visualdl --logdir <output_dir>``) shows ``train/loss`` and ``train/lr`` at every optimizer
step and ``val/loss``, ``val/<metric>`` per epoch; ``log.txt`` has ``train_loss``, ``val_loss``,
``val_<metric>``: each name says its split once (``metric_name``).
"""
from __future__ import annotations

import csv
import json
import math
import os

# engine_finetune.evaluate names its mean loss ``val_loss`` (the reference's CSV column) whatever split it
# scored; where a split prefix is added (log.txt, VisualDL, the console) the bare name is used instead
EVAL_LOSS_KEY = "val_loss"


def metric_name(key: str) -> str:
    """A metric's name without a split, for a split prefix to go in front: ``val_loss`` -> ``loss``."""
    return "loss" if key == EVAL_LOSS_KEY else key


def _clean(value):
    """JSON/CSV-friendly value: numpy scalars to Python, NaN kept as float('nan')."""
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:
        value = value.item()
    return value


class RunLogger:
    def __init__(self, run_dir: str | None, log_dir: str | None = None, enabled: bool = True):
        self.enabled = enabled and run_dir is not None
        self.run_dir = run_dir
        self.writer = None
        if self.enabled:
            os.makedirs(run_dir, exist_ok=True)
            from visualdl import LogWriter

            self.writer = LogWriter(logdir=log_dir or run_dir)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None and value is not None and math.isfinite(float(value)):
            self.writer.add_scalar(tag=tag, value=float(value), step=int(step))

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        for k, v in values.items():
            v = _clean(v)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.scalar(f"{prefix}/{k}", _clean(v), step)

    def json_line(self, record: dict, name: str = "log.txt") -> None:
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        # standard JSON has no NaN: an undefined metric is written as null
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
                  if isinstance(v, (int, float, str, bool, type(None)))}
        with open(os.path.join(self.run_dir, name), "a", encoding="utf8") as f:
            f.write(json.dumps(record) + "\n")

    def csv_row(self, name: str, columns: list[str], values: dict, fresh: bool = False) -> None:
        """Append a row to ``name`` in the run folder, writing the header when the file is new; ``fresh``
        starts the file anew (a table of one evaluation)."""
        if not self.enabled:
            return
        path = os.path.join(self.run_dir, name)
        new = fresh or not os.path.isfile(path)
        if not new:  # a resumed run appends in the file's own columns (a file begun by an older version)
            with open(path, newline="", encoding="utf8") as f:
                header = next(csv.reader(f), None)
            new = not header
            columns = header or columns
        with open(path, "w" if fresh else "a", newline="", encoding="utf8") as f:
            w = csv.writer(f)
            if new:
                w.writerow(columns)
            w.writerow([_clean(values.get(c, float("nan"))) for c in columns])

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


