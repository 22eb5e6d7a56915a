"""Atomic file writes: write to a temporary file in the target's folder, then rename it into place.

A crash or error while writing leaves the previous file intact and no temporary file behind.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces ``path`` (``os.replace``), otherwise it is
    removed. ``suffix`` keeps writers that look at the extension (matplotlib, paddle) happy."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
