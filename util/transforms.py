"""Image transforms for fine-tuning and evaluation: PIL in, float32 numpy ``[3, S, S]`` out.

``build_transform`` reproduces the reference pipelines (RETFound's ``build_transform``, which calls timm's
``create_transform`` for training and torchvision ops for evaluation):

- train: RandomResizedCrop (timm's sampling) -> horizontal flip -> RandAugment (timm string) or
  ColorJitter -> ToTensor -> Normalize -> RandomErasing (in the normalised space).
- eval: Resize(int(size / crop_pct), shorter side) -> CenterCrop(size) -> ToTensor -> Normalize.

``policy='basic'`` is the training pipeline of the CNN seed systems (EfficientNet / ConvNeXt / ResNet-50
fundus classifiers: flips + random rotation, optional colour jitter, no RandAugment, no erasing):
Resize(int(size / crop_pct)) -> RandomCrop(size) -> horizontal flip -> vertical flip -> RandomRotation
(+-rotation degrees, black corners) -> ColorJitter (if given) -> ToTensor -> Normalize. Its eval pipeline
is the one above.

Randomness comes only from Python's ``random`` (crop, flip, erasing geometry, RandAugment coins and signs,
colour-jitter factors) and numpy's global RNG (RandAugment op choice, erasing noise), as in timm.
Paddle's DataLoader reseeds both in every worker from a base seed drawn from numpy's global RNG, so
``random.seed(s); np.random.seed(s)`` in the main process makes the augmentation stream reproducible and
different per worker. Where timm uses torch's RNG (flip coin, erasing noise, ColorJitter) we use these
instead, so those draws match timm in distribution, not seed for seed.

References: timm ``timm/data/transforms_factory.py``, ``transforms.py`` (RandomResizedCropAndInterpolation),
(random erasing: ``util/random_erasing.py``); torchvision ``Resize``/``CenterCrop``/``ColorJitter``/``RandomCrop``/
``RandomVerticalFlip``/``RandomRotation``; RETFound ``util/datasets.py``; the seed systems of REFERENCE.md section 3.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance

from util.errors import UserError, unknown_name_error
from util.randaugment import RANDOM_INTERPOLATION, rand_augment_transform
from util.random_erasing import RandomErasing

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

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


class Compose:
    def __init__(self, transforms: list[Callable]):
        self.transforms = transforms

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img

    def __repr__(self) -> str:
        return 'Compose(\n' + ''.join(f'    {t!r}\n' for t in self.transforms) + ')'


class ToRGB:
    """Convert to RGB if needed (grayscale / palette / RGBA inputs)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == 'RGB' else img.convert('RGB')

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


def jitter_factors(color_jitter) -> tuple[float, ...]:
    """``--color_jitter`` value (one float, or 3/4 floats) -> (brightness, contrast, saturation[, hue])."""
    if isinstance(color_jitter, (int, float)):
        return (float(color_jitter),) * 3
    values = tuple(float(v) for v in color_jitter)
    if len(values) not in (3, 4):
        raise UserError(f"--color_jitter {color_jitter!r}: wrong number of values (1, 3 or 4 floats: "
                        f"brightness, contrast, saturation[, hue]); pass e.g. --color_jitter 0.4")
    return values


TRANSFORM_POLICIES = ('retfound', 'basic')


def resolve_crop_pct(crop_pct: float | None, input_size: int) -> float:
    """``crop_pct``, defaulting to 224/256 for ``input_size <= 224`` and 1.0 above (RETFound's rule)."""
    if crop_pct is None:
        crop_pct = 224 / 256 if input_size <= 224 else 1.0
    if not 0 < crop_pct <= 1:
        raise UserError(f"crop_pct {crop_pct}: out of range ((0, 1]); use e.g. 0.875")
    return crop_pct


def check_probability(flag: str, p: float) -> float:
    if not 0 <= p <= 1:
        raise UserError(f"{flag} {p}: not a probability (a value in [0, 1]); pass e.g. {flag} 0.5")
    return float(p)


def build_transform(is_train: bool, input_size: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                    std: Sequence[float] = IMAGENET_DEFAULT_STD, interpolation: str = 'bicubic',
                    crop_pct: float | None = None, aa: str | None = 'rand-m9-mstd0.5-inc1',
                    reprob: float = 0.25, remode: str = 'pixel', recount: int = 1,
                    color_jitter: float | Sequence[float] | None = None, hflip: float = 0.5,
                    policy: str = 'retfound', rotation: float = 15.0, vflip: float = 0.0) -> Compose:
    """The train or eval transform: ``callable(PIL.Image) -> float32 [3, input_size, input_size]``.

    Args:
        is_train: augmenting training pipeline, or deterministic evaluation pipeline.
        input_size: output side length.
        mean, std: normalisation (0-1 scale); ``mean`` also gives RandAugment's fill colour.
        interpolation: resampling filter of crop/resize and of RandAugment's geometric ops
            ('random' = bilinear or bicubic per call, train only; eval then uses bicubic).
        crop_pct: eval, and training with policy 'basic' (resize to ``int(input_size / crop_pct)`` before
            the crop); default 224/256 for ``input_size <= 224``, else 1.0.
        aa: timm RandAugment string; ``None``, '' or 'none' disables it (then ``color_jitter`` applies).
            Policy 'retfound' only.
        reprob, remode, recount: random erasing probability, fill mode, maximum rectangle count. Policy
            'retfound' only.
        color_jitter: brightness/contrast/saturation factor (or 3/4-tuple); 'retfound' uses it only
            without RandAugment, 'basic' whenever given.
        hflip: horizontal flip probability.
        policy: training pipeline, 'retfound' (the reference's timm pipeline) or 'basic' (the CNN seeds'
            crop, flips, rotation and colour jitter); the eval pipeline is the same for both.
        rotation: policy 'basic' only: rotation angle drawn uniformly in ``[-rotation, rotation]`` degrees
            (0 disables it). RandAugment already rotates in 'retfound'.
        vflip: vertical flip probability (both policies; 0, the default, adds no step, so the 'retfound'
            pipeline and its random stream stay the reference's).
    """
    if policy not in TRANSFORM_POLICIES:
        raise unknown_name_error('transform policy', policy, TRANSFORM_POLICIES)
    if int(input_size) != input_size or input_size < 1:
        raise UserError(f"--input_size {input_size}: not a positive integer; pass e.g. --input_size 224")
    input_size = int(input_size)
    if not is_train:
        crop_pct = resolve_crop_pct(crop_pct, input_size)
        interp = 'bicubic' if interpolation == 'random' else interpolation
        return Compose([
            ToRGB(),
            Resize(int(input_size / crop_pct), interp),
            CenterCrop(input_size),
            ToArrayNormalize(mean, std),
        ])
    hflip = check_probability('--hflip', hflip)
    vflip = check_probability('--vflip', vflip)
    if policy == 'basic':
        return _basic_train_transform(input_size, mean, std, interpolation, crop_pct, color_jitter, hflip,
                                      vflip, rotation)

    steps: list[Callable] = [ToRGB(), RandomResizedCrop(input_size, interpolation=interpolation)]
    if hflip > 0:
        steps.append(RandomHorizontalFlip(hflip))
    if vflip > 0:
        steps.append(RandomVerticalFlip(vflip))
    use_aa = bool(aa) and str(aa).lower() != 'none'
    if use_aa:
        fill = tuple(min(255, round(255 * m)) for m in mean)
        steps.append(rand_augment_transform(str(aa), fill=fill,
                                            interpolation=pil_interpolation(interpolation, allow_random=True)))
    elif color_jitter is not None:
        factors = jitter_factors(color_jitter)
        if any(factors):
            steps.append(ColorJitter(*factors))
    steps.append(ToArrayNormalize(mean, std))
    if reprob > 0:
        steps.append(RandomErasing(reprob, mode=remode, max_count=recount))
    return Compose(steps)


def _basic_train_transform(input_size: int, mean, std, interpolation: str, crop_pct: float | None,
                           color_jitter, hflip: float, vflip: float, rotation: float) -> Compose:
    crop_pct = resolve_crop_pct(crop_pct, input_size)
    steps: list[Callable] = [
        ToRGB(),
        Resize(int(input_size / crop_pct), 'bicubic' if interpolation == 'random' else interpolation),
        RandomCrop(input_size),
    ]
    if hflip > 0:
        steps.append(RandomHorizontalFlip(hflip))
    if vflip > 0:
        steps.append(RandomVerticalFlip(vflip))
    rotate = RandomRotation(rotation, interpolation)  # validates the angle even when it is 0
    if rotate.degrees > 0:
        steps.append(rotate)
    if color_jitter is not None:
        factors = jitter_factors(color_jitter)
        if any(factors):
            steps.append(ColorJitter(*factors))
    steps.append(ToArrayNormalize(mean, std))
    return Compose(steps)
