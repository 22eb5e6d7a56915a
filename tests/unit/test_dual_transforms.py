"""Dual-eye transforms: the pair stays anatomically consistent (flip+swap, shared vflip and jitter) while
crop and rotation vary per eye; eval is the single-view eval transform on each eye."""
from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
from PIL import Image

from util.errors import UserError
from util.transforms import build_transform
from util.transforms.dual import build_dual_transform

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
S = 16


def pixels(x):
    """Normalised [3, S, S] back to uint8-valued [S, S, 3] ints."""
    return np.rint((x * np.array(STD, np.float32)[:, None, None]
                    + np.array(MEAN, np.float32)[:, None, None]) * 255).astype(np.int64).transpose(1, 2, 0)


def eyes():
    """Left eye: red left half (a marker for 'optic disc on this side'); right eye: all green."""
    left = np.zeros((S, S, 3), np.uint8)
    left[:, :S // 2, 0] = 255
    right = np.zeros((S, S, 3), np.uint8)
    right[..., 1] = 255
    return Image.fromarray(left), Image.fromarray(right), left, right


def dual(**kw):
    kw = dict(dict(crop_pct=1.0, hflip=0.0, vflip=0.0, rotation=0.0), **kw)
    return build_dual_transform(True, S, MEAN, STD, **kw)


def test_output_shape_dtype_and_order():
    left, right, left_arr, right_arr = eyes()
    out = dual()([left, right])
    assert out.shape == (2, 3, S, S) and out.dtype == np.float32
    np.testing.assert_array_equal(pixels(out[0]), left_arr)
    np.testing.assert_array_equal(pixels(out[1]), right_arr)


def test_hflip_mirrors_both_eyes_and_swaps_them():
    left, right, left_arr, right_arr = eyes()
    out = dual(hflip=1.0)([left, right])
    np.testing.assert_array_equal(pixels(out[0]), right_arr[:, ::-1])  # mirrored right eye in the left slot
    np.testing.assert_array_equal(pixels(out[1]), left_arr[:, ::-1])   # red now on the right half
    assert pixels(out[1])[0, -1, 0] == 255 and pixels(out[1])[0, 0, 0] == 0


def test_hflip_coin_is_shared_and_fair():
    left, right, _, _ = eyes()
    t = dual(hflip=0.5)
    random.seed(0)
    swaps = 0
    for _ in range(400):
        out = [pixels(x) for x in t([left, right])]
        swapped = out[0][0, 0, 1] == 255           # green in slot 0
        mirrored_left = out[1 if swapped else 0][0, -1, 0] == 255
        assert swapped == mirrored_left             # never one without the other
        swaps += swapped
    assert 160 < swaps < 240


def test_vflip_coin_flips_both_eyes_together():
    top = np.zeros((S, S, 3), np.uint8)
    top[:4] = 255
    img = Image.fromarray(top)
    out = dual(vflip=1.0)([img, img.copy()])
    for x in out:
        np.testing.assert_array_equal(pixels(x), top[::-1])
    t = dual(vflip=0.5)
    random.seed(1)
    flips = 0
    for _ in range(300):
        a, b = (pixels(x)[-1, 0, 0] == 255 for x in t([img, img.copy()]))
        assert a == b
        flips += a
    assert 110 < flips < 190


def test_colour_jitter_factors_are_shared():
    rng = np.random.default_rng(0)
    arr = rng.integers(30, 220, (S, S, 3)).astype(np.uint8)
    img = Image.fromarray(arr)
    t = dual(color_jitter=(0.4, 0.4, 0.4, 0.1))
    changed = 0
    for seed in range(10):
        random.seed(seed)
        a, b = t([img, img.copy()])
        np.testing.assert_array_equal(a, b)  # identical inputs -> identical outputs
        changed += not np.array_equal(pixels(a), arr)
    assert changed == 10


def test_rotation_is_drawn_per_eye():
    white = Image.new('RGB', (S, S), (255, 255, 255))
    t = dual(rotation=45.0)
    differ = 0
    for seed in range(10):
        random.seed(seed)
        a, b = t([white, white.copy()])
        # replay the draw order: (top, left) crop per eye (fixed here), then one angle per eye
        random.seed(seed)
        for _ in range(4):
            random.randint(0, 0)
        angles = random.uniform(-45, 45), random.uniform(-45, 45)
        for x, angle in zip((a, b), angles):
            np.testing.assert_array_equal(
                pixels(x), np.asarray(white.rotate(angle, resample=Image.Resampling.BICUBIC)))
        differ += not np.array_equal(a, b)
    assert differ == 10


def test_crop_position_is_drawn_per_eye():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (S, S, 3)).astype(np.uint8))
    t = dual(crop_pct=0.5)  # resize to 2S, crop S
    random.seed(3)
    differ = sum(not np.array_equal(*t([img, img.copy()])) for _ in range(10))
    assert differ >= 9


def test_eval_is_the_single_view_transform_per_eye_and_deterministic():
    rng = np.random.default_rng(2)
    left = Image.fromarray(rng.integers(0, 255, (30, 40, 3)).astype(np.uint8))
    right = Image.fromarray(rng.integers(0, 255, (36, 28, 3)).astype(np.uint8))
    t = build_dual_transform(False, S, MEAN, STD, hflip=1.0, vflip=1.0, rotation=90.0, color_jitter=0.4)
    a, b = t([left, right]), t([left, right])
    np.testing.assert_array_equal(a, b)
    single = build_transform(False, S, MEAN, STD)
    np.testing.assert_array_equal(a[0], single(left))
    np.testing.assert_array_equal(a[1], single(right))


def test_differently_sized_and_grayscale_eyes_and_pickling():
    t = pickle.loads(pickle.dumps(build_dual_transform(True, S, MEAN, STD, color_jitter=0.2)))
    out = t([Image.new('L', (40, 30), 100), Image.new('RGB', (20, 50), (10, 200, 30))])
    assert out.shape == (2, 3, S, S) and np.isfinite(out).all()


def test_bad_inputs():
    t = dual()
    with pytest.raises(ValueError, match='left, right'):
        t(Image.new('RGB', (S, S)))
    with pytest.raises(UserError, match='--vflip'):
        build_dual_transform(True, S, vflip=2.0)
    with pytest.raises(UserError, match='--rotation'):
        build_dual_transform(True, S, rotation=-1.0)
