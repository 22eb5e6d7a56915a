"""Transforms for dual-eye samples: ``[left PIL, right PIL]`` in, float32 ``[2, 3, S, S]`` out (0 = left).

Training keeps the pair anatomically consistent, as the ODIR-5K ResNet-50 seed does:

- one horizontal-flip coin for the pair: a mirrored left eye looks like a right eye, so both images are
  mirrored AND swapped; slot 0 still holds a left-looking eye and the optic discs stay on their sides;
- one vertical-flip coin for the pair;
- colour-jitter factors (and their order) drawn once and applied to both eyes, as both photos of a
  patient come from the same camera and session;
- crop position and rotation angle drawn independently per eye (they carry no left/right meaning).

The geometry is the single-view 'basic' policy's: Resize(int(S / crop_pct), shorter side) -> RandomCrop(S)
-> flips -> RandomRotation -> ColorJitter -> normalise. Evaluation applies the single-view eval transform
(``util.transforms.build_transform(False, ...)``) to each eye.

Randomness comes from Python's ``random`` in a fixed order per pair (left crop, right crop, hflip coin,
vflip coin, slot-0 angle, slot-1 angle, jitter), so seeding makes it reproducible.

References: the ODIR-5K dual-eye ResNet-50 seed system (README.md, Seed systems): paired augmentation.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
from PIL import Image

from util.transforms.ops import ColorJitter, RandomCrop, RandomRotation, Resize, ToArrayNormalize
from util.transforms.pipelines import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    build_transform,
    check_probability,
    jitter_factors,
    resolve_crop_pct,
)


def _check_views(views) -> tuple[Image.Image, Image.Image]:
    if not isinstance(views, (list, tuple)) or len(views) != 2 \
            or not all(isinstance(v, Image.Image) for v in views):
        raise ValueError(f"dual-eye transform: got {type(views).__name__} (a [left, right] pair of PIL images)")
    return tuple(v if v.mode == 'RGB' else v.convert('RGB') for v in views)


class DualTrainTransform:
    """Paired training augmentation (see the module docstring)."""

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float], interpolation: str,
                 crop_pct: float, hflip: float, vflip: float, rotation: float, color_jitter=None):
        self.resize = Resize(int(input_size / crop_pct), 'bicubic' if interpolation == 'random' else interpolation)
        self.crop = RandomCrop(input_size)
        self.hflip = hflip
        self.vflip = vflip
        rotate = RandomRotation(rotation, interpolation)
        self.rotate = rotate if rotate.degrees > 0 else None
        factors = jitter_factors(color_jitter) if color_jitter is not None else ()
        self.jitter = ColorJitter(*factors) if any(factors) else None
        self.normalize = ToArrayNormalize(mean, std)

    def __call__(self, views) -> np.ndarray:
        imgs = [self.crop(self.resize(v)) for v in _check_views(views)]
        if self.hflip > 0 and random.random() < self.hflip:
            imgs = [img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for img in imgs[::-1]]
        if self.vflip > 0 and random.random() < self.vflip:
            imgs = [img.transpose(Image.Transpose.FLIP_TOP_BOTTOM) for img in imgs]
        if self.rotate is not None:
            imgs = [self.rotate(img) for img in imgs]
        if self.jitter is not None:
            params = self.jitter.get_params()
            imgs = [ColorJitter.apply(img, params) for img in imgs]
        return np.stack([self.normalize(img) for img in imgs])

    def __repr__(self) -> str:
        return (f'DualTrainTransform({self.resize!r}, {self.crop!r}, hflip+swap={self.hflip}, '
                f'vflip={self.vflip}, {self.rotate!r}, {self.jitter!r}, {self.normalize!r})')


class DualEvalTransform:
    """The single-view transform applied to each eye, stacked."""

    def __init__(self, single):
        self.single = single

    def __call__(self, views) -> np.ndarray:
        return np.stack([self.single(v) for v in _check_views(views)])

    def __repr__(self) -> str:
        return f'DualEvalTransform({self.single!r})'


def build_dual_transform(is_train: bool, input_size: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                         std: Sequence[float] = IMAGENET_DEFAULT_STD, interpolation: str = 'bicubic',
                         crop_pct: float | None = None, hflip: float = 0.5, vflip: float = 0.5,
                         rotation: float = 15.0, color_jitter: float | Sequence[float] | None = None):
    """``callable([left PIL, right PIL]) -> float32 [2, 3, input_size, input_size]`` (index 0 = left eye).

    Args:
        is_train: paired augmentation, or the deterministic eval transform on each eye.
        input_size: output side length.
        mean, std: normalisation (0-1 scale).
        interpolation: resize/rotation filter ('random' = bilinear or bicubic per rotation).
        crop_pct: resize the shorter side to ``int(input_size / crop_pct)`` before the (random or
            central) crop; default 224/256 for ``input_size <= 224``, else 1.0.
        hflip: probability of mirroring both eyes and swapping them.
        vflip: probability of flipping both eyes upside down.
        rotation: per-eye angle uniform in ``[-rotation, rotation]`` degrees (0 disables).
        color_jitter: brightness/contrast/saturation factor (or 3/4-tuple), shared by both eyes.
    """
    single_eval = build_transform(False, input_size, mean, std, interpolation, crop_pct)  # validates size/crop
    if not is_train:
        return DualEvalTransform(single_eval)
    return DualTrainTransform(int(input_size), mean, std, interpolation, resolve_crop_pct(crop_pct, int(input_size)),
                              check_probability('--hflip', hflip), check_probability('--vflip', vflip),
                              rotation, color_jitter)
