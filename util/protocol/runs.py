"""Sub-runs of a protocol: plain runs of ``main_finetune.py``, one after another, each in a child process.

A child process per sub-run keeps them apart: a crash, an out-of-memory kill or a diverged seed ends that
sub-run only, each starts with fresh Paddle state and seeds, and under ``paddle.distributed.launch`` every
rank's driver starts its own child with the launcher's environment, so the children of one sub-run form the
process group together. A sub-run is told apart by its folder:

- finished (``FINISHED_FILES`` present, newer than ``after``'s file when given): kept, not run again;
- unfinished with a ``checkpoint-last.pdparams`` (a training run that was stopped): resumed from it;
- otherwise: started (a folder holding another run's records makes the child refuse, with its own message).

Ctrl-C reaches the child too (it leaves its checkpoint and says so); the driver waits for it and stops. A
SIGTERM to the driver alone is passed on to the child first.

Under ``paddle.distributed.launch`` (one machine) the ranks' drivers move on together (``StepSync``): a rank
starts the next child only once rank 0's child has exited, since rank 0's process holds the store the
others join; rank 0 says so with an empty marker file in the protocol folder, which the others wait for.
"""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from util.errors import UserError

FINISHED_FILES = ("metrics_test.csv", "metrics_test_ci.csv", "predictions_test.csv")
INTERRUPTED = 130


@dataclass
class SubRun:
    """One run of the protocol: ``label`` for the console and the summary (``seed 3``, ``fold 1``,
    ``IDRiD``), ``folder`` its run folder, ``argv`` the flags of its ``main_finetune.py`` command (which name
    ``folder`` through ``--output_dir``/``--task``), ``resumable``: a training run (resumed from its
    checkpoint-last when stopped), ``after``: a file the results must be newer than (an evaluation's
    checkpoint), ``status``: ``None`` until run, then 'kept', 'done', 'interrupted' or 'failed (exit status N)'."""
    label: str
    folder: str
    argv: list[str]
    resumable: bool = True
    after: str | None = None
    status: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.folder))

    @property
    def ok(self) -> bool:
        return self.status in ("kept", "done")


def is_finished(folder: str, after: str | None = None) -> bool:
    """Every ``FINISHED_FILES`` present in ``folder`` (and newer than the file ``after``, when it exists)."""
    paths = [os.path.join(folder, f) for f in FINISHED_FILES]
    if not all(os.path.isfile(p) for p in paths):
        return False
    if after is not None and os.path.isfile(after):
        return min(os.path.getmtime(p) for p in paths) >= os.path.getmtime(after)
    return True


def is_main_process() -> bool:
    """Rank 0 of a ``paddle.distributed.launch`` run (read from the launcher's environment: no Paddle here)."""
    return int(os.environ.get("PADDLE_TRAINER_ID", "0") or 0) == 0


class StepSync:
    """The ranks of a launched run finish each sub-run together (module docstring); a no-op otherwise."""

    PREFIX = ".protocol-sync-"

    def __init__(self, folder: str):
        self.on = int(os.environ.get("PADDLE_TRAINERS_NUM", "1") or 1) > 1
        self.folder, self.count = folder, 0
        self.token = os.environ.get("POD_NAME") or str(os.getppid())  # one launch: the same on every rank
        if self.on and int(os.environ.get("PADDLE_NNODES", "1") or 1) > 1:
            raise UserError("a protocol (--seeds, --kfold, --external) under a launch over several machines: the "
                            "ranks keep in step through files in the run folder, which the other machines do not "
                            "see (one machine only); run each sub-run as its own launch, e.g. --seed k --task "
                            "<task>_seed<k>, or launch on one machine")
        if self.on and is_main_process():
            os.makedirs(folder, exist_ok=True)
            for old in glob.glob(os.path.join(glob.escape(folder), self.PREFIX + "*")):
                if not os.path.basename(old).startswith(f"{self.PREFIX}{self.token}-"):
                    os.remove(old)  # an earlier launch's

    def step_done(self) -> None:
        """Rank 0: its child has exited; other ranks: wait for that."""
        if not self.on:
            return
        marker = os.path.join(self.folder, f"{self.PREFIX}{self.token}-{self.count}")
        self.count += 1
        if is_main_process():
            os.makedirs(self.folder, exist_ok=True)
            open(marker, "w").close()
            return
        while not os.path.exists(marker):
            time.sleep(0.2)


def say(*lines: str) -> None:
    if is_main_process():
        for line in lines:
            print(line, flush=True)


def _wait(proc: subprocess.Popen) -> tuple[int, bool]:
    """The child's exit status and whether the driver was interrupted meanwhile (Ctrl-C reaches the child
    as well, and a SIGTERM to the driver is passed on: the child is waited for, not killed, so it can leave
    its checkpoint and say so)."""
    interrupted = False
    while True:
        try:
            return proc.wait(), interrupted
        except KeyboardInterrupt:
            interrupted = True


def run_subruns(subruns: list[SubRun], script: str, title: str, sync: StepSync | None = None) -> bool:
    """Run (or keep, or resume) each sub-run in turn with ``python script ARGV``; set each one's ``status``.
    Returns False when interrupted (the remaining sub-runs keep ``status`` None). ``sync``: the ranks' step
    markers of a launched run."""
    todo = [s for s in subruns if not is_finished(s.folder, s.after)]
    say(f"=== {title}: {len(subruns)} sub-runs, {len(subruns) - len(todo)} finished earlier (kept), {len(todo)} to run")
    current: list[subprocess.Popen] = []

    def pass_on_sigterm(signum, frame):  # a scheduler stopping the driver: stop the child the same way
        for proc in current:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, pass_on_sigterm)
    try:
        for i, sub in enumerate(subruns, 1):
            if sub not in todo:
                sub.status = "kept"
                say(f"=== {sub.label} ({i}/{len(subruns)}): finished earlier, kept: {sub.folder}")
                continue
            argv = list(sub.argv)
            checkpoint = os.path.join(sub.folder, "checkpoint-last.pdparams")
            resumed = sub.resumable and os.path.isfile(checkpoint)
            if resumed:
                argv += ["--resume", checkpoint]
            say(f"=== {sub.label} ({i}/{len(subruns)}): {'resuming' if resumed else 'running'} -> {sub.folder}")
            try:
                proc = subprocess.Popen([sys.executable, script, *argv])
            except KeyboardInterrupt:
                return False
            current[:] = [proc]
            code, interrupted = _wait(proc)
            if sync is not None and not interrupted:
                sync.step_done()
            if interrupted or code == INTERRUPTED or code == -signal.SIGINT:
                sub.status = "interrupted"
                say(f"=== {sub.label}: interrupted; run the same command again to continue")
                return False
            sub.status = "done" if code == 0 else f"failed (exit status {code})"
            if code != 0:
                say(f"=== {sub.label}: failed with exit status {code} (its output is above); going on with the rest")
        return True
    finally:
        signal.signal(signal.SIGTERM, previous)
