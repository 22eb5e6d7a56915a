"""User-facing errors.

A ``UserError`` is raised for anything a user can fix (bad path, wrong class count, checkpoint that does
not fit, ...). ``main_finetune.py`` prints its message as one paragraph and exits non-zero, without a
traceback. Messages follow ``<where>: <what is wrong> (<what was expected>); <how to fix>``.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """An error caused by user input, reported without a traceback."""


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Names in ``choices`` close to ``name`` (case-insensitive), best first."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    return [lowered[h] for h in hits]


def unknown_name_error(kind: str, name: str, choices: Iterable[str]) -> UserError:
    """A ``UserError`` for an unknown registered name, with close matches and the full list."""
    choices = sorted(choices)
    near = close_matches(name, choices)
    hint = f"did you mean {', '.join(repr(c) for c in near)}? " if near else ""
    return UserError(f"{kind} {name!r} is not registered; {hint}known: {', '.join(choices)}")


def killed_worker_error(pid, signal_name: str) -> UserError:
    """The error for a worker stopped from outside the run (``kill``, the kernel's out-of-memory killer)."""
    return UserError(f"data loader worker (pid {pid}) was killed by signal {signal_name}; it was stopped from "
                     "outside the run (the system may have run out of memory: check `dmesg`); rerun, with fewer "
                     "--num_workers or --num_workers 0")
