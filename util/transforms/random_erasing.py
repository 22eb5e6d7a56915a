"""Random erasing on a normalised CHW float32 array (timm's RandomErasing, numpy instead of torch).

Rectangle geometry draws from Python's ``random`` in timm's order (so rectangles match timm seed for
seed); the fill noise draws from numpy's global RNG (timm uses torch's).

References: timm ``timm/data/random_erasing.py``; Zhong et al., "Random Erasing Data Augmentation",
arXiv:1708.04896.
"""
from __future__ import annotations

import math
import random

import numpy as np

from util.errors import UserError


class RandomErasing:
    """With probability ``probability`` erase 1..``max_count`` rectangles of a normalised CHW array.

    Each rectangle: area a fraction uniform in [min_area, max_area] of the image (divided by the count),
    log-uniform aspect in [min_aspect, 1/min_aspect], up to 10 attempts to fit. Fill by ``mode``:
    'pixel' per-pixel N(0, 1) noise, 'rand' one N(0, 1) value per channel, 'const' zeros (the mean colour
    after normalisation).
    """

    def __init__(self, probability: float = 0.5, min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3, max_aspect: float | None = None, mode: str = 'const',
                 min_count: int = 1, max_count: int | None = None):
        mode = (mode or 'const').lower()
        if mode not in ('const', 'rand', 'pixel'):
            raise UserError(f"--remode {mode!r}: unknown random-erasing mode (one of pixel, rand, const); "
                            f"pick one of those")
        self.probability = probability
        self.min_area = min_area
        self.max_area = max_area
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
        self.mode = mode
        self.min_count = min_count
        self.max_count = max_count or min_count

    def _fill(self, chans: int, h: int, w: int) -> np.ndarray:
        if self.mode == 'pixel':
            return np.random.standard_normal((chans, h, w)).astype(np.float32)
        if self.mode == 'rand':
            return np.random.standard_normal((chans, 1, 1)).astype(np.float32)
        return np.zeros((chans, 1, 1), dtype=np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # python-random draw order follows timm, so the rectangles match timm seed for seed
        if random.random() > self.probability:
            return x
        chans, img_h, img_w = x.shape
        count = self.min_count if self.min_count == self.max_count else \
            random.randint(self.min_count, self.max_count)
        x = x.copy()
        for _ in range(count):
            for _attempt in range(10):
                target = random.uniform(self.min_area, self.max_area) * img_h * img_w / count
                aspect = math.exp(random.uniform(*self.log_aspect))
                h = int(round(math.sqrt(target * aspect)))
                w = int(round(math.sqrt(target / aspect)))
                if w < img_w and h < img_h:
                    top = random.randint(0, img_h - h)
                    left = random.randint(0, img_w - w)
                    x[:, top:top + h, left:left + w] = self._fill(chans, h, w)
                    break
        return x

    def __repr__(self) -> str:
        return f'RandomErasing(p={self.probability}, mode={self.mode}, count=({self.min_count}, {self.max_count}))'
