"""Image paths listed in a table: the folder they are relative to, and the file of each one.

Listed paths are relative to ``--image_root`` (default: the table's folder, or the one of its subfolders
holding the listed images, picked by probing the first listed paths); backslashes are read as ``/``, and
a path without extension is tried with the usual ones (APTOS ``id_code`` columns).

A table is data from elsewhere, so its paths must stay inside the folder they are relative to: ``is_inside``
compares real paths (``os.path.realpath``: symlinks and ``..`` resolved), and the table formats refuse
paths leaving ``--image_root`` (default: the table's folder) unless ``--allow_outside_paths``.
"""
from __future__ import annotations

import os

from util.errors import UserError
from util.image_io import IMG_EXTENSIONS


def clean_path(listed: str) -> str:
    return listed.strip().replace('\\', '/')


def is_inside(path: str, base: str) -> bool:
    """``path`` is ``base`` or below it once symlinks and ``..`` are resolved (missing parts taken as named)."""
    real, root = os.path.realpath(path), os.path.realpath(base)
    try:
        return os.path.commonpath([real, root]) == root
    except ValueError:  # different drives (Windows)
        return False


def _has_image_ext(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)


class ImageResolver:
    """Finds the folder the listed paths are relative to and turns listed paths into files."""

    def __init__(self, where: str, listed: list[str], image_root: str | None, table_dir: str,
                 subfolders: tuple[str, ...] = ()):
        probe = [clean_path(p) for p in listed if p][:30]
        roots = [image_root] if image_root else self.candidates(table_dir, subfolders)
        best, best_hits, suffix = roots[0], -1, ''
        for root in roots:
            hits, found_suffix = 0, ''
            for p in probe:
                s = self._match(root, p, _EXTENSION_TRIALS)
                if s is not None:
                    hits += 1
                    found_suffix = found_suffix or s
            if hits > best_hits:
                best, best_hits, suffix = root, hits, found_suffix
        if probe and best_hits == 0:
            looked = ', '.join(roots[:8]) + (f' and {len(roots) - 8} more folders' if len(roots) > 8 else '')
            raise UserError(f"{where}: none of the first {len(probe)} listed images found (e.g. {probe[0]!r}); "
                            f"looked under {looked} (image paths relative to --image_root, by default the "
                            f"table's folder or one of its subfolders); pass --image_root with the folder "
                            f"holding the images")
        self.root, self.suffix = best, suffix

    @staticmethod
    def candidates(table_dir: str, subfolders: tuple[str, ...]) -> list[str]:
        roots = [table_dir]
        roots += [os.path.join(table_dir, s) for s in subfolders if os.path.isdir(os.path.join(table_dir, s))]
        try:
            subs = sorted(e.path for e in os.scandir(table_dir) if e.is_dir() and not e.name.startswith('.'))
        except OSError:
            subs = []
        for sub in subs:
            roots.append(sub)
            try:
                roots += sorted(e.path for e in os.scandir(sub) if e.is_dir() and not e.name.startswith('.'))
            except OSError:
                pass
        seen, out = set(), []
        for r in roots:
            key = os.path.normpath(r)
            if key not in seen:
                seen.add(key)
                out.append(r)
        return out[:60]

    @staticmethod
    def _match(root: str, listed: str, trials: tuple[str, ...]) -> str | None:
        path = listed if os.path.isabs(listed) else os.path.join(root, listed)
        if os.path.isfile(path):
            return ''
        if not _has_image_ext(listed):
            for ext in trials:
                if os.path.isfile(path + ext):
                    return ext
        return None

    def resolve(self, listed: str) -> str | None:
        """The file of a listed path, ``None`` when absent."""
        listed = clean_path(listed)
        s = self._match(self.root, listed, (self.suffix,) if self.suffix else ())
        if s is None:
            return None
        path = listed if os.path.isabs(listed) else os.path.join(self.root, listed)
        return path + s

    def target(self, listed: str) -> str:
        """The file a listed path names: the resolved file, or where it would be when absent."""
        found = self.resolve(listed)
        if found is not None:
            return found
        listed = clean_path(listed)
        return listed if os.path.isabs(listed) else os.path.join(self.root, listed)


_EXTENSION_TRIALS = tuple(e for ext in IMG_EXTENSIONS for e in (ext, ext.upper()))
