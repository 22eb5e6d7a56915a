"""Image files: which files are images, finding them under a folder, and reading one as 8-bit RGB.

Shared by the dataset formats, the fundus preprocessing, the image check and ``predict.py``; it imports
nothing else of the toolkit but its errors, so every layer may use it.

Reduced-size JPEG decoding (``--jpeg_draft``): a JPEG decoder can produce the image at 1/2, 1/4 or 1/8 of
its size cheaply, by scaling its inverse DCT (libjpeg's ``scale_denom``, exposed by Pillow as
``Image.draft``), which skips much of the work of decoding a 3000-4000 px fundus photograph (the entropy
decoding remains) and leaves the transforms far fewer pixels. ``load_image`` does so only when given a
``MinSize``, what the pipeline's first resizing step needs (``Compose.source_min_size``), and then picks the
largest reduction whose decoded image meets it.

The scaled IDCT is a coarse low-pass (at 1/8 every 8x8 block becomes its mean), so a resize to a fixed size
``S`` asks for ``RESIZE_HEADROOM * S`` (``fixed_resize_min_size``): the last 2x or more of the reduction is
then left to the resize's antialiasing filter, and 1/8 is only used on images 16x the output or larger.

References: Pillow ``Image.draft`` / ``JpegImagePlugin.JpegImageFile.draft``; libjpeg-turbo ``libjpeg.txt``
(``scale_num``/``scale_denom``, DCT scaling); Pillow image modes (``I;16``, ``I``, ``F``) and ``Image.convert``.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile

from util.errors import UserError

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')
# the ImageNet channel statistics every pretrained backbone here was normalised with (timm's IMAGENET_DEFAULT_*)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def is_visible(name: str) -> bool:
    return not name.startswith('.')


def scan_images(folder: str) -> list[str]:
    """The image files under ``folder`` (any depth, sorted, hidden files and folders left out).

    Symbolic links to folders are followed (datasets are often linked in), but every real folder is read
    once: a link back to the folder being scanned or one of its ancestors (``loop -> .``), or a second link
    to a folder already read, is skipped, so a link cycle can neither multiply the images nor recurse
    until the path is too long.
    """
    real_top = os.path.realpath(folder)
    seen = {real_top}
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for d in sorted(d for d in dirnames if is_visible(d)):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real in seen or real_top.startswith(real.rstrip(os.sep) + os.sep):
                continue  # already read, or an ancestor of the scanned folder (a cycle)
            seen.add(real)
            kept.append(d)
        dirnames[:] = kept
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if is_visible(f) and f.lower().endswith(IMG_EXTENSIONS)]
    return found


def _scaled_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """8-bit grey levels for the pixel values of a 32-bit integer (``I``) or float (``F``) image."""
    if mode == 'I' and values.size and values.min() >= 0 and values.max() <= 65535:
        return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    if mode == 'F' and lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    if hi <= lo:  # a constant image: nothing to stretch
        return np.zeros(values.shape, dtype=np.uint8)
    out = np.rint((np.where(finite, values, lo) - lo) * (255.0 / (hi - lo)))
    return np.clip(out, 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as an 8-bit RGB image (``img`` itself when it already is one).

    PIL's own ``convert('RGB')`` clips high-bit-depth grey levels to 255, so a 16-bit OCT or fundus export
    would come out all white; here their range is scaled instead:

    - ``I;16`` (and ``I;16B``/``I;16L``/``I;16N``), 16-bit grey: 0..65535 maps linearly to 0..255,
      ``round(v / 257)`` (the range of the data type, so the image's own contrast is kept).
    - ``I`` (32-bit integers, e.g. an older Pillow's 16-bit PNG or an int32 TIFF): values within 0..65535 are
      taken as 16-bit data and scaled as above; any other range (negative or larger values) has no
      conventional full scale, so the image's own minimum..maximum maps to 0..255.
    - ``F`` (32-bit float): values within [0, 1] (the float image convention) map to 0..255; any other range
      maps its minimum..maximum to 0..255. NaN and infinite pixels become 0, and are left out of the range.
    - every other mode (L, P, LA, RGBA, CMYK, ...) goes through ``convert('RGB')``. 16-bit RGB(A) PNGs and
      TIFFs need nothing: PIL opens them as 8-bit RGB(A) already (keeping the high byte of each sample).
    """
    if img.mode == 'RGB':
        return img
    if img.mode.startswith('I;16'):
        grey = ((np.asarray(img).astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif img.mode in ('I', 'F'):
        grey = _scaled_to_uint8(np.asarray(img), img.mode)
    else:
        return img.convert('RGB')
    return Image.fromarray(grey, 'L').convert('RGB')


class MinSize(NamedTuple):
    """The smallest image a pipeline's first resizing step takes without enlarging anything: the shorter
    side at least ``side`` and the area (width x height) at least ``area`` pixels."""
    side: int
    area: int = 0

    def met_by(self, size: tuple[int, int]) -> bool:
        w, h = size
        return min(w, h) >= self.side and w * h >= self.area


# the reductions a JPEG decoder applies through DCT scaling, largest first (Pillow's ``draft`` offers these)
JPEG_REDUCTIONS = (8, 4, 2)
# a reduced decode feeding a resize to a fixed shorter side S keeps at least this x S (see the module docstring)
RESIZE_HEADROOM = 2


def fixed_resize_min_size(side: int) -> MinSize:
    """What a reduced decode must keep for a resize of the shorter side to ``side``."""
    return MinSize(RESIZE_HEADROOM * int(side))


def reduced_size(size: tuple[int, int], reduction: int) -> tuple[int, int]:
    """The size of a JPEG of ``size`` decoded at ``1 / reduction`` (libjpeg rounds up)."""
    return (size[0] + reduction - 1) // reduction, (size[1] + reduction - 1) // reduction


def draft_reduction(size: tuple[int, int], need: MinSize) -> int:
    """The largest of ``JPEG_REDUCTIONS`` whose decoded image still meets ``need``; 1 (full size) if none."""
    for k in JPEG_REDUCTIONS:
        if need.met_by(reduced_size(size, k)):
            return k
    return 1


def decode_image(path: str, min_size: MinSize | None = None, reduction: int | None = None
                 ) -> tuple[Image.Image, int]:
    """``(image as 8-bit RGB, reduction)``: ``path`` decoded like ``load_image``; a JPEG at ``1 / reduction``
    of its size (``reduction`` given, or the largest ``draft_reduction`` for ``min_size``), every other
    file, or neither argument given, at full size (reduction 1)."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise UserError(f"{path}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (False, so truncated images "
                        f"are reported); do not set it, fix or remove broken images instead")
    try:
        with Image.open(path) as img:
            k = 1
            if img.format == 'JPEG' and (reduction is not None or min_size is not None):
                full = img.size
                k = int(reduction) if reduction is not None else draft_reduction(full, min_size)
                if k > 1:
                    # the size is a floor: Pillow picks the largest scale that is at least this big
                    img.draft(img.mode, (max(1, full[0] // k), max(1, full[1] // k)))
                    # the reduction the decoder took (Pillow may decline the request: 1)
                    k = next((r for r in (k, *JPEG_REDUCTIONS) if reduced_size(full, r) == img.size), 1)
            img.load()
            rgb = to_rgb(img)
            return (img.copy() if rgb is img else rgb), k
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"{path}: cannot read image ({type(err).__name__}: {err}) (a complete "
                        f"JPEG/PNG/BMP/TIFF file); replace or delete the file") from None


def load_image(path: str, min_size: MinSize | None = None) -> Image.Image:
    """Open ``path`` fully (truncated files fail here, not later) and convert it to 8-bit RGB.

    High-bit-depth images (16-bit grey PNG/TIFF as OCT devices export them, 32-bit integer or float TIFF)
    are scaled to 0..255 rather than clipped; ``to_rgb`` documents the mapping.

    ``min_size``: a JPEG is decoded at the largest reduction (1/2, 1/4, 1/8) whose image still meets it
    (``draft_reduction``); the pixels are then those of the decoder's scaled inverse DCT, close to but not
    the same as a full decode followed by a resize. ``None`` (the default): always the full image.
    """
    return decode_image(path, min_size)[0]
