"""Atomic file writes: write to a temporary file in the target's folder, then rename it into place.

A crash or error while writing leaves the previous file intact and no temporary file behind.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


def display_path(path) -> str:
    """``path`` as text any UTF-8 file or terminal can hold: bytes of a file name that are not valid UTF-8
    (Python keeps them as surrogate escapes) become backslash escapes such as ``\\xff``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file: mkstemp's 0600 is not meant for outputs


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
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
