"""Hostile image data: 16-bit and float images, symlink loops in folder trees, bad files found up front."""
from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

from fixtures_data import make_eye_folders, make_paired_csv
from helpers import make_class_folders
from util.datasets import DataOptions, build_dataset
from util.errors import UserError
from util.image_check import (
    check_dataset_images,
    check_image,
    check_images,
    image_files,
)
from util.image_io import load_image, scan_images, to_rgb
from util.transforms.fundus import FundusReader, Preprocess
from util.transforms.ops import ToRGB

DARK, BRIGHT = 12850, 51400  # 16-bit levels of exactly 50 and 200 in 8 bits (v / 257)


def gradient16(h=8, w=64):
    """A 16-bit grey ramp over the full range: the left half dark, the right half bright."""
    return np.tile(np.linspace(0, 65535, w).round().astype(np.uint16), (h, 1))


def expected8(values):
    return np.rint(np.asarray(values, dtype=np.float64) / 257).astype(np.uint8)


def halves16(h=8, w=16):
    a = np.full((h, w), DARK, dtype=np.uint16)
    a[:, w // 2:] = BRIGHT
    return a


def assert_grey_rgb(img, expected):
    assert img.mode == 'RGB'
    x = np.asarray(img)
    for c in range(3):
        np.testing.assert_array_equal(x[..., c], expected)


# ----------------------------------------------------------------------------- 16-bit and float images

def test_16bit_png_keeps_its_contrast_through_load_image(tmp_path):
    ramp = gradient16()
    Image.fromarray(ramp).save(tmp_path / 'ramp.png')
    with Image.open(tmp_path / 'ramp.png') as img:
        assert img.mode == 'I;16'
    assert_grey_rgb(load_image(str(tmp_path / 'ramp.png')), expected8(ramp))
    Image.fromarray(halves16()).save(tmp_path / 'halves.png')
    x = np.asarray(load_image(str(tmp_path / 'halves.png')))
    assert (x[:, :8] == 50).all() and (x[:, 8:] == 200).all()


def test_16bit_tiff_and_32bit_integer_and_float_images(tmp_path):
    ramp = gradient16()
    Image.fromarray(ramp).save(tmp_path / 'ramp16.tif')
    assert_grey_rgb(load_image(str(tmp_path / 'ramp16.tif')), expected8(ramp))
    # mode I holding 16-bit data (an older Pillow's 16-bit PNG, an int32 TIFF): the 16-bit scale
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / 'ramp_i.tif')
    with Image.open(tmp_path / 'ramp_i.tif') as img:
        assert img.mode == 'I'
    assert_grey_rgb(load_image(str(tmp_path / 'ramp_i.tif')), expected8(ramp))
    # mode F in [0, 1]: times 255
    unit = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (4, 1))
    Image.fromarray(unit).save(tmp_path / 'unit_f.tif')
    with Image.open(tmp_path / 'unit_f.tif') as img:
        assert img.mode == 'F'
    assert_grey_rgb(load_image(str(tmp_path / 'unit_f.tif')), np.rint(unit * 255).astype(np.uint8))
    # other ranges (negative integers, float dB values): the image's min..max
    signed = np.tile(np.arange(-100000, 155000, 1000, dtype=np.int32), (2, 1))
    out = np.asarray(to_rgb(Image.fromarray(signed)))[..., 0]
    assert out[0, 0] == 0 and out[0, -1] == 255 and np.all(np.diff(out[0].astype(int)) >= 0)
    db = np.array([[-30.0, np.nan, 10.0, 50.0]], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(db)))[0, :, 0], [0, 0, 128, 255])


def test_16bit_variants_and_other_modes_convert():
    ramp = gradient16()
    big_endian = Image.fromarray(ramp.astype('>u2'))
    assert big_endian.mode == 'I;16B'
    assert_grey_rgb(to_rgb(big_endian), expected8(ramp))
    assert_grey_rgb(ToRGB()(Image.fromarray(ramp)), expected8(ramp))
    rgb = Image.new('RGB', (3, 2), (1, 2, 3))
    assert to_rgb(rgb) is rgb
    assert np.asarray(to_rgb(Image.new('RGBA', (3, 2), (9, 8, 7, 0)))).tolist()[0][0] == [9, 8, 7]
    assert np.asarray(to_rgb(Image.new('L', (3, 2), 77)))[0, 0].tolist() == [77, 77, 77]
    assert (np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 5.0, np.float32)))) == 0).all()  # constant


def test_16bit_images_through_the_dataset_and_the_fundus_reader(tmp_path):
    root = tmp_path / 'data'
    for split in ('train', 'val', 'test'):
        for cls in ('a', 'b'):
            os.makedirs(root / split / cls)
            Image.fromarray(halves16()).save(root / split / cls / f'{cls}.png')
    ds = build_dataset('train', str(root), None)
    x, _ = ds[0]
    assert x.shape == (3, 8, 16)
    np.testing.assert_allclose(x[:, :, :8], 50 / 255, atol=1e-6)
    np.testing.assert_allclose(x[:, :, 8:], 200 / 255, atol=1e-6)
    ds.reader = FundusReader(Preprocess('none', size=16), cache_dir=str(tmp_path / 'cache'))
    for _ in range(2):  # a miss, then a cache hit
        x, _ = ds[0]
        assert abs(x[0, 0, 0] - 50 / 255) < 1e-6 and abs(x[0, 0, -1] - 200 / 255) < 1e-6
    assert ds.reader.hits == 1


def test_fov_crop_of_a_16bit_fundus_sees_the_dark_frame():
    frame = np.full((40, 60), 1000, dtype=np.uint16)  # ~4 in 8 bits: below the threshold 10
    frame[5:35, 15:45] = 30000
    out = Preprocess('fov')(Image.fromarray(frame))
    assert out.mode == 'RGB' and out.size == (30, 30)
    assert np.asarray(out)[0, 0, 0] == round(30000 / 257)


# ----------------------------------------------------------------------------- symlink loops

def linked_tree(tmp_path):
    """3 classes x 4 train images, a link loop in a/, a link to an ancestor in b/, a real linked folder in c/."""
    root = make_class_folders(tmp_path / 'data', counts={'train': 4, 'val': 2, 'test': 2})
    train = os.path.join(root, 'train')
    os.symlink('.', os.path.join(train, 'a', 'loop'))
    os.symlink('..', os.path.join(train, 'b', 'up'))
    os.symlink(os.path.join(train, 'a'), os.path.join(train, 'b', 'again'))  # another class: still followed
    extra = tmp_path / 'external'
    os.makedirs(extra / 'sub')
    for i in range(3):
        Image.new('RGB', (8, 8), (0, 0, 200)).save(extra / ('sub' if i else '.') / f'x{i}.png')
    os.symlink(str(extra), os.path.join(train, 'c', 'linked'))
    os.symlink(str(extra), os.path.join(train, 'c', 'linked_twice'))
    return root


def test_symlink_loops_do_not_multiply_the_folder_dataset(tmp_path):
    root = linked_tree(tmp_path)
    ds = build_dataset('train', root, None)
    counts = dict(zip(ds.class_names, ds.class_counts().tolist(), strict=True))
    assert counts == {'a': 4, 'b': 4 + 4, 'c': 4 + 3}
    assert len(set(map(os.path.realpath, ds.samples))) == len(ds) - 4  # only b/again repeats a's files
    assert not any('/loop/' in s or '/up/' in s or '/linked_twice/' in s for s in ds.samples)
    assert len(scan_images(os.path.join(root, 'train', 'a'))) == 4


def test_symlink_loops_do_not_multiply_predict_inputs(tmp_path):
    from util.predict_inputs import find_images

    root = linked_tree(tmp_path)
    found = find_images(os.path.join(root, 'train'))
    assert len(found) == 3 * 4 + 3  # each real folder once: the classes, the linked external folder
    assert len(set(map(os.path.realpath, found))) == len(found)
    assert any('/c/linked/' in f for f in found)


# ----------------------------------------------------------------------------- checking images up front

def noise(size=64, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def truncate(path, keep=0.5):
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[: int(len(data) * keep)])


def folder_splits(root):
    return {s: build_dataset(s, str(root), None) for s in ('train', 'val', 'test')}


def test_check_dataset_images_reports_every_bad_file_in_one_error(tmp_path):
    root = make_class_folders(tmp_path / 'data', counts={'train': 3, 'val': 2, 'test': 2})
    said = []
    assert check_dataset_images(folder_splits(root), said.append) == 3 * 7
    assert len(said) == 1 and '21 image files of train, val, test readable' in said[0]

    bad_png = os.path.join(root, 'test', 'a', 'a_0.png')
    noise().save(bad_png)
    truncate(bad_png)
    bad_jpg = os.path.join(root, 'val', 'b', 'b_scan.jpg')
    noise(seed=1).save(bad_jpg, quality=95)
    truncate(bad_jpg, 0.7)
    not_image = os.path.join(root, 'train', 'c', 'notes.png')
    open(not_image, 'w').write('exported with the wrong extension\n')
    said.clear()
    with pytest.raises(UserError) as err:
        check_dataset_images(folder_splits(root), said.append)
    msg = str(err.value)
    assert msg.startswith(f'{root}: 3 of 23 image files cannot be used')
    assert f'test: {bad_png} (truncated or corrupt PNG file: ' in msg
    assert f'val: {bad_jpg} (truncated or corrupt JPEG: no end-of-image marker' in msg
    assert f'train: {not_image} (not an image file: PIL cannot identify its format)' in msg
    assert msg.endswith('; replace or remove these files, or pass --skip_image_check') and '\n' not in msg
    assert not said


def test_check_dataset_images_lists_twenty_and_counts_the_rest(tmp_path):
    root = make_class_folders(tmp_path / 'data', counts={'train': 2, 'val': 1, 'test': 1})
    for i in range(25):
        open(os.path.join(root, 'train', 'a', f'junk{i:02d}.png'), 'wb').write(b'')
    with pytest.raises(UserError, match=r'25 of 37 image files') as err:
        check_dataset_images(folder_splits(root), None)
    msg = str(err.value)
    assert msg.count('(empty file)') == 20 and '; ... and 5 more; replace or remove' in msg


def test_image_files_of_each_kind_of_dataset(tmp_path):
    # a test split that is the val split: its files are checked once and listed under both
    eyes = make_eye_folders(tmp_path / 'eyes', counts={'training': 2, 'validation': 1})
    sets = {s: build_dataset(s, eyes, None) for s in ('train', 'val', 'test')}
    assert sets['test'].test_is_val and image_files(sets['test']) == image_files(sets['val'])
    victim = image_files(sets['val'])[0]
    open(victim, 'wb').write(b'\x89PNG\r\n\x1a\n broken')
    with pytest.raises(UserError, match=f'val/test: {victim} '):
        check_dataset_images(sets, None)
    # dual-eye pairs: two files per sample
    pairs = make_paired_csv(tmp_path / 'pairs', n_patients=12)
    ds = build_dataset('train', pairs, None)
    assert ds.num_views == 2 and len(image_files(ds)) == 2 * len(ds)
    assert all(os.path.isfile(f) for f in image_files(ds))
    per_eye = build_dataset('train', pairs, None, options=DataOptions(eye_mode='per_eye'))
    assert len(image_files(per_eye)) == len(set(image_files(per_eye)))
    # npz arrays: no files, nothing checked or said
    arrays = tmp_path / 'm.npz'
    np.savez(arrays, train_images=np.zeros((4, 8, 8, 3), np.uint8), train_labels=np.array([0, 1, 0, 1]))
    said = []
    assert image_files(build_dataset('train', str(arrays), None)) == []
    assert check_dataset_images({'train': build_dataset('train', str(arrays), None)}, said.append) == 0
    assert not said


def test_check_image_per_format(tmp_path):
    img = noise(48)
    for fmt, ext in (('PNG', 'png'), ('JPEG', 'jpg'), ('BMP', 'bmp'), ('TIFF', 'tif')):
        path = str(tmp_path / f'ok.{ext}')
        img.save(path, format=fmt)
        assert check_image(path) is None, fmt
        truncate(path)
        assert check_image(path) is not None and 'truncated' in check_image(path), fmt
    jpg = str(tmp_path / 'p.jpg')
    img.save(jpg, progressive=True)
    whole = open(jpg, 'rb').read()
    for tail, ok in ((b'\0' * 64, True), (b'camera trailer' * 20, True), (None, False)):
        open(jpg, 'wb').write(whole + tail if tail is not None else whole[:-40])
        assert (check_image(jpg) is None) == ok
    png16 = str(tmp_path / 'g16.png')
    Image.fromarray(gradient16()).save(png16)
    assert check_image(png16) is None
    open(tmp_path / 'empty.png', 'wb').close()
    assert check_image(str(tmp_path / 'empty.png')) == 'empty file'
    assert check_image(str(tmp_path / 'missing.png')) == 'file not found'
    # a JPEG named .png is judged by its content (the loader reads it fine)
    img.save(tmp_path / 'really_jpeg.png', format='JPEG')
    assert check_image(str(tmp_path / 'really_jpeg.png')) is None


def test_check_images_of_many_files_finds_the_one_bad_and_is_quiet_without_a_terminal(tmp_path, capsys):
    paths = []
    small = noise(16)
    for i in range(1000):
        path = str(tmp_path / f'{i:04d}.{"jpg" if i % 2 else "png"}')
        small.save(path)
        paths.append(path)
    truncate(paths[500])
    bad = check_images(paths + paths[:10])  # a repeated path is checked once
    assert [p for p, _ in bad] == [paths[500]]
    assert capsys.readouterr().err == ''


def test_check_images_shows_progress_on_a_terminal(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    paths = []
    for i in range(5):
        noise(8).save(tmp_path / f'{i}.png')
        paths.append(str(tmp_path / f'{i}.png'))
    term = Terminal()
    monkeypatch.setattr(sys, 'stderr', term)
    assert check_images(paths, workers=2) == []
    assert 'checking images' in term.getvalue()
    term.truncate(0)
    assert check_images(paths, progress=False) == [] and term.getvalue() == ''
