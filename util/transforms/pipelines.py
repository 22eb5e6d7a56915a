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

The image operations themselves (crops, flips, rotation, colour jitter, resize, normalisation) are in
``util/transforms/ops.py``.

Every pipeline states the smallest input a reduced JPEG decode may give it (``Compose.source_min_size``, a
``MinSize``; ``--jpeg_draft``, ``util/image_io.py``):

- eval and ``basic``: their first step resizes the shorter side to ``int(size / crop_pct)`` (256 at 224);
  the decode keeps twice that (512; ``image_io.RESIZE_HEADROOM``), so the resize still shrinks 2x or more
  with its antialiasing filter (a 3000 px JPEG decodes at 1/4, not 1/8).
- ``retfound``: RandomResizedCrop draws an area fraction down to ``scale[0]`` (0.08) with an aspect ratio
  out to 3/4 or 4/3, so its smallest crop has a shorter side of ``sqrt(area * 0.08 * 3/4)``; the area is
  held at ``size**2 / 0.06`` or more (915 x 915 px at 224) so that even that crop keeps ``size`` pixels a
  side and is shrunk, never enlarged, as from a full decode (a 3000 px JPEG decodes at 1/2; the median
  crop, half the area, is then still shrunk 4x). A looser bound, say twice the output's side, would enlarge
  the smallest crops up to 2x: a blur the reference never shows.

References: timm ``timm/data/transforms_factory.py`` (random erasing: ``util/transforms/random_erasing.py``); RETFound
``util/datasets.py``; the CNN seed systems (README.md, Seed systems).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from util.errors import UserError, unknown_name_error
from util.image_io import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, MinSize, fixed_resize_min_size
from util.transforms.ops import (
    CenterCrop,
    ColorJitter,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    RandomRotation,
    RandomVerticalFlip,
    Resize,
    ToArrayNormalize,
    ToRGB,
    pil_interpolation,
)
from util.transforms.randaugment import rand_augment_transform
from util.transforms.random_erasing import RandomErasing


class Compose:
    """The steps in order. ``source_min_size``: the smallest input the steps take without enlarging it
    (``None``: not known, so a reader never decodes below the full size)."""

    def __init__(self, transforms: list[Callable], source_min_size: MinSize | None = None):
        self.transforms = transforms
        self.source_min_size = source_min_size

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img

    def __repr__(self) -> str:
        return 'Compose(\n' + ''.join(f'    {t!r}\n' for t in self.transforms) + ')'


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


def random_crop_min_size(size: int, scale: Sequence[float] = (0.08, 1.0),
                         ratio: Sequence[float] = (3 / 4, 4 / 3)) -> MinSize | None:
    """The smallest image on which every crop RandomResizedCrop(size, scale, ratio) draws keeps at least
    ``size`` pixels a side: a crop of area ``t`` and aspect ``a`` has a shorter side ``sqrt(t * min(a, 1/a))``,
    smallest at ``t = scale[0] * area`` and the extreme ratio; the fallback (whole image, clamped to the
    ratio) needs a shorter side of ``size``. ``None`` when ``scale[0]`` is 0 (no image is big enough)."""
    smallest = min(ratio[0], 1 / ratio[0], ratio[1], 1 / ratio[1])
    if scale[0] <= 0:
        return None
    return MinSize(size, math.ceil(size * size / (scale[0] * smallest)))


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
        ], source_min_size=fixed_resize_min_size(int(input_size / crop_pct)))
    hflip = check_probability('--hflip', hflip)
    vflip = check_probability('--vflip', vflip)
    if policy == 'basic':
        return _basic_train_transform(input_size, mean, std, interpolation, crop_pct, color_jitter, hflip,
                                      vflip, rotation)

    crop = RandomResizedCrop(input_size, interpolation=interpolation)
    steps: list[Callable] = [ToRGB(), crop]
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
    return Compose(steps, source_min_size=random_crop_min_size(input_size, crop.scale, crop.ratio))


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
    return Compose(steps, source_min_size=fixed_resize_min_size(int(input_size / crop_pct)))
