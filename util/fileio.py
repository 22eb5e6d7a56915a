"""Atomic file writes: write to a temporary file in the target's folder, then rename it into place.

An error while writing leaves the previous file intact and no temporary file behind; a process killed while
writing leaves the previous file intact too (and a ``.tmp-*`` file). Without ``fsync`` that guarantee is about
the process: after a power cut or a kernel crash, a file system that does not order data before renames may
show the new name with missing data. ``fsync=True`` flushes the new file to the disk before the rename and the
folder after it, so the old file or the complete new one is what any crash leaves.

References: POSIX ``rename(2)`` (the target is replaced atomically) and the Linux ``fsync(2)`` manual page (an
fsync of the folder is needed too for the new entry to reach the disk).
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


def fsync_path(path: str) -> None:
    """Flush a file's (or a folder's) data and metadata to the disk (``os.fsync`` on a read-only descriptor,
    which Linux and macOS accept)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", fsync: bool = False) -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces ``path`` (``os.replace``), otherwise it is
    removed. ``suffix`` keeps writers that look at the extension (matplotlib, paddle) happy. ``fsync``: flush
    the new file to the disk before the rename and the folder after it (module docstring)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
        if fsync:
            fsync_path(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
