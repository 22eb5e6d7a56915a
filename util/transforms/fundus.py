"""Fundus photograph preprocessing (drop the black border, circular field of view) and a caching reader.

A fundus camera records a bright disc (the field of view, FOV) on a black frame whose size varies between
cameras; cropping the frame away before resizing gives every image the same retina-to-pixel scale.

- ``fov_crop``: crop to the rows/columns that hold the FOV (black-border removal, as the DR-regression
  seed's "background cropping").
- ``circle_crop``: central square with everything outside its inscribed circle set to black.
- ``build_preprocess(mode, threshold, size)``: 'none', 'fov', 'circle' or 'fov_circle' (the ODIR ResNet-50
  seed: FOV crop -> circle crop -> FOV crop), then optionally resize the shorter side to ``size``.
- ``FundusReader``: path -> preprocessed RGB image, optionally cached on disk as lossless PNG so the
  expensive decode + crop of multi-megapixel originals happens once, not every epoch; given the size the
  pipeline needs (``MinSize``), it decodes a JPEG at a reduced size (``--jpeg_draft``) that still leaves the
  crop big enough.

References: the ODIR-5K ResNet-50 and DR-regression seed systems (README.md, Seed systems); Ben Graham's
``crop_image_from_gray`` (Kaggle DR 2015 / APTOS 2019 kernels: bounding box of pixels above a grey
tolerance), made robust to isolated bright pixels and to text burnt into the border.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from typing import Callable

import numpy as np
from PIL import Image, ImageChops

from util.errors import UserError, unknown_name_error
from util.fileio import atomic_path
from util.image_io import MinSize, decode_image, draft_reduction, fixed_resize_min_size, to_rgb

# Bump when the output of a preprocessing mode changes, so caches written by older code are not reused.
PREPROCESS_VERSION = 1

# A row or column belongs to the field of view when more than this fraction of its pixels (and more than
# one pixel) are brighter than the threshold.
FOV_MIN_FRACTION = 0.02


def _brightness(img: Image.Image) -> np.ndarray:
    """Per-pixel maximum over the colour channels, uint8 [H, W]."""
    if img.mode == 'L':
        return np.asarray(img)
    r, g, b = to_rgb(img).split()  # 16-bit grey scaled to 8 bits, not clipped (see ``to_rgb``)
    # PIL's per-pixel maximum is ~8x faster than numpy's max over a size-3 axis on a camera-sized image
    return np.asarray(ImageChops.lighter(ImageChops.lighter(r, g), b))


def _fov_range(counts: np.ndarray, length: int, min_fraction: float) -> tuple[int, int] | None:
    """[start, stop) of the run of consecutive FOV lines holding the most bright pixels, or None."""
    inside = counts > max(1.0, min_fraction * length)
    best, best_mass, start = None, -1, None
    for i, flag in enumerate(np.append(inside, False)):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            mass = int(counts[start:i].sum())
            if mass > best_mass:
                best, best_mass = (start, i), mass
            start = None
    return best


def fov_box(img: Image.Image, threshold: int = 10,
            min_fraction: float = FOV_MIN_FRACTION) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the field of view (see ``fov_crop``), or None if nothing is bright."""
    bright = _brightness(img) > threshold
    h, w = bright.shape
    rows, cols = (0, h), (0, w)
    # Rows are judged within the current columns and vice versa, so a label beside the disc but level
    # with its edge is dropped too; a few rounds reach a fixed point.
    for _ in range(4):
        new_rows = _fov_range(bright[:, cols[0]:cols[1]].sum(axis=1), cols[1] - cols[0], min_fraction)
        new_cols = _fov_range(bright[rows[0]:rows[1]].sum(axis=0), rows[1] - rows[0], min_fraction)
        if new_rows is None or new_cols is None:
            return None
        if (new_rows, new_cols) == (rows, cols):
            break
        rows, cols = new_rows, new_cols
    return cols[0], rows[0], cols[1], rows[1]


def fov_crop(img: Image.Image, threshold: int = 10, min_fraction: float = FOV_MIN_FRACTION) -> Image.Image:
    """Crop ``img`` to its field of view, dropping the black border around the fundus.

    A pixel is *bright* when its largest channel exceeds ``threshold`` (0-255): the maximum rather than
    the grey level because the dim periphery of a fundus is dark red, whose grey level (0.3 R) falls
    below the threshold long before its red channel does. For robustness against sensor noise, dust
    specks and text burnt into the black frame (dates, eye labels):

    - a row (column) belongs to the FOV only when more than ``max(1, min_fraction * width)`` of its pixels
      are bright, so a lone bright pixel never counts and a few scattered ones do not either;
    - of the runs of consecutive FOV rows (columns), the one holding the most bright pixels is kept, so a
      label separated from the disc by black is cut away; rows are then re-judged within the kept
      columns and vice versa (until nothing changes), which also drops a label level with the disc.

    With the default 2 % a disc touching the frame loses at most its outermost one-pixel line.
    An image without any bright line (all dark, or bright pixels too sparse) is returned unchanged:
    there is nothing to crop to, and a training run should not die on one black image.
    The mode of ``img`` is kept.
    """
    box = fov_box(img, threshold, min_fraction)
    if box is None or box == (0, 0) + img.size:
        return img
    return img.crop(box)


def circle_crop(img: Image.Image) -> Image.Image:
    """The central ``s x s`` square (``s`` = the shorter side) with every pixel whose centre lies outside
    the inscribed circle set to black. The mode of ``img`` is kept."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    square = img.crop((left, top, left + s, top + s))
    centre = np.arange(s, dtype=np.float64) + 0.5 - s / 2
    inside = centre[:, None] ** 2 + centre[None, :] ** 2 <= (s / 2) ** 2
    mask = Image.fromarray(inside.astype(np.uint8) * 255, 'L')
    return Image.composite(square, Image.new(img.mode, (s, s)), mask)


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (the longer one rounded, aspect ratio kept).

    Bicubic with PIL's ``reducing_gap``: a large downscale first box-reduces by an integer factor, then
    resamples with a filter widened to the scale, so the result is antialiased (no moire from vessels)
    and fast on multi-megapixel originals.
    """
    w, h = img.size
    scale = size / min(w, h)
    new = (size, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), size)
    if new == (w, h):
        return img
    return img.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)


_MODES: dict[str, tuple[str, ...]] = {
    'none': (),
    'fov': ('fov',),
    'circle': ('circle',),
    'fov_circle': ('fov', 'circle', 'fov'),
}
PREPROCESS_MODES = tuple(_MODES)


class Preprocess:
    """Deterministic fundus preprocessing: PIL in, RGB PIL out (see ``build_preprocess``).

    ``key`` names the exact operation (mode, threshold, size and ``PREPROCESS_VERSION``); the disk cache of
    ``FundusReader`` is keyed by it, so changing any of them never reuses stale results.
    """

    def __init__(self, mode: str, threshold: int = 10, size: int = 0):
        if mode not in _MODES:
            raise unknown_name_error('fundus preprocessing mode', mode, _MODES)
        if isinstance(threshold, bool) or int(threshold) != threshold or not 0 <= threshold <= 254:
            raise UserError(f"fundus preprocessing threshold {threshold!r}: out of range (an integer grey "
                            f"level in [0, 254]; pixels whose brightest channel exceeds it form the field of "
                            f"view); pass e.g. 10")
        if isinstance(size, bool) or int(size) != size or size < 0:
            raise UserError(f"fundus preprocessing size {size!r}: not a non-negative integer (the shorter "
                            f"side in pixels after preprocessing, 0 = keep); pass e.g. 512 or 0")
        self.mode = mode
        self.threshold = int(threshold)
        self.size = int(size)
        self.steps = _MODES[mode]

    @property
    def key(self) -> str:
        return f'{self.mode}-t{self.threshold}-s{self.size}-v{PREPROCESS_VERSION}'

    def crop(self, img: Image.Image) -> Image.Image:
        """The crop steps alone (RGB out)."""
        img = to_rgb(img)
        for step in self.steps:
            img = fov_crop(img, self.threshold) if step == 'fov' else circle_crop(img)
        return img

    def resize(self, img: Image.Image) -> Image.Image:
        """The final resize alone (``size`` 0: none)."""
        return resize_shorter(img, self.size) if self.size > 0 else img

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.resize(self.crop(img))

    def __repr__(self) -> str:
        return f'Preprocess(mode={self.mode!r}, threshold={self.threshold}, size={self.size})'


def build_preprocess(mode: str, threshold: int = 10, size: int = 0) -> Preprocess | None:
    """The preprocessing for ``mode`` ('none', 'fov', 'circle', 'fov_circle'), then a resize of the
    shorter side to ``size`` when ``size > 0``. None when there is nothing to do ('none' and size 0)."""
    preprocess = Preprocess(mode, threshold, size)  # validates
    return None if mode == 'none' and preprocess.size == 0 else preprocess


def _decode(path: str) -> Image.Image:
    # Imported here: util.datasets imports paddle (slow) and may itself import this module.
    from util.image_io import load_image
    return load_image(path)


def _stem(path: str) -> str:
    """A short, filesystem-safe version of the file name, so a cached file can be traced by eye."""
    return re.sub(r'[^A-Za-z0-9_.-]+', '_', os.path.splitext(os.path.basename(path))[0])[:40]


class FundusReader:
    """``reader(path) -> RGB PIL image``: decode, preprocess and (with ``cache_dir``) cache the result.

    Cache layout: ``<cache_dir>/<h[:2]>/<stem>-<h>.png`` with ``h`` the first 32 hex digits of SHA-256
    over (absolute path, file size, modification time in ns, ``preprocess.key``, and for a reduced JPEG
    decode the ``MinSize`` it had to meet). Editing or replacing the original (new size or mtime) or
    changing the preprocessing therefore misses and writes a new entry; stale entries are never read
    (delete the folder to reclaim space). PNG keeps the pixels exact.

    Several DataLoader worker processes may share one cache: each entry is written to a temporary file in
    the same folder and renamed into place (``os.replace`` is atomic), so a reader sees either no file or
    a complete one; two workers missing at once both write the same bytes and the last rename wins. An
    entry that cannot be decoded (truncated by a full disk, or edited) is regenerated. A cache write that
    fails (disk full) warns once and the image is still returned. Temporary ``.tmp-*`` files can only be
    left behind by a process killed mid-write.

    Without ``preprocess`` there is nothing worth caching (a PNG of the full-size decode is larger and
    slower to read than the JPEG), so ``cache_dir`` is ignored.

    ``reader(path, min_size)`` (``MinSize``: what the transform's first resize needs, ``--jpeg_draft``)
    decodes a JPEG at the largest 1/2, 1/4, 1/8 reduction that still gives the transform at least that:
    with ``preprocess.size`` > 0 the crop must keep a shorter side of twice ``size`` (its resize then
    shrinks 2x or more, as ``util/image_io.py`` explains; the transform gets ``size`` either way), else the
    crop itself must meet ``min_size``. The crop runs on the reduced image;
    when it keeps too little of it (a small field of view in a large frame) the file is decoded again, less
    reduced, so the guarantee holds for every image. A preprocessing other than ``Preprocess`` (its geometry
    unknown) always decodes the full image. Cache entries made this way are keyed apart from full decodes.

    ``hits``, ``misses`` and ``repaired`` count cache lookups in this process (each DataLoader worker
    process counts its own copy). The reader is picklable.
    """

    accepts_min_size = True  # ``RetinaDataset.read`` passes ``min_size`` to readers that say so

    def __init__(self, preprocess: Preprocess | Callable | None, cache_dir: str | None = None):
        self.preprocess = preprocess
        self.cache_dir = os.path.abspath(cache_dir) if cache_dir and preprocess is not None else None
        self.key = getattr(preprocess, 'key', None) if preprocess is not None else None
        if self.cache_dir is not None:
            if self.key is None:
                raise UserError(f"FundusReader: preprocessing {preprocess!r} has no 'key' (a string naming the "
                                f"operation, for the cache); use build_preprocess or drop cache_dir")
            try:
                os.makedirs(self.cache_dir, exist_ok=True)
            except OSError as err:
                raise UserError(f"{self.cache_dir}: cannot create the preprocessing cache folder ({err}) "
                                f"(a writable folder); pass another cache folder") from None
            if not os.access(self.cache_dir, os.W_OK | os.X_OK):
                raise UserError(f"{self.cache_dir}: preprocessing cache folder is not writable (a writable "
                                f"folder); fix its permissions or pass another cache folder")
        self.hits = 0
        self.misses = 0
        self.repaired = 0
        self._warned = False

    def process(self, img: Image.Image) -> Image.Image:
        """Apply the preprocessing to an in-memory image (no cache); RGB out."""
        img = to_rgb(img)
        return self.preprocess(img) if self.preprocess is not None else img

    def decode_need(self, min_size: MinSize | None) -> MinSize | None:
        """What the decoded image must meet for a transform needing ``min_size`` (``None``: decode fully)."""
        if min_size is None or self.preprocess is None:
            return min_size
        if isinstance(self.preprocess, Preprocess):
            size = self.preprocess.size
            return fixed_resize_min_size(size) if size > 0 else MinSize(*min_size)
        return None

    def _load(self, path: str, min_size: MinSize | None) -> Image.Image:
        need = self.decode_need(min_size)
        if need is None:
            return self.process(_decode(path))
        img, k = decode_image(path, need)
        if self.preprocess is None:
            return img
        cropped = self.preprocess.crop(img)
        while k > 1 and not need.met_by(cropped.size):
            # the crop kept too little of the reduced image: decode it again, reduced less (or not at all)
            k = min(k // 2, draft_reduction((cropped.size[0] * k, cropped.size[1] * k), need))
            img, k = decode_image(path, reduction=k)
            cropped = self.preprocess.crop(img)
        return self.preprocess.resize(cropped)

    def cache_path(self, path: str, min_size: MinSize | None = None) -> str | None:
        """Where the cached result for ``path`` (read for a transform needing ``min_size``) lives (None
        without a cache); raises ``UserError`` naming the file when it does not exist."""
        if self.cache_dir is None:
            return None
        path = os.path.abspath(path)
        try:
            st = os.stat(path)
        except OSError as err:
            raise UserError(f"{path}: cannot read image ({type(err).__name__}: {err.strerror}) (an existing "
                            f"image file); check the path or restore the file") from None
        ident = f'{path}\0{st.st_size}\0{st.st_mtime_ns}\0{self.key}'
        need = self.decode_need(min_size)
        if need is not None:  # a reduced decode: other pixels than the full decode's, so another entry
            ident += f'\0draft-{need.side}x{need.area}'
        h = hashlib.sha256(ident.encode('utf-8', 'surrogateescape')).hexdigest()[:32]
        return os.path.join(self.cache_dir, h[:2], f'{_stem(path)}-{h}.png')

    def __call__(self, path: str, min_size: MinSize | None = None) -> Image.Image:
        entry = self.cache_path(path, min_size)
        if entry is None:
            return self._load(path, min_size)
        if os.path.exists(entry):
            try:
                with Image.open(entry) as cached:
                    cached.load()
                    img = cached.convert('RGB')
                self.hits += 1
                return img
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                self.repaired += 1  # unreadable entry: fall through and rewrite it
        self.misses += 1
        img = self._load(path, min_size)
        try:
            with atomic_path(entry, suffix='.png') as tmp:
                img.save(tmp, format='PNG', compress_level=1)
        except OSError as err:
            if not self._warned:
                warnings.warn(f"{entry}: cannot write the preprocessing cache ({err}); continuing without "
                              f"caching this image (later failures are not reported)")
                self._warned = True
        return img

    def __repr__(self) -> str:
        return f'FundusReader({self.preprocess!r}, cache_dir={self.cache_dir!r})'
