"""Where a result came from: file hashes of the weights and the data, the code's commit, the software and the
machine. Shown in ``report.html`` so a reader can tell which model, which data and which code made the
numbers.

A folder of images is described by the SHA-256 of its sorted listing (relative path and size of every file):
any image added, removed, renamed or resized changes it, without reading every image again.
"""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys

_CHUNK = 1 << 20


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (a ViT-L checkpoint is not read into memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def folder_fingerprint(path: str) -> tuple[str, int]:
    """(SHA-256 of the sorted ``relative/path<TAB>size`` lines of every file under ``path``, file count);
    hidden entries are left out, as the datasets leave them out."""
    lines = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            try:
                size = os.path.getsize(full)
            except OSError:
                continue
            lines.append(f"{os.path.relpath(full, path).replace(os.sep, '/')}\t{size}")
    lines.sort()
    # file names that are not UTF-8 come back from the OS as surrogate escapes: hash their original bytes
    return hashlib.sha256("\n".join(lines).encode("utf8", "surrogateescape")).hexdigest(), len(lines)


def describe_path(path: str | None) -> str:
    """``<path> sha256 <hash>`` for a file, ``<path> listing-sha256 <hash> (<n> files)`` for a folder."""
    if not path:
        return "none"
    if os.path.isfile(path):
        return f"{os.path.abspath(path)} sha256 {file_sha256(path)}"
    if os.path.isdir(path):
        digest, n = folder_fingerprint(path)
        return f"{os.path.abspath(path)} listing-sha256 {digest} ({n} files)"
    return f"{path} (not found)"


def code_version(root: str | None = None) -> str:
    """The git commit of the toolkit's checkout (``+changes`` when files differ from it), else ``unknown``."""
    root = root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + (" +changes" if dirty else "")


def provenance(*, checkpoint: str | None, weights: str | None, data_path: str | None, model: str,
               device: str, extra: dict | None = None) -> dict[str, str]:
    """The provenance table of a report: what was tested, on what, by which code on which machine."""
    import paddle

    out = {
        "model": model,
        "tested weights": describe_path(checkpoint),
        "pretrained weights": describe_path(weights) if weights else "none (trained from random initialisation)",
        "data": describe_path(data_path),
        "code": code_version(),
        "software": f"Python {platform.python_version()}, PaddlePaddle {paddle.__version__}",
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
                   f"device {device}",
        "command": " ".join(sys.argv),
    }
    out.update(extra or {})
    return out
