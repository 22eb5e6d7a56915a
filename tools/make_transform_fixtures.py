"""Write the reference fixtures for tests/unit/test_transforms.py from timm + torchvision.

Run with the PyTorch environment (timm 1.0.x, torchvision), not the Paddle one:

    TORCH_PYTHON tools/make_transform_fixtures.py     # from the repository root

TORCH_PYTHON: the Python interpreter of that environment.

Writes tests/fixtures/transforms/{eval,ops,randaugment,rrc,erasing,jitter}.npz (a few hundred kB in all).
Every array is produced by timm/torchvision code; the inputs are stored alongside so the tests do not
depend on regenerating them identically.

References: timm ``timm/data/auto_augment.py``, ``transforms.py``, ``random_erasing.py``;
RETFound ``util/datasets.py`` (eval transform built from torchvision ops).
"""
from __future__ import annotations

import os
import random
import sys
import types

# torchvision's compiled ops do not load in this environment; its Python transforms do not need them.
sys.modules['torchvision._meta_registrations'] = types.ModuleType('torchvision._meta_registrations')

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from timm.data import auto_augment as aa  # noqa: E402
from timm.data.random_erasing import RandomErasing  # noqa: E402
from timm.data.transforms import RandomResizedCropAndInterpolation  # noqa: E402
from torchvision import transforms as T  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), '..', 'tests', 'fixtures', 'transforms')
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
FILL = tuple(min(255, round(255 * m)) for m in MEAN)  # what timm's create_transform passes as img_mean


def synthetic(h: int, w: int, seed: int, noise: float = 20.0) -> np.ndarray:
    """Smooth colour gradients plus a disc and noise: exercises interpolation and histogram ops."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * xx / max(w - 1, 1)
    g = 255 * yy / max(h - 1, 1)
    b = 128 + 100 * np.sin(xx / 3.0) * np.cos(yy / 5.0)
    disc = ((yy - h / 2) ** 2 + (xx - w / 3) ** 2) < (min(h, w) / 4) ** 2
    img = np.stack([r, g, b], -1) * 0.8 + noise * rng.standard_normal((h, w, 3))
    img[disc] = [200, 60, 40]
    return np.clip(img, 0, 255).astype(np.uint8)


def eval_fixture() -> dict:
    """RETFound's eval transform (torchvision Resize/CenterCrop/ToTensor/Normalize) on odd-sized images."""
    out = {}
    shapes = [(37, 53), (53, 37), (90, 130), (28, 28)]
    for k, (h, w) in enumerate(shapes):
        img = synthetic(h, w, seed=k, noise=6)
        out[f'input_{k}'] = img
        for size in (32, 48):
            crop_pct = 224 / 256 if size <= 224 else 1.0
            t = T.Compose([
                T.Resize(int(size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])
            out[f'output_{k}_{size}'] = t(Image.fromarray(img)).numpy()
    # the crop_pct = 1.0 branch (input_size > 224): to stay small, keep a central 32x32 window of the
    # uint8 crop plus the per-channel sums of the whole crop
    t = T.Compose([T.Resize(240, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(240)])
    crop = np.asarray(t(Image.fromarray(out['input_2'])))
    out['crop_2_240_window'] = crop[104:136, 104:136]
    out['crop_2_240_sum'] = crop.reshape(-1, 3).astype(np.int64).sum(0)
    return out


SIGNED = {'Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel',
          'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing'}
GEOMETRIC = {'Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel'}
OP_NAMES = sorted(set(aa._RAND_INCREASING_TRANSFORMS) | set(aa._RAND_TRANSFORMS))


def ops_fixture() -> dict:
    """Each timm op at fixed magnitude and sign (timm's level functions with the coin forced)."""
    img = synthetic(24, 24, seed=10, noise=4)
    out = {'input': img, 'names': np.array(OP_NAMES)}
    hparams = dict(translate_const=int(24 * 0.45), img_mean=FILL)
    orig_negate = aa._randomly_negate
    try:
        for name in OP_NAMES:
            for m in (4, 9):
                for sign in ((1, -1) if name in SIGNED else (1,)):
                    aa._randomly_negate = (lambda v: -v) if sign < 0 else (lambda v: v)
                    level_fn = aa.LEVEL_TO_ARG[name]
                    args = level_fn(m, hparams) if level_fn is not None else ()
                    if name.startswith('Posterize') and args[0] < 1:
                        continue  # Pillow >= 11 raises for 0 bits (timm crashes); tested separately
                    interps = ((Image.BICUBIC, 'bicubic'), (Image.BILINEAR, 'bilinear'))
                    for interp, tag in interps if name in GEOMETRIC else interps[:1]:
                        res = aa.NAME_TO_OP[name](Image.fromarray(img), *args, fillcolor=FILL, resample=interp)
                        key = f'{name}_m{m}_s{sign}_{tag}'
                        out[key] = np.asarray(res)
                        out['args_' + key] = np.array(args, dtype=np.float64)
    finally:
        aa._randomly_negate = orig_negate
    return out


RA_CONFIGS = ['rand-m9-mstd0.5-inc1', 'rand-m7-n3-inc0', 'rand-m10-n1-mstd101-p0.8-inc1',
              'rand-m12-mmax15-n2-inc1']


def _posterize_old_pillow(img, bits_to_keep, **__):
    """timm's posterize as it behaved on Pillow < 11, where 0 (or fewer) bits gave a black image;
    Pillow >= 11 raises instead, which would crash timm's PosterizeIncreasing at magnitude >= 10."""
    if bits_to_keep >= 8:
        return img
    mask = ~(2 ** (8 - max(0, bits_to_keep)) - 1) & 0xFF
    return img.point([v & mask for v in range(256)] * len(img.getbands()))


def randaugment_fixture() -> dict:
    """Whole RandAugment transforms under fixed seeds of python random and numpy (timm's RNGs)."""
    img = synthetic(24, 24, seed=20, noise=4)
    out = {'input': img, 'configs': np.array(RA_CONFIGS)}
    for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        aa.NAME_TO_OP[name] = _posterize_old_pillow
    for c, cfg in enumerate(RA_CONFIGS):
        for interp in ('bicubic', 'random'):
            hparams = dict(translate_const=int(24 * 0.45), img_mean=FILL)
            if interp != 'random':
                hparams['interpolation'] = Image.BICUBIC
            t = aa.rand_augment_transform(cfg, hparams)
            for seed in range(8):
                random.seed(seed)
                np.random.seed(seed)
                out[f'out_{c}_{interp}_{seed}'] = np.asarray(t(Image.fromarray(img)))
    return out


def rrc_fixture() -> dict:
    """timm RandomResizedCropAndInterpolation: crop boxes per seed (incl. the fallback) and outputs."""
    out = {}
    sizes = [(37, 53), (300, 200), (20, 300), (300, 20), (28, 28)]
    for k, (h, w) in enumerate(sizes):
        img = Image.fromarray(synthetic(h, w, seed=30 + k))
        boxes = []
        for seed in range(50):
            random.seed(seed)
            boxes.append(RandomResizedCropAndInterpolation.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)))
        out[f'boxes_{k}'] = np.array(boxes)
        out[f'shape_{k}'] = np.array([h, w])
    img = synthetic(53, 37, seed=40)
    out['input'] = img
    for interp in ('bicubic', 'random'):
        t = RandomResizedCropAndInterpolation(24, interpolation=interp)
        for seed in range(6):
            random.seed(seed)
            out[f'out_{interp}_{seed}'] = np.asarray(t(Image.fromarray(img)))
    return out


def erasing_fixture() -> dict:
    """timm RandomErasing rectangles per seed: 'const' mode on an all-ones tensor leaves a zero mask."""
    out = {}
    for p, count in ((1.0, 1), (1.0, 3), (0.25, 1)):
        masks = []
        t = RandomErasing(p, mode='const', max_count=count, device='cpu')
        for seed in range(40):
            random.seed(seed)
            x = torch.ones(3, 24, 40)
            masks.append((t(x)[0] == 0).numpy())
        out[f'masks_p{p}_c{count}'] = np.packbits(np.array(masks), axis=-1)
    return out


def jitter_fixture() -> dict:
    """torchvision's PIL colour adjustments at fixed factors (ColorJitter draws them from torch's RNG)."""
    img = synthetic(32, 32, seed=50)
    pil = Image.fromarray(img)
    out = {'input': img}
    for f in (0.6, 1.4):
        out[f'brightness_{f}'] = np.asarray(TF.adjust_brightness(pil, f))
        out[f'contrast_{f}'] = np.asarray(TF.adjust_contrast(pil, f))
        out[f'saturation_{f}'] = np.asarray(TF.adjust_saturation(pil, f))
    for f in (-0.3, -0.01, 0.2, 0.5):
        out[f'hue_{f}'] = np.asarray(TF.adjust_hue(pil, f))
    return out


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    for name, fn in [('eval', eval_fixture), ('ops', ops_fixture), ('randaugment', randaugment_fixture),
                     ('rrc', rrc_fixture), ('erasing', erasing_fixture), ('jitter', jitter_fixture)]:
        arrays = fn()
        arrays['generator'] = np.array(f'timm {timm.__version__}, torch {torch.__version__}, '
                                       f'PIL {Image.__version__}, numpy {np.__version__}')
        path = os.path.join(OUT, f'{name}.npz')
        np.savez_compressed(path, **arrays)
        print(f'{path}: {len(arrays)} arrays, {os.path.getsize(path) / 1024:.0f} kB')


if __name__ == '__main__':
    main()
