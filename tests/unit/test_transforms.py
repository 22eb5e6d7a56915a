"""Transforms against timm/torchvision fixtures (tools/make_transform_fixtures.py) and statistical checks."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
from PIL import Image

from helpers import FIXTURES
from util.errors import UserError
from util.transforms import build_transform
from util.transforms import randaugment as ra
from util.transforms.ops import ColorJitter, RandomCrop, RandomResizedCrop, RandomRotation, adjust_hue
from util.transforms.random_erasing import RandomErasing

FIX = os.path.join(FIXTURES, 'transforms')
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
FILL = (124, 116, 104)  # round(255 * mean), what timm's create_transform gives RandAugment


def load(name: str):
    return np.load(os.path.join(FIX, f'{name}.npz'))


def image(h: int = 40, w: int = 56, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    arr = np.clip(arr + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


# ----------------------------------------------------------------------------- eval transform

def test_eval_transform_matches_torchvision():
    fx = load('eval')
    for k in range(4):
        img = Image.fromarray(fx[f'input_{k}'])
        for size in (32, 48):
            ours = build_transform(False, size, MEAN, STD)(img)
            ref = fx[f'output_{k}_{size}']
            assert ours.dtype == np.float32 and ours.shape == ref.shape == (3, size, size)
            assert np.abs(ours - ref).max() <= 1e-6, (k, size)


def test_eval_transform_crop_pct_one_above_224():
    fx = load('eval')
    img = Image.fromarray(fx['input_2'])
    out = build_transform(False, 240, MEAN, STD)(img)
    assert out.shape == (3, 240, 240)
    # undo the normalisation to compare with the uint8 reference crop
    pixels = np.rint((out * np.array(STD, np.float32)[:, None, None]
                      + np.array(MEAN, np.float32)[:, None, None]) * 255).astype(np.int64)
    np.testing.assert_array_equal(pixels[:, 104:136, 104:136].transpose(1, 2, 0), fx['crop_2_240_window'])
    np.testing.assert_array_equal(pixels.reshape(3, -1).sum(1), fx['crop_2_240_sum'])


def test_eval_transform_is_deterministic_and_handles_grayscale():
    t = build_transform(False, 32)
    img = image()
    np.testing.assert_array_equal(t(img), t(img))
    assert t(img.convert('L')).shape == (3, 32, 32)


# ----------------------------------------------------------------------------- RandAugment ops

def test_each_randaugment_op_matches_timm_at_fixed_magnitude_and_sign():
    fx = load('ops')
    src = Image.fromarray(fx['input'])
    checked = 0
    for key in fx.files:
        if key.startswith('args_') or key in ('input', 'names', 'generator'):
            continue
        name, m, s, interp = key.rsplit('_', 3)
        magnitude, sign = float(m[1:]), int(s[1:])
        args = ra.op_args(name, magnitude, sign)
        np.testing.assert_allclose(np.array(args, dtype=np.float64), fx['args_' + key], rtol=0, atol=1e-12)
        resample = Image.Resampling.BICUBIC if interp == 'bicubic' else Image.Resampling.BILINEAR
        ours = np.asarray(ra.apply_op(name, src, args, FILL, resample)).astype(int)
        diff = np.abs(ours - fx[key].astype(int)).max()
        assert diff <= 1, f'{key}: max diff {diff} grey levels'
        checked += 1
    names = {k.rsplit('_', 3)[0] for k in fx.files if not k.startswith('args_') and '_m' in k}
    assert set(ra.INCREASING_OPS) <= names and set(ra.DEFAULT_OPS) <= names
    assert checked >= 60


def test_posterize_zero_bits_is_black_like_old_pillow():
    # timm + Pillow >= 11 raises here; the reference (older Pillow) produced a black image
    img = image()
    out = ra.apply_op('PosterizeIncreasing', img, ra.op_args('PosterizeIncreasing', 10), FILL, 3)
    assert np.asarray(out).max() == 0


@pytest.mark.parametrize('interp', ['bicubic', 'random'])
def test_randaugment_matches_timm_seed_for_seed(interp):
    fx = load('randaugment')
    src = Image.fromarray(fx['input'])
    resample = ra.BICUBIC if interp == 'bicubic' else ra.RANDOM_INTERPOLATION
    changed = 0
    for c, cfg in enumerate(fx['configs']):
        t = ra.rand_augment_transform(str(cfg), fill=FILL, interpolation=resample)
        for seed in range(8):
            random.seed(seed)
            np.random.seed(seed)
            ours = np.asarray(t(src))
            ref = fx[f'out_{c}_{interp}_{seed}']
            assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1, (cfg, seed)
            changed += not np.array_equal(ours, fx['input'])
    assert changed >= 16  # the reference images really were augmented


def test_randaugment_changes_images_in_the_train_transform():
    random.seed(0)
    np.random.seed(0)
    img = image(32, 32)
    with_ra = build_transform(True, 32, aa='rand-m9-mstd0.5-inc1', reprob=0, hflip=0)
    without = build_transform(True, 32, aa='none', reprob=0, hflip=0)
    assert any(isinstance(t, ra.RandAugment) for t in with_ra.transforms)
    assert not any(isinstance(t, ra.RandAugment) for t in without.transforms)
    # identical seeds give identical crops (the crop draws first), so any difference is RandAugment's
    differ = 0
    for seed in range(20):
        random.seed(seed); np.random.seed(seed)
        a = with_ra(img)
        random.seed(seed); np.random.seed(seed)
        b = without(img)
        differ += not np.allclose(a, b)
    assert differ >= 15


@pytest.mark.parametrize('bad', ['rand-m9-foo1', 'rand-mx', 'augmix-m3', 'rand-m9.5', 'rand-p1.5', 'v0'])
def test_bad_aa_string_raises_user_error_with_grammar(bad):
    with pytest.raises(UserError, match="expected 'rand' followed by"):
        build_transform(True, 32, aa=bad)


def test_parse_rand_augment_keys():
    cfg = ra.parse_rand_augment('rand-m7-n3-mstd101-mmax15-inc1-p0.8')
    assert cfg == dict(magnitude=7.0, num_ops=3, magnitude_std=float('inf'), magnitude_max=15.0,
                       increasing=True, prob=0.8)
    t = ra.rand_augment_transform('rand-m9-mstd0.5-inc1')
    assert t.num_ops == 2 and [op.name for op in t.ops] == ra.INCREASING_OPS
    assert all(op.prob == 0.5 and op.magnitude == 9 and op.magnitude_std == 0.5 for op in t.ops)


def test_train_transform_uses_mean_fill_and_fixed_interpolation():
    t = build_transform(True, 32, MEAN, STD, interpolation='bicubic')
    aug = next(x for x in t.transforms if isinstance(x, ra.RandAugment))
    assert all(op.fill == FILL and op.interpolation == ra.BICUBIC for op in aug.ops)
    t = build_transform(True, 32, interpolation='random')
    aug = next(x for x in t.transforms if isinstance(x, ra.RandAugment))
    assert aug.ops[0].interpolation == ra.RANDOM_INTERPOLATION


# ----------------------------------------------------------------------------- RandomResizedCrop

def test_random_resized_crop_boxes_match_timm():
    fx = load('rrc')
    for k in range(5):
        h, w = fx[f'shape_{k}']
        img = Image.new('RGB', (int(w), int(h)))
        for seed, ref in enumerate(fx[f'boxes_{k}']):
            random.seed(seed)
            assert RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) == tuple(ref), (k, seed)


@pytest.mark.parametrize('interp', ['bicubic', 'random'])
def test_random_resized_crop_output_matches_timm(interp):
    fx = load('rrc')
    t = RandomResizedCrop(24, interpolation=interp)
    for seed in range(6):
        random.seed(seed)
        np.testing.assert_array_equal(np.asarray(t(Image.fromarray(fx['input']))), fx[f'out_{interp}_{seed}'])


def test_train_transform_upsamples_tiny_images():
    t = build_transform(True, 64)
    out = t(image(28, 28))
    assert out.shape == (3, 64, 64) and out.dtype == np.float32 and np.isfinite(out).all()


# ----------------------------------------------------------------------------- RandomErasing

@pytest.mark.parametrize('p,count', [(1.0, 1), (1.0, 3), (0.25, 1)])
def test_random_erasing_rectangles_match_timm(p, count):
    masks = np.unpackbits(load('erasing')[f'masks_p{p}_c{count}'], axis=-1)[..., :40].astype(bool)
    t = RandomErasing(p, mode='const', max_count=count)
    for seed, ref in enumerate(masks):
        random.seed(seed)
        ours = t(np.ones((3, 24, 40), np.float32))[0] == 0
        np.testing.assert_array_equal(ours, ref, err_msg=f'seed {seed}')


def test_random_erasing_pixel_mode_is_standard_normal_noise_in_a_rectangle():
    random.seed(1)
    np.random.seed(1)
    t = RandomErasing(1.0, mode='pixel')
    x = np.full((3, 64, 64), 7.0, np.float32)
    noise = []
    for _ in range(200):
        y = t(x)
        erased = y != 7.0
        assert erased.any()
        rows, cols = np.where(erased.any(0))
        # the erased set is one axis-aligned rectangle, identical across channels
        box = np.zeros((64, 64), bool)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert (erased.any(0) == box).all() and (erased[0] == box).all()
        noise.append(y[:, box].ravel())
    noise = np.concatenate(noise)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02
    np.testing.assert_array_equal(x, 7.0)  # input untouched


def test_random_erasing_probability_and_modes():
    random.seed(2)
    np.random.seed(2)
    t = RandomErasing(0.25, mode='pixel')
    hits = sum((t(np.zeros((3, 32, 32), np.float32)) != 0).any() for _ in range(2000))
    assert 0.22 < hits / 2000 < 0.28
    y = RandomErasing(1.0, mode='rand')(np.full((3, 32, 32), 9.0, np.float32))
    vals = [np.unique(y[c][y[c] != 9.0]) for c in range(3)]
    assert all(len(v) == 1 for v in vals)  # one colour per channel
    y = RandomErasing(1.0, mode='const')(np.full((3, 32, 32), 9.0, np.float32))
    assert (y == 0).any() and set(np.unique(y)) == {0.0, 9.0}
    with pytest.raises(UserError):
        RandomErasing(1.0, mode='noise')


def test_train_transform_reprob_zero_has_no_erasing():
    assert not any(isinstance(x, RandomErasing) for x in build_transform(True, 32, reprob=0).transforms)
    t = build_transform(True, 32, reprob=0.25, remode='pixel', recount=2)
    er = t.transforms[-1]
    assert isinstance(er, RandomErasing) and er.mode == 'pixel' and er.max_count == 2


# ----------------------------------------------------------------------------- colour jitter

def test_color_jitter_only_without_randaugment():
    names = lambda t: [type(x).__name__ for x in t.transforms]  # noqa: E731
    assert 'ColorJitter' not in names(build_transform(True, 32, aa='rand-m9-mstd0.5-inc1', color_jitter=0.4))
    assert 'ColorJitter' in names(build_transform(True, 32, aa=None, color_jitter=0.4))
    assert 'ColorJitter' in names(build_transform(True, 32, aa='', color_jitter=0.4))
    assert 'ColorJitter' not in names(build_transform(True, 32, aa='none', color_jitter=None))


def test_color_adjustments_match_torchvision():
    fx = load('jitter')
    src = Image.fromarray(fx['input'])
    for f in (0.6, 1.4):
        for kind, idx in (('brightness', 0), ('contrast', 1), ('saturation', 2)):
            ranges = [None] * 4
            ranges[idx] = (f, f)
            cj = ColorJitter()
            cj.ranges = ranges
            np.testing.assert_array_equal(np.asarray(cj(src)), fx[f'{kind}_{f}'], err_msg=f'{kind} {f}')
    for f in (-0.3, -0.01, 0.2, 0.5):
        np.testing.assert_array_equal(np.asarray(adjust_hue(src, f)), fx[f'hue_{f}'], err_msg=f'hue {f}')


# ----------------------------------------------------------------------------- whole train pipeline

def test_train_transform_output_and_randomness_follow_the_seed():
    t = build_transform(True, 32)
    img = image()
    random.seed(5); np.random.seed(5)
    a = t(img)
    random.seed(5); np.random.seed(5)
    b = t(img)
    c = t(img)
    assert a.shape == (3, 32, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(b, c)


def test_hflip_probability():
    random.seed(3)
    t = build_transform(True, 8, aa='none', reprob=0, hflip=0.5)
    # a left-dark / right-bright image: a flip puts the bright half on the left
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[:, 4:] = 255
    img = Image.fromarray(arr)
    t.transforms[1].scale = (1.0, 1.0)  # full-image crop
    t.transforms[1].ratio = (1.0, 1.0)
    flips = 0
    for _ in range(1000):
        out = t(img)
        flips += out[0, 0, 0] > out[0, 0, -1]
    assert 450 < flips < 550


def test_color_jitter_draw_then_apply_is_the_same_stream_as_call():
    cj = ColorJitter(0.4, 0.4, 0.4, 0.1)
    img = image()
    random.seed(11)
    a = np.asarray(cj(img))
    random.seed(11)
    params = cj.get_params()
    assert sorted(k for k, _ in params) == [0, 1, 2, 3]
    np.testing.assert_array_equal(np.asarray(ColorJitter.apply(img, params)), a)


def test_retfound_vflip_is_opt_in():
    names = lambda t: [type(x).__name__ for x in t.transforms]  # noqa: E731
    base = names(build_transform(True, 32))
    assert 'RandomVerticalFlip' not in base and 'RandomRotation' not in base
    with_v = names(build_transform(True, 32, vflip=0.5))
    assert with_v == base[:3] + ['RandomVerticalFlip'] + base[3:]


# ----------------------------------------------------------------------------- policy 'basic'

def basic(size=32, **kw):
    kw = dict(dict(hflip=0.0, vflip=0.0, rotation=0.0), **kw)
    return build_transform(True, size, MEAN, STD, policy='basic', **kw)


def unnormalise(x):
    return np.rint((x * np.array(STD, np.float32)[:, None, None]
                    + np.array(MEAN, np.float32)[:, None, None]) * 255).astype(np.int64).transpose(1, 2, 0)


def test_basic_policy_steps_shape_and_normalisation():
    t = build_transform(True, 28, MEAN, STD, policy='basic', crop_pct=0.875, vflip=0.5, color_jitter=0.3,
                        aa='rand-m9-mstd0.5-inc1', reprob=0.5)
    assert [type(x).__name__ for x in t.transforms] == [
        'ToRGB', 'Resize', 'RandomCrop', 'RandomHorizontalFlip', 'RandomVerticalFlip', 'RandomRotation',
        'ColorJitter', 'ToArrayNormalize']  # no RandAugment, no erasing
    assert t.transforms[1].size == 32 and t.transforms[2].size == 28
    out = t(image(40, 56))
    assert out.shape == (3, 28, 28) and out.dtype == np.float32 and np.isfinite(out).all()
    # a flat colour survives crop, flips and (black corners aside) rotation: check exact normalisation
    flat = Image.new('RGB', (40, 40), (200, 100, 50))
    x = basic()(flat)
    expected = (np.array([200, 100, 50], np.float32) / np.float32(255) - np.array(MEAN, np.float32)) \
        / np.array(STD, np.float32)
    np.testing.assert_allclose(x[:, 16, 16], expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(unnormalise(x), np.broadcast_to([200, 100, 50], (32, 32, 3)))


def test_basic_policy_crops_at_random_positions_of_the_resized_image():
    img = image(40, 40)
    t = basic(32, crop_pct=0.5)  # resize to 64, crop 32
    resized = np.asarray(img.resize((64, 64), Image.Resampling.BICUBIC)).astype(np.int64)
    seen = set()
    for seed in range(12):
        random.seed(seed)
        out = unnormalise(t(img))
        hits = [(top, left) for top in range(33) for left in range(33)
                if np.array_equal(resized[top:top + 32, left:left + 32], out)]
        assert len(hits) == 1, seed
        seen.add(hits[0])
    assert len(seen) >= 10
    padded = RandomCrop(16)(Image.new('RGB', (10, 12), (255, 255, 255)))
    assert padded.size == (16, 16) and np.asarray(padded)[0, 0].max() == 0


def test_basic_policy_vertical_flip_happens():
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:8] = 255  # bright top band
    img = Image.fromarray(arr)
    assert unnormalise(basic(vflip=0.0)(img))[0, 0, 0] == 255
    flipped = unnormalise(basic(vflip=1.0)(img))
    assert flipped[0, 0, 0] == 0 and flipped[-1, 0, 0] == 255
    random.seed(0)
    t = basic(vflip=0.5)
    flips = sum(unnormalise(t(img))[-1, 0, 0] == 255 for _ in range(400))
    assert 160 < flips < 240


def test_basic_policy_rotation_happens_with_black_corners():
    white = Image.new('RGB', (32, 32), (255, 255, 255))
    assert (unnormalise(basic(rotation=0.0)(white)) == 255).all()
    t = basic(rotation=90.0)
    rotated = 0
    for seed in range(20):
        random.seed(seed)
        out = unnormalise(t(white))
        assert (out[16, 16] == 255).all()
        rotated += out[0, 0].max() == 0 or out[-1, -1].max() == 0
    assert rotated >= 17
    # direction and exactness on an asymmetric image: +90 degrees is counter-clockwise (np.rot90)
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[2:6, 10:14] = 255
    rot = RandomRotation(90.0, 'nearest')
    np.testing.assert_array_equal(np.asarray(rot.apply(Image.fromarray(arr), 90.0)), np.rot90(arr))
    random.seed(4)
    angles = [rot.get_params() for _ in range(2000)]
    assert min(angles) < -85 and max(angles) > 85 and abs(np.mean(angles)) < 4


def test_basic_policy_color_jitter_only_when_given():
    names = lambda t: [type(x).__name__ for x in t.transforms]  # noqa: E731
    assert 'ColorJitter' not in names(basic())
    assert 'ColorJitter' not in names(basic(color_jitter=0.0))
    assert 'ColorJitter' in names(basic(color_jitter=(0.2, 0.2, 0.2, 0.05)))


def test_eval_transform_does_not_depend_on_the_policy():
    img = image()
    np.testing.assert_array_equal(build_transform(False, 32, policy='basic', vflip=1.0)(img),
                                  build_transform(False, 32)(img))


@pytest.mark.parametrize('kw,match', [
    (dict(policy='basci'), "did you mean 'basic'"),
    (dict(policy='basic', vflip=1.5), '--vflip'),
    (dict(policy='basic', hflip=-0.1), '--hflip'),
    (dict(policy='basic', rotation=-5.0), '--rotation'),
    (dict(policy='basic', crop_pct=1.2), 'crop_pct'),
])
def test_bad_policy_settings_raise_user_errors(kw, match):
    with pytest.raises(UserError, match=match):
        build_transform(True, 32, **kw)
