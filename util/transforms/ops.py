"""Image operations of the transform pipelines: PIL in, PIL out (``ToArrayNormalize``: float32 ``[3, H, W]`` out).

Crops, resizes, flips, rotation and colour jitter with torchvision's / timm's semantics on PIL images,
``pil_interpolation`` (filter names -> PIL filters). The random ones draw only from Python's ``random`` (seeding: see ``util/transforms/pipelines.py``);
``RandomCrop``, ``RandomRotation`` and ``ColorJitter`` split the draw (``get_params``) from its use
(``apply``/``pad``) so the dual-eye transform can share or repeat draws.

References: timm ``timm/data/transforms.py`` (RandomResizedCropAndInterpolation); torchvision
``Resize``/``CenterCrop``/``ColorJitter``/``RandomCrop``/``RandomVerticalFlip``/``RandomRotation`` and its PIL
``adjust_hue``.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance

from util.errors import UserError
from util.image_io import to_rgb
from util.transforms.randaugment import RANDOM_INTERPOLATION

_INTERPOLATIONS = {
    'nearest': Image.Resampling.NEAREST,
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,
    'box': Image.Resampling.BOX,
    'hamming': Image.Resampling.HAMMING,
    'lanczos': Image.Resampling.LANCZOS,
}


def pil_interpolation(name: str, allow_random: bool = False):
    """PIL filter for ``name``; 'random' (if allowed) gives timm's (bilinear, bicubic) pair."""
    if allow_random and name == 'random':
        return RANDOM_INTERPOLATION
    if name not in _INTERPOLATIONS:
        choices = sorted(_INTERPOLATIONS) + (['random'] if allow_random else [])
        raise UserError(f"--interpolation {name!r}: unknown interpolation (one of {', '.join(choices)}); "
                        f"pick one of those")
    return _INTERPOLATIONS[name]


class ToRGB:
    """Convert to 8-bit RGB if needed (grayscale / palette / RGBA / 16-bit inputs; see ``to_rgb``)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return to_rgb(img)

    def __repr__(self) -> str:
        return 'ToRGB()'


class RandomResizedCrop:
    """Crop a random area fraction in ``scale`` with a log-uniform aspect ratio in ``ratio``, then resize.

    Ten attempts; if none fits, a central crop clamped to the ratio range (timm's sampling).
    """

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation='bicubic'):
        self.size = size
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.interpolation = pil_interpolation(interpolation, allow_random=True)

    @staticmethod
    def get_params(img: Image.Image, scale, ratio) -> tuple[int, int, int, int]:
        """Return (top, left, height, width) of the crop."""
        width, height = img.size
        area = width * height
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):
            target_area = area * random.uniform(*scale)
            aspect = math.exp(random.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if w <= width and h <= height:
                top = random.randint(0, height - h)
                left = random.randint(0, width - w)
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            w, h = int(round(height * max(ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image) -> Image.Image:
        top, left, h, w = self.get_params(img, self.scale, self.ratio)
        interp = self.interpolation
        if isinstance(interp, tuple):
            interp = random.choice(interp)
        img = img.crop((left, top, left + w, top + h))
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), interp)
        return img

    def __repr__(self) -> str:
        return f'RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})'


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() < self.p:
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img

    def __repr__(self) -> str:
        return f'RandomHorizontalFlip(p={self.p})'


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """Shift the hue channel by ``hue_factor`` turns (in [-0.5, 0.5]), wrapping around (torchvision PIL)."""
    h, s, v = img.convert('HSV').split()
    shifted = (np.asarray(h, dtype=np.uint8) + np.uint8(np.int32(hue_factor * 255) % 256)).astype(np.uint8)
    return Image.merge('HSV', (Image.fromarray(shifted, 'L'), s, v)).convert(img.mode)


class ColorJitter:
    """Brightness / contrast / saturation (/ hue) jitter in a random order, factors uniform in
    ``[max(0, 1-x), 1+x]`` (hue: ``[-x, x]``), as torchvision's ColorJitter on PIL images."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
                 hue: float = 0.0):
        self.ranges = [
            (max(0.0, 1 - brightness), 1 + brightness) if brightness else None,
            (max(0.0, 1 - contrast), 1 + contrast) if contrast else None,
            (max(0.0, 1 - saturation), 1 + saturation) if saturation else None,
            (-hue, hue) if hue else None,
        ]
        if hue and not 0 <= hue <= 0.5:
            raise UserError(f"--color_jitter: hue {hue} out of range ([0, 0.5]); pass a smaller hue")

    def get_params(self) -> list[tuple[int, float]]:
        """Draw the adjustments: ``[(kind, factor), ...]`` in the order they apply (0 brightness,
        1 contrast, 2 saturation, 3 hue). The dual-eye transform draws once and applies to both eyes."""
        order = list(range(4))
        random.shuffle(order)
        return [(k, random.uniform(*self.ranges[k])) for k in order if self.ranges[k] is not None]

    @staticmethod
    def apply(img: Image.Image, params: list[tuple[int, float]]) -> Image.Image:
        for k, f in params:
            if k == 0:
                img = ImageEnhance.Brightness(img).enhance(f)
            elif k == 1:
                img = ImageEnhance.Contrast(img).enhance(f)
            elif k == 2:
                img = ImageEnhance.Color(img).enhance(f)
            else:
                img = adjust_hue(img, f)
        return img

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.apply(img, self.get_params())

    def __repr__(self) -> str:
        return f'ColorJitter(ranges={self.ranges})'


class Resize:
    """Resize so the shorter side is ``size`` (longer side ``int(size * long / short)``), like
    torchvision's ``Resize(int)``."""

    def __init__(self, size: int, interpolation='bicubic'):
        self.size = size
        self.interpolation = pil_interpolation(interpolation)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) == (w, h):
            return img
        return img.resize((new_w, new_h), self.interpolation)

    def __repr__(self) -> str:
        return f'Resize({self.size})'


class CenterCrop:
    """Central ``size x size`` crop; offsets rounded like torchvision. Pads with black if the image is
    smaller (PIL's crop does that for out-of-bounds boxes)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if w < self.size or h < self.size:
            padded = Image.new(img.mode, (max(w, self.size), max(h, self.size)))
            padded.paste(img, ((padded.size[0] - w) // 2, (padded.size[1] - h) // 2))
            img, (w, h) = padded, padded.size
        top = int(round((h - self.size) / 2.0))
        left = int(round((w - self.size) / 2.0))
        return img.crop((left, top, left + self.size, top + self.size))

    def __repr__(self) -> str:
        return f'CenterCrop({self.size})'


class RandomCrop:
    """A ``size x size`` crop at a uniformly drawn position (torchvision's ``RandomCrop(size)``); an image
    smaller than ``size`` is first padded with black, centred."""

    def __init__(self, size: int):
        self.size = size

    def pad(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if w >= self.size and h >= self.size:
            return img
        padded = Image.new(img.mode, (max(w, self.size), max(h, self.size)))
        padded.paste(img, ((padded.size[0] - w) // 2, (padded.size[1] - h) // 2))
        return padded

    def get_params(self, img: Image.Image) -> tuple[int, int]:
        """(top, left) of the crop in the (padded) image."""
        w, h = img.size
        return random.randint(0, h - self.size), random.randint(0, w - self.size)

    def __call__(self, img: Image.Image) -> Image.Image:
        img = self.pad(img)
        top, left = self.get_params(img)
        return img.crop((left, top, left + self.size, top + self.size))

    def __repr__(self) -> str:
        return f'RandomCrop({self.size})'


class RandomVerticalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() < self.p:
            return img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        return img

    def __repr__(self) -> str:
        return f'RandomVerticalFlip(p={self.p})'


# PIL's rotate knows only these three filters; the others fall back to bicubic
_ROTATE_FILTERS = {'nearest': Image.Resampling.NEAREST, 'bilinear': Image.Resampling.BILINEAR,
                   'bicubic': Image.Resampling.BICUBIC}


class RandomRotation:
    """Rotate about the centre by an angle uniform in ``[-degrees, degrees]`` (counter-clockwise positive),
    keeping the size; the corners that leave the frame are filled with black (torchvision's
    ``RandomRotation(degrees, fill=0)``, but with a smooth filter instead of nearest-neighbour).

    ``interpolation``: 'nearest', 'bilinear', 'bicubic' or 'random' (bilinear or bicubic per call);
    'box', 'hamming' and 'lanczos' (not supported by PIL's rotate) use bicubic.
    """

    def __init__(self, degrees: float, interpolation: str = 'bicubic'):
        if not degrees >= 0:
            raise UserError(f"--rotation {degrees}: negative or not a number (an angle >= 0 in degrees; "
                            f"the rotation is drawn in [-angle, angle]); pass e.g. --rotation 15")
        self.degrees = float(degrees)
        self.interpolation = (RANDOM_INTERPOLATION if interpolation == 'random' else
                              _ROTATE_FILTERS.get(interpolation, Image.Resampling.BICUBIC))

    def get_params(self) -> float:
        return random.uniform(-self.degrees, self.degrees)

    def apply(self, img: Image.Image, angle: float) -> Image.Image:
        interp = self.interpolation
        if isinstance(interp, tuple):
            interp = random.choice(interp)
        return img.rotate(angle, resample=interp)

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.apply(img, self.get_params())

    def __repr__(self) -> str:
        return f'RandomRotation(degrees={self.degrees})'


class ToArrayNormalize:
    """uint8 HWC image -> float32 CHW in [0, 1] -> ``(x - mean) / std`` (ToTensor + Normalize)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, img: Image.Image) -> np.ndarray:
        x = np.asarray(img, dtype=np.uint8)
        if x.ndim == 2:
            x = np.repeat(x[:, :, None], 3, axis=2)
        x = x.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return f'ToArrayNormalize(mean={self.mean.ravel().tolist()}, std={self.std.ravel().tolist()})'
