"""Fundus preprocessing (FOV crop, circle crop, resize) and the caching FundusReader."""
from __future__ import annotations

import glob
import importlib
import multiprocessing as mp
import os
import pickle
import warnings

import numpy as np
import pytest
from PIL import Image

from util.errors import UserError
from util.transforms import fundus
from util.transforms.fundus import FundusReader, build_preprocess, circle_crop, fov_crop, resize_shorter


def synthetic_fundus(h=56, w=72, cx=38.0, cy=27.0, r=20.0, seed=0, noise=True):
    """A reddish disc on a black frame; returns (image, disc bounding box (left, top, right, bottom)).

    The disc's outer ring is dim red (R=24): its grey level (~9.7) is below the default threshold 10,
    its red channel is not. With ``noise``: faint sensor noise (0-6) everywhere in the frame, a few
    isolated bright specks in the frame, and dark pepper pixels inside the disc.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    d = np.hypot(xx - cx, yy - cy)
    disc = d <= r
    arr = np.zeros((h, w, 3), np.uint8)
    arr[disc] = (180, 80, 40)
    arr[disc & (d > r - 2)] = (24, 4, 2)
    if noise:
        arr[~disc] = rng.integers(0, 7, (int((~disc).sum()), 3))
        frame = np.argwhere(~disc & (d > r + 3))
        for y, x in frame[rng.choice(len(frame), 5, replace=False)]:
            arr[y, x] = 255
        inner = np.argwhere(d < r - 4)
        for y, x in inner[rng.choice(len(inner), 8, replace=False)]:
            arr[y, x] = 0
    rows, cols = np.where(disc.any(1))[0], np.where(disc.any(0))[0]
    return Image.fromarray(arr), (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)


def naive_box(img, threshold=10):
    """The usual one-liner (bounding box of all pixels above the threshold), for contrast."""
    m = np.asarray(img).max(2) > threshold
    rows, cols = np.where(m.any(1))[0], np.where(m.any(0))[0]
    return cols[0], rows[0], cols[-1] + 1, rows[-1] + 1


# ----------------------------------------------------------------------------- fov_crop

@pytest.mark.parametrize('seed', range(4))
def test_fov_crop_finds_the_disc_despite_noise(seed):
    img, expected = synthetic_fundus(seed=seed)
    assert naive_box(img) != expected  # the specks really would fool a plain bounding box
    box = fundus.fov_box(img)
    assert all(abs(a - b) <= 1 for a, b in zip(box, expected)), (box, expected)
    out = fov_crop(img)
    assert out.size == (box[2] - box[0], box[3] - box[1])
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img)[box[1]:box[3], box[0]:box[2]])


def test_fov_crop_keeps_the_dim_red_rim():
    # max channel, not grey level: the R=24 rim (grey ~9.7) is part of the field of view
    img, expected = synthetic_fundus(noise=False)
    assert fundus.fov_box(img) == tuple(expected)
    grey = np.asarray(img.convert('L'))
    rows = np.where((grey > 10).any(1))[0]
    assert rows[0] > expected[1]  # a grey-level threshold would have cut the rim


def test_fov_crop_drops_a_label_burnt_into_the_frame():
    img, expected = synthetic_fundus(h=56, w=96, cx=60, noise=False)
    arr = np.asarray(img).copy()
    arr[40:50, 2:14] = 255  # "OD" text in the bottom-left corner, columns apart from the disc
    box = fundus.fov_box(Image.fromarray(arr))
    assert box == tuple(expected)


def test_fov_crop_disc_clipped_by_the_frame():
    # typical camera framing: disc wider than the image height, black only left and right
    img, expected = synthetic_fundus(h=40, w=80, cx=40, cy=20, r=26, noise=False)
    assert expected[1] == 0 and expected[3] == 40
    out = fov_crop(img)
    assert abs(out.size[0] - (expected[2] - expected[0])) <= 1 and out.size[1] == 40


def test_fov_crop_on_dark_or_full_images_returns_them_unchanged():
    dark = Image.fromarray(np.random.default_rng(0).integers(0, 8, (30, 40, 3)).astype(np.uint8))
    assert fov_crop(dark) is dark
    specks = np.asarray(dark).copy()
    specks[[3, 10, 20], [5, 30, 12]] = 255  # only isolated bright pixels: nothing to crop to
    img = Image.fromarray(specks)
    assert fov_crop(img) is img
    full = Image.new('RGB', (20, 10), (90, 60, 30))
    assert fov_crop(full) is full
    assert fov_crop(Image.new('RGB', (1, 1))).size == (1, 1)


def test_fov_crop_threshold_and_grayscale():
    img, expected = synthetic_fundus(noise=False)
    assert fov_crop(img.convert('L'), threshold=10).mode == 'L'
    # above the rim's red level, the rim is no longer part of the FOV
    box = fundus.fov_box(img, threshold=40)
    assert box[0] >= expected[0] + 1 and box[2] <= expected[2] - 1


# ----------------------------------------------------------------------------- circle_crop

def test_circle_crop_blackens_the_corners_of_the_central_square():
    arr = np.full((40, 60, 3), 200, np.uint8)
    arr[:, :10] = 50   # outside the central square: must not appear
    arr[:, 50:] = 50
    out = np.asarray(circle_crop(Image.fromarray(arr)))
    assert out.shape == (40, 40, 3)
    for y, x in [(0, 0), (0, 39), (39, 0), (39, 39), (3, 3), (36, 36)]:
        assert (out[y, x] == 0).all(), (y, x)
    assert (out[20, 20] == 200).all() and (out[0, 20] == 200).all() and (out[20, 0] == 200).all()
    kept = (out.max(2) > 0).sum()
    assert abs(kept - np.pi * 20 ** 2) < 40
    assert set(np.unique(out)) == {0, 200}  # the square came from the centre (no 50s)


def test_circle_crop_portrait_and_modes():
    out = circle_crop(Image.new('L', (30, 50), 255))
    assert out.size == (30, 30) and out.mode == 'L' and np.asarray(out)[0, 0] == 0


# ----------------------------------------------------------------------------- build_preprocess

def test_fov_circle_is_fov_then_circle_then_fov():
    img, _ = synthetic_fundus(h=56, w=90, cx=45, cy=28, r=30, seed=1)
    pre = build_preprocess('fov_circle')
    out = pre(img)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(fov_crop(circle_crop(fov_crop(img)))))
    assert out.mode == 'RGB'
    a = np.asarray(out)
    assert a[0, 0].max() <= 6 and a[-1, -1].max() <= 6  # corners black(ish: sensor noise inside the square)
    np.testing.assert_array_equal(np.asarray(build_preprocess('fov')(img)), np.asarray(fov_crop(img)))
    np.testing.assert_array_equal(np.asarray(build_preprocess('circle')(img)), np.asarray(circle_crop(img)))


def test_size_resizes_the_shorter_side():
    img, _ = synthetic_fundus(h=56, w=90, cx=45, cy=28, r=30, noise=False)
    out = build_preprocess('fov', size=24)(img)
    assert min(out.size) == 24
    assert build_preprocess('none') is None
    only_resize = build_preprocess('none', size=28)
    assert only_resize(img).size == (45, 28)
    assert resize_shorter(Image.new('RGB', (10, 20)), 40).size == (40, 80)  # upscales too


def test_downscale_is_antialiased():
    # a 1-pixel checkerboard shrunk 8x must become flat grey, not a moire of black and white
    checker = ((np.indices((256, 256)).sum(0) % 2) * 255).astype(np.uint8)
    out = np.asarray(resize_shorter(Image.fromarray(checker).convert('RGB'), 32)).astype(int)
    assert out.shape == (32, 32, 3) and np.abs(out - 127.5).max() <= 3


def test_preprocess_key_changes_with_every_setting():
    keys = {build_preprocess(m, t, s).key for m in ('fov', 'circle', 'fov_circle') for t in (10, 20)
            for s in (0, 32)}
    assert len(keys) == 12
    assert build_preprocess('fov', 10, 0).key == build_preprocess('fov', 10, 0).key
    assert build_preprocess('none', 10, 32).key != build_preprocess('fov', 10, 32).key


def test_bad_preprocess_settings_raise_user_errors():
    with pytest.raises(UserError, match="'fov_circle'"):
        build_preprocess('fov_circel')
    with pytest.raises(UserError, match='threshold'):
        build_preprocess('fov', threshold=300)
    with pytest.raises(UserError, match='size'):
        build_preprocess('fov', size=-1)
    with pytest.raises(UserError, match='size'):
        build_preprocess('fov', size=2.5)


# ----------------------------------------------------------------------------- FundusReader

@pytest.fixture
def photo(tmp_path):
    img, _ = synthetic_fundus(seed=2)
    path = str(tmp_path / 'img' / '0_left.jpg')
    os.makedirs(os.path.dirname(path))
    img.save(path, quality=95)
    return path


def count_decodes(monkeypatch):
    calls = []
    real = fundus._decode

    def counting(path):
        calls.append(path)
        return real(path)
    monkeypatch.setattr(fundus, '_decode', counting)
    return calls


def test_reader_without_cache_decodes_and_preprocesses(photo, tmp_path):
    pre = build_preprocess('fov_circle', size=24)
    reader = FundusReader(pre)
    out = reader(photo)
    with Image.open(photo) as raw:
        expected = pre(raw.convert('RGB'))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    assert out.mode == 'RGB' and min(out.size) == 24
    assert reader.process(Image.open(photo)).size == out.size
    assert FundusReader(None)(photo).size == (72, 56)
    assert FundusReader(None, cache_dir=str(tmp_path / 'c')).cache_dir is None  # nothing to cache


def test_reader_errors_name_the_file(photo, tmp_path):
    missing = str(tmp_path / 'img' / 'nope.jpg')
    broken = str(tmp_path / 'img' / 'broken.jpg')
    with open(photo, 'rb') as f:
        data = f.read()
    with open(broken, 'wb') as f:
        f.write(data[:len(data) // 2])
    for cache in (None, str(tmp_path / 'cache')):
        reader = FundusReader(build_preprocess('fov'), cache)
        for path in (missing, broken):
            with pytest.raises(UserError, match=os.path.basename(path)):
                reader(path)
    assert not glob.glob(str(tmp_path / 'cache' / '**' / '*.png'), recursive=True)


def test_cache_hit_does_not_decode_the_original(photo, tmp_path, monkeypatch):
    calls = count_decodes(monkeypatch)
    reader = FundusReader(build_preprocess('fov_circle', size=20), str(tmp_path / 'cache'))
    first = reader(photo)
    entry = reader.cache_path(photo)
    assert os.path.isfile(entry) and entry.endswith('.png') and '0_left-' in os.path.basename(entry)
    assert (reader.hits, reader.misses, len(calls)) == (0, 1, 1)
    second = reader(photo)
    assert (reader.hits, reader.misses, len(calls)) == (1, 1, 1)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))  # PNG is lossless

    # make the original undecodable while keeping its size and mtime: reads still work, from the cache
    st = os.stat(photo)
    with open(photo, 'wb') as f:
        f.write(b'\0' * st.st_size)
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns))
    clone = pickle.loads(pickle.dumps(reader))  # what a DataLoader worker gets
    np.testing.assert_array_equal(np.asarray(clone(photo)), np.asarray(first))
    assert clone.hits == 2 and len(calls) == 1


def test_cache_is_invalidated_by_file_and_settings_changes(photo, tmp_path, monkeypatch):
    calls = count_decodes(monkeypatch)
    cache = str(tmp_path / 'cache')
    reader = FundusReader(build_preprocess('fov'), cache)
    reader(photo)
    entry = reader.cache_path(photo)

    # same bytes, newer mtime
    st = os.stat(photo)
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert reader.cache_path(photo) != entry
    reader(photo)
    assert reader.misses == 2

    # different content and size (an edited image): the new pixels come back, not the cached ones
    Image.new('RGB', (30, 30), (0, 200, 0)).save(photo, quality=95)
    out = reader(photo)
    assert reader.misses == 3 and out.size == (30, 30)

    # same file, other preprocessing: another entry
    other = FundusReader(build_preprocess('fov', size=16), cache)
    assert other.cache_path(photo) != reader.cache_path(photo)
    assert min(other(photo).size) == 16 and other.misses == 1
    assert len(calls) == 4
    assert len(glob.glob(os.path.join(cache, '*', '*.png'))) == 4


def test_corrupt_cache_entry_is_regenerated(photo, tmp_path):
    reader = FundusReader(build_preprocess('fov'), str(tmp_path / 'cache'))
    good = np.asarray(reader(photo))
    entry = reader.cache_path(photo)
    for damage in (lambda b: b[:len(b) // 2], lambda b: b''):
        with open(entry, 'rb') as f:
            data = f.read()
        with open(entry, 'wb') as f:
            f.write(damage(data))
        np.testing.assert_array_equal(np.asarray(reader(photo)), good)
        with Image.open(entry) as fixed:
            fixed.load()  # rewritten complete
    assert reader.repaired == 2 and reader.misses == 3


def test_failed_cache_write_leaves_no_partial_file_and_still_returns(photo, tmp_path, monkeypatch):
    reader = FundusReader(build_preprocess('fov'), str(tmp_path / 'cache'))
    real_save = Image.Image.save

    def half_save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        with open(fp, 'r+b') as f:
            f.truncate(20)
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(Image.Image, 'save', half_save)
    with pytest.warns(UserWarning, match='cannot write the preprocessing cache'):
        out = reader(photo)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # warned once only
        reader(photo)
    assert out.mode == 'RGB' and out.size == fov_crop(Image.open(photo)).size
    assert os.listdir(os.path.dirname(reader.cache_path(photo))) == []  # no entry, no temporary file


def test_unusable_cache_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    with pytest.raises(UserError, match='cannot create the preprocessing cache folder'):
        FundusReader(build_preprocess('fov'), str(blocker / 'cache'))


def _worker(path, cache, barrier, queue):
    reader = FundusReader(build_preprocess('fov_circle'), cache)
    barrier.wait()  # all workers miss at the same moment and write the same entry
    outs = [np.asarray(reader(path)) for _ in range(3)]
    queue.put((outs, reader.misses, reader.repaired))


def test_concurrent_workers_share_the_cache(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(20, 255, (160, 200, 3)).astype(np.uint8))  # large enough to write slowly
    path = str(tmp_path / 'noisy.png')
    img.save(path)
    cache = str(tmp_path / 'cache')
    expected = np.asarray(build_preprocess('fov_circle')(img))
    importlib.import_module('util.datasets')  # the decoder's module (imports paddle): once here, not per child
    ctx = mp.get_context('fork')  # as Paddle's DataLoader workers
    n = 4
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(path, cache, barrier, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(r[1] for r in results) >= 1
    for outs, misses, repaired in results:
        assert repaired == 0 and misses <= 1  # a late worker may find the entry already written
        for out in outs:
            np.testing.assert_array_equal(out, expected)
    entry = FundusReader(build_preprocess('fov_circle'), cache).cache_path(path)
    assert os.listdir(os.path.dirname(entry)) == [os.path.basename(entry)]  # one entry, no temporaries
    np.testing.assert_array_equal(np.asarray(Image.open(entry)), expected)
