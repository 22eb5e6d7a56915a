"""RandAugment on PIL images, configured by a timm-style string such as ``'rand-m9-mstd0.5-inc1'``.

The op set, the magnitude-to-argument rules, the per-op probability, the magnitude noise and the order in
which random numbers are drawn follow timm's ``rand_augment_transform``, so that with the same seeds of
Python's ``random`` and numpy's global RNG this module produces the same images as timm (checked against
fixtures written by ``tools/make_transform_fixtures.py``).

Randomness: op selection uses ``np.random.choice``; the per-op coin, magnitude noise, sign flips and the
random interpolation use Python's ``random``. Paddle's DataLoader reseeds both in every worker (from a base
seed drawn from numpy's global RNG), so seeding the main process makes a run reproducible.

References: timm ``timm/data/auto_augment.py`` (RandAugment, "increasing" op variants);
Cubuk et al., "RandAugment", arXiv:1909.13719.
"""
from __future__ import annotations

import math
import random
import re
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from util.errors import UserError

MAX_LEVEL = 10.0  # magnitudes are expressed on a 0..10 scale ("m9" = 90 % of the strongest setting)

BILINEAR = Image.Resampling.BILINEAR
BICUBIC = Image.Resampling.BICUBIC
# timm draws the resampling filter of geometric ops from this pair when no fixed interpolation is set;
# the order matters for seed-for-seed parity.
RANDOM_INTERPOLATION = (BILINEAR, BICUBIC)

AA_GRAMMAR = (
    "'rand' followed by '-'-separated options: m<int> magnitude 0-10 (default 10), n<int> ops per image "
    "(default 2), mstd<float> magnitude noise std (>100 means uniform in [0, m]), mmax<int> magnitude "
    "upper bound (default 10), inc<0|1> use the 'increasing' op set, p<float> probability of each op "
    "(default 0.5); e.g. 'rand-m9-mstd0.5-inc1'; '' or 'none' disables it"
)


# --------------------------------------------------------------------------- image ops
# Every op takes (img, *args, fill, resample); colour ops ignore fill/resample.

def _affine(img: Image.Image, coeffs: tuple, fill, resample) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=resample, fillcolor=fill)


def shear_x(img, factor, *, fill, resample):
    return _affine(img, (1, factor, 0, 0, 1, 0), fill, resample)


def shear_y(img, factor, *, fill, resample):
    return _affine(img, (1, 0, 0, factor, 1, 0), fill, resample)


def translate_x_rel(img, fraction, *, fill, resample):
    # The affine matrix maps output to input coordinates, so a positive offset moves content left.
    return _affine(img, (1, 0, fraction * img.size[0], 0, 1, 0), fill, resample)


def translate_y_rel(img, fraction, *, fill, resample):
    return _affine(img, (1, 0, 0, 0, 1, fraction * img.size[1]), fill, resample)


def rotate(img, degrees, *, fill, resample):
    return img.rotate(degrees, resample=resample, fillcolor=fill)


def auto_contrast(img, *, fill=None, resample=None):
    return ImageOps.autocontrast(img)


def equalize(img, *, fill=None, resample=None):
    return ImageOps.equalize(img)


def invert(img, *, fill=None, resample=None):
    return ImageOps.invert(img)


def posterize(img, bits, *, fill=None, resample=None):
    """Keep the ``bits`` most significant bits of each channel; 0 bits gives a black image.

    Pillow >= 11 rejects ``bits=0`` (timm's PosterizeIncreasing at magnitude 10 then raises); older
    Pillow, which the reference ran on, masked everything to 0. We keep that behaviour.
    """
    if bits >= 8:
        return img
    mask = ~(2 ** (8 - max(0, int(bits))) - 1) & 0xFF
    return img.point([v & mask for v in range(256)] * len(img.getbands()))


def solarize(img, threshold, *, fill=None, resample=None):
    return ImageOps.solarize(img, threshold)


def solarize_add(img, add, threshold=128, *, fill=None, resample=None):
    """Add ``add`` (saturating at 255) to the pixels darker than ``threshold``."""
    table = [min(255, v + add) if v < threshold else v for v in range(256)]
    if img.mode not in ('L', 'RGB'):
        return img
    return img.point(table * len(img.getbands()))


def _enhancer(cls) -> Callable:
    def op(img, factor, *, fill=None, resample=None):
        return cls(img).enhance(factor)
    op.__name__ = cls.__name__.lower()
    return op


color = _enhancer(ImageEnhance.Color)
contrast = _enhancer(ImageEnhance.Contrast)
brightness = _enhancer(ImageEnhance.Brightness)
sharpness = _enhancer(ImageEnhance.Sharpness)

GEOMETRIC_OPS = {'Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel'}


# --------------------------------------------------------------------------- magnitude -> op arguments
# Each rule maps (magnitude, sign) to the op's argument tuple; sign is +1/-1 for the signed ops and is
# ignored by the others.

def _signed(scale: float) -> Callable[[float, int], tuple]:
    return lambda m, sign: (sign * m / MAX_LEVEL * scale,)


def _enhance(m: float, sign: int) -> tuple:
    return (m / MAX_LEVEL * 1.8 + 0.1,)  # factor in [0.1, 1.9], weaker->stronger is not monotone


def _enhance_increasing(m: float, sign: int) -> tuple:
    # distance from the identity factor 1.0 grows with the magnitude; floor 0.1
    return (max(0.1, 1.0 + sign * m / MAX_LEVEL * 0.9),)


def _posterize(m: float, sign: int) -> tuple:
    return (int(m / MAX_LEVEL * 4),)  # bits kept, 0..4: lower magnitude = stronger


def _posterize_increasing(m: float, sign: int) -> tuple:
    return (4 - int(m / MAX_LEVEL * 4),)


def _solarize(m: float, sign: int) -> tuple:
    return (min(256, int(m / MAX_LEVEL * 256)),)


def _solarize_increasing(m: float, sign: int) -> tuple:
    return (256 - min(256, int(m / MAX_LEVEL * 256)),)


def _solarize_add(m: float, sign: int) -> tuple:
    return (min(128, int(m / MAX_LEVEL * 110)),)


def _no_args(m: float, sign: int) -> tuple:
    return ()


# name -> (image op, argument rule, takes a random sign)
OPS: dict[str, tuple[Callable, Callable[[float, int], tuple], bool]] = {
    'AutoContrast': (auto_contrast, _no_args, False),
    'Equalize': (equalize, _no_args, False),
    'Invert': (invert, _no_args, False),
    'Rotate': (rotate, _signed(30.0), True),
    'Posterize': (posterize, _posterize, False),
    'PosterizeIncreasing': (posterize, _posterize_increasing, False),
    'Solarize': (solarize, _solarize, False),
    'SolarizeIncreasing': (solarize, _solarize_increasing, False),
    'SolarizeAdd': (solarize_add, _solarize_add, False),
    'Color': (color, _enhance, False),
    'ColorIncreasing': (color, _enhance_increasing, True),
    'Contrast': (contrast, _enhance, False),
    'ContrastIncreasing': (contrast, _enhance_increasing, True),
    'Brightness': (brightness, _enhance, False),
    'BrightnessIncreasing': (brightness, _enhance_increasing, True),
    'Sharpness': (sharpness, _enhance, False),
    'SharpnessIncreasing': (sharpness, _enhance_increasing, True),
    'ShearX': (shear_x, _signed(0.3), True),
    'ShearY': (shear_y, _signed(0.3), True),
    'TranslateXRel': (translate_x_rel, _signed(0.45), True),
    'TranslateYRel': (translate_y_rel, _signed(0.45), True),
}

DEFAULT_OPS = [
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd', 'Color',
    'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel',
]
INCREASING_OPS = [
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
    'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing',
    'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel',
]


def op_args(name: str, magnitude: float, sign: int = 1) -> tuple:
    """Arguments op ``name`` receives at ``magnitude`` (0..10) with a fixed ``sign`` (+1/-1)."""
    return OPS[name][1](magnitude, sign)


def apply_op(name: str, img: Image.Image, args: tuple, fill: Sequence[int], resample: int) -> Image.Image:
    """Apply op ``name`` with explicit arguments (no randomness)."""
    return OPS[name][0](img, *args, fill=tuple(fill), resample=resample)


class AugmentOp:
    """One RandAugment op: applied with probability ``prob`` at a (possibly noisy) magnitude."""

    def __init__(self, name: str, prob: float = 0.5, magnitude: float = 10, magnitude_std: float = 0.0,
                 magnitude_max: float | None = None, fill: Sequence[int] = (128, 128, 128),
                 interpolation: int | Sequence[int] = RANDOM_INTERPOLATION):
        if name not in OPS:
            raise ValueError(f'unknown RandAugment op {name!r}')
        self.name = name
        self.prob = prob
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.magnitude_max = magnitude_max
        self.fill = tuple(fill)
        self.interpolation = interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        # The draw order (coin, magnitude noise, sign, filter) mirrors timm for seed-for-seed parity.
        if self.prob < 1.0 and random.random() > self.prob:
            return img
        m = self.magnitude
        if self.magnitude_std == math.inf:
            m = random.uniform(0, m)
        elif self.magnitude_std > 0:
            m = random.gauss(m, self.magnitude_std)
        m = max(0.0, min(m, self.magnitude_max or MAX_LEVEL))
        fn, rule, signed = OPS[self.name]
        sign = (-1 if random.random() > 0.5 else 1) if signed else 1
        args = rule(m, sign)
        resample = self.interpolation
        if self.name in GEOMETRIC_OPS and isinstance(resample, (tuple, list)):
            resample = random.choice(resample)
        return fn(img, *args, fill=self.fill, resample=resample)

    def __repr__(self) -> str:
        return (f'AugmentOp({self.name}, p={self.prob}, m={self.magnitude}, mstd={self.magnitude_std}'
                + (f', mmax={self.magnitude_max}' if self.magnitude_max is not None else '') + ')')


class RandAugment:
    """Apply ``num_ops`` ops drawn uniformly with replacement from ``ops``."""

    def __init__(self, ops: list[AugmentOp], num_ops: int = 2):
        self.ops = ops
        self.num_ops = num_ops

    def __call__(self, img: Image.Image) -> Image.Image:
        for k in np.random.choice(len(self.ops), self.num_ops, replace=True):
            img = self.ops[k](img)
        return img

    def __repr__(self) -> str:
        return f'RandAugment(n={self.num_ops}, ops=[' + ', '.join(map(repr, self.ops)) + '])'


def _bad_aa(config_str: str, what: str) -> UserError:
    return UserError(f"--aa {config_str!r}: {what} (expected {AA_GRAMMAR}); "
                     f"fix the string or pass --aa none to disable RandAugment")


def parse_rand_augment(config_str: str) -> dict:
    """Parse a timm RandAugment string into ``dict(magnitude, num_ops, magnitude_std, magnitude_max,
    increasing, prob)``; raises ``UserError`` with the grammar on anything it does not understand
    (timm silently skips some malformed sections; we refuse them)."""
    parts = config_str.split('-')
    if parts[0] != 'rand':
        raise _bad_aa(config_str, f"unsupported augmentation policy {parts[0]!r}")
    cfg = dict(magnitude=10.0, num_ops=2, magnitude_std=0.0, magnitude_max=None, increasing=False, prob=0.5)
    for part in parts[1:]:
        match = re.fullmatch(r'([a-z]+)(\d.*)', part)
        if not match:
            raise _bad_aa(config_str, f"cannot read section {part!r}")
        key, val = match.groups()
        try:
            if key == 'm':
                cfg['magnitude'] = float(int(val))
            elif key == 'n':
                cfg['num_ops'] = int(val)
            elif key == 'p':
                cfg['prob'] = float(val)
            elif key == 'mstd':
                std = float(val)
                cfg['magnitude_std'] = math.inf if std > 100 else std
            elif key == 'mmax':
                cfg['magnitude_max'] = float(int(val))
            elif key == 'inc':
                cfg['increasing'] = bool(int(val))
            else:
                raise _bad_aa(config_str, f"unknown option {key!r} in section {part!r}")
        except ValueError:
            raise _bad_aa(config_str, f"bad number {val!r} in section {part!r}") from None
    if not 0.0 <= cfg['prob'] <= 1.0:
        raise _bad_aa(config_str, f"p{cfg['prob']} is not a probability")
    return cfg


def rand_augment_transform(config_str: str, fill: Sequence[int] = (128, 128, 128),
                           interpolation: int | Sequence[int] = RANDOM_INTERPOLATION) -> RandAugment:
    """Build RandAugment from a timm config string.

    Args:
        config_str: e.g. ``'rand-m9-mstd0.5-inc1'`` (grammar in ``AA_GRAMMAR``).
        fill: RGB colour for pixels uncovered by geometric ops (timm passes the dataset mean in 0-255).
        interpolation: a PIL filter, or a tuple to draw from per call (timm's default when the
            transform's interpolation is 'random').
    """
    cfg = parse_rand_augment(config_str)
    names = INCREASING_OPS if cfg['increasing'] else DEFAULT_OPS
    ops = [AugmentOp(n, prob=cfg['prob'], magnitude=cfg['magnitude'], magnitude_std=cfg['magnitude_std'],
                     magnitude_max=cfg['magnitude_max'], fill=fill, interpolation=interpolation)
           for n in names]
    return RandAugment(ops, cfg['num_ops'])
