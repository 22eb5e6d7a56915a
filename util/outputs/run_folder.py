"""One run per run folder, and a run folder that stays consistent through crashes.

* ``RunFolderLock``: an OS-level lock (``fcntl.flock`` on ``<run>/.lock``) held for the whole run, so two
  runs started on the same ``--output_dir``/``--task`` cannot interleave their rows or test each other's
  checkpoints. The kernel releases it when the process ends, however it ends (a SIGKILL included), so a
  crashed run never leaves a stale lock; the file records the holder's PID for the error message.
* ``check_new_run``: a training run without ``--resume`` refuses a folder that already holds another run's
  records, instead of appending to them.
* ``trim_to_epoch``: on resume, rows that epochs after the checkpoint wrote (a run killed after it logged an
  epoch but before that epoch's checkpoint was on disk) are dropped, so every per-epoch file keeps exactly
  one row per epoch whatever the number of kills; ``remove_stale_temporaries`` deletes the half-written
  temporary files (``.tmp-*``) such a kill leaves behind.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os

from util.errors import UserError
from util.fileio import atomic_path

LOCK_NAME = ".lock"
# files that mean "a training run has written here"
RUN_RECORDS = ("log.txt", "metrics_val.csv", "checkpoint-last.pdparams")


class RunFolderLock:
    """Exclusive lock on a run folder for the lifetime of this object (or until ``release``)."""

    def __init__(self, run_dir: str):
        import fcntl

        self.run_dir = run_dir
        try:
            os.makedirs(run_dir, exist_ok=True)
            self._fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
        except NotADirectoryError:
            raise UserError(f"--output_dir/--task {run_dir}: a file is in the way of the run folder (a folder "
                            "was expected); pick another --output_dir or --task") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise UserError(f"{run_dir}: another run (PID {holder}) is using this run folder; wait for it to "
                            "finish, or pick another --task or --output_dir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def check_new_run(run_dir: str) -> None:
    """Refuse to start a new training run in a folder that holds another run's records."""
    found = [name for name in RUN_RECORDS if os.path.exists(os.path.join(run_dir, name))]
    if found:
        raise UserError(f"{run_dir}: already holds a run ({', '.join(found)}); continue it with --resume "
                        f"{os.path.join(run_dir, 'checkpoint-last.pdparams')}, or start a new run with another "
                        "--task or --output_dir (two runs are never mixed in one folder)")


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Delete ``.tmp-*`` files left by a process killed while writing (call with the folder locked)."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(run_dir), ".tmp-*")):
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def _rewrite(path: str, text: str) -> None:
    with atomic_path(path, suffix=os.path.splitext(path)[1]) as tmp:
        with open(tmp, "w", encoding="utf8", newline="") as f:
            f.write(text)


def trim_to_epoch(run_dir: str, epoch: int, per_epoch_csvs=("metrics_val.csv",),
                  epoch_tagged_csvs=("per_class_val.csv",), say=None) -> dict[str, int]:
    """Drop the records of epochs after ``epoch`` (the epoch of the checkpoint being resumed).

    ``log.txt`` lines carry their epoch; ``epoch_tagged_csvs`` have an ``epoch`` column; ``per_epoch_csvs``
    have one row per epoch in order, as many as ``log.txt`` has lines for the epochs kept (both are written
    together, before the epoch's checkpoint). Returns the number of rows dropped per file (and tells
    ``say`` about them, if given).
    """
    dropped: dict[str, int] = {}
    log = os.path.join(run_dir, "log.txt")
    kept_epochs = 0
    if os.path.isfile(log):
        with open(log, encoding="utf8") as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        keep = []
        for ln in lines:
            try:
                rec_epoch = json.loads(ln).get("epoch")
            except ValueError:
                continue  # a line cut short by the kill
            if isinstance(rec_epoch, int) and rec_epoch <= epoch:
                keep.append(ln)
        kept_epochs = len(keep)
        if len(keep) != len(lines):
            dropped["log.txt"] = len(lines) - len(keep)
            _rewrite(log, "".join(ln + "\n" for ln in keep))
    for name in per_epoch_csvs:
        path, rows = _csv_rows(run_dir, name)
        if rows is None:
            continue
        if len(rows) - 1 > kept_epochs:
            dropped[name] = len(rows) - 1 - kept_epochs
            _rewrite(path, _csv_text(rows[:kept_epochs + 1]))
    for name in epoch_tagged_csvs:
        path, rows = _csv_rows(run_dir, name)
        if rows is None:
            continue
        if not rows or not rows[0] or rows[0][0] != "epoch":
            continue
        body = [r for r in rows[1:] if r and r[0].lstrip("-").isdigit() and int(r[0]) <= epoch]
        if len(body) != len(rows) - 1:
            dropped[name] = len(rows) - 1 - len(body)
            _rewrite(path, _csv_text([rows[0]] + body))
    if dropped and say is not None:
        say(f"resume: dropped the records of epochs after the checkpoint's epoch {epoch} ("
            + ", ".join(f"{n} row(s) of {k}" for k, n in dropped.items()) + ")")
    return dropped


def _csv_rows(run_dir: str, name: str) -> tuple[str, list[list[str]] | None]:
    """(path, rows) of a CSV in the run folder; rows is None when the file does not exist."""
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        return path, None
    with open(path, encoding="utf8", newline="") as f:
        return path, list(csv.reader(f))


def _csv_text(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def describe_interrupted(run_dir: str | None) -> str:
    """What an interrupted run leaves that a user can continue from."""
    last = os.path.join(run_dir, "checkpoint-last.pdparams") if run_dir else None
    if last and os.path.isfile(last):
        return (f"interrupted: {last} (the last saved epoch) is intact; continue with --resume {last}")
    return ("interrupted before the first epoch finished: no checkpoint was written"
            + (f" in {run_dir}" if run_dir else "") + "; start the run again")
