"""Datasets: class folders and npz, their validation errors, the real RetinaMNIST file, DataLoader batches."""
from __future__ import annotations

import os

import numpy as np
import paddle
import pytest
from PIL import Image, ImageFile

from fixtures_data import make_eye_folders, make_grading_csv, make_multilabel_csv, make_odir_table
from helpers import ROOT
from util.datasets import (
    DataOptions,
    ImageFolderDataset,
    NpzDataset,
    RetinaDataset,
    build_dataset,
    list_dataset_formats,
    register_dataset_format,
)
from util.errors import UserError
from util.transforms import build_transform

RETINAMNIST = os.path.join(ROOT, 'data', 'retinamnist.npz')


def write_image(path, size=(12, 10), colour=(10, 20, 30), fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new('RGB', size, colour).save(path, format=fmt)


def make_tree(root, splits=('train', 'val'), classes=('a', 'b', 'c'), per_class=2):
    for split in splits:
        for ci, name in enumerate(classes):
            for i in range(per_class):
                ext = ['png', 'jpg', 'JPEG'][i % 3]
                write_image(os.path.join(root, split, name, f'img{i}.{ext}'), colour=(ci * 80, i * 50, 0),
                            fmt='JPEG' if ext.lower() in ('jpg', 'jpeg') else 'PNG')
    return str(root)


# ----------------------------------------------------------------------------- class folders

def test_folder_dataset_basics(tmp_path):
    root = make_tree(tmp_path, per_class=3)
    # things to ignore: hidden files/folders, non-image files
    write_image(os.path.join(root, 'train', 'a', '.hidden.png'))
    write_image(os.path.join(root, 'train', '.cache', 'x.png'))
    open(os.path.join(root, 'train', 'b', 'notes.txt'), 'w').write('x')
    ds = build_dataset('train', root, build_transform(False, 16), num_classes=3)
    assert isinstance(ds, ImageFolderDataset)
    assert ds.task_type == 'single_label' and ds.num_views == 1 and ds.class_names == ['a', 'b', 'c']
    assert len(ds) == 9 and ds.targets.dtype == np.int64
    np.testing.assert_array_equal(ds.targets, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and x.dtype == np.float32 and y.dtype == np.int64 and int(y) == 1
    assert 'a: 3' in ds.describe() and '9 images' in repr(ds)
    raw, _ = build_dataset('val', root, None)[0]
    assert raw.shape == (3, 10, 12) and raw.max() <= 1.0


def test_folder_classes_sorted_like_imagefolder(tmp_path):
    root = make_tree(tmp_path, splits=('train',), classes=('10', '2', 'B', 'a'), per_class=1)
    assert build_dataset('train', root, None).class_names == ['10', '2', 'B', 'a']


def test_missing_data_path():
    with pytest.raises(UserError, match='nope/here: data path does not exist'):
        build_dataset('train', 'nope/here', None)


def test_missing_split_lists_existing(tmp_path):
    root = make_tree(tmp_path, splits=('train', 'val'))
    with pytest.raises(UserError, match=r"test: split folder missing .*found \['train', 'val'\]"):
        build_dataset('test', root, None)


def test_nb_classes_mismatch_message(tmp_path):
    root = make_tree(tmp_path, classes=('0', '1', '2', '3'), per_class=1)
    with pytest.raises(UserError) as err:
        build_dataset('train', root, None, num_classes=5)
    assert str(err.value) == (f"{os.path.join(root, 'train')}: found 4 class folders ['0', '1', '2', '3'] "
                              f"but --nb_classes 5; pass --nb_classes 4 or add the missing folder")
    with pytest.raises(UserError, match='pass --nb_classes 4 or remove the extra folder'):
        build_dataset('train', root, None, num_classes=3)


def test_empty_class_folder_is_named(tmp_path):
    root = make_tree(tmp_path)
    os.makedirs(os.path.join(root, 'train', 'd'))
    open(os.path.join(root, 'train', 'd', 'readme.txt'), 'w').write('x')
    with pytest.raises(UserError, match=r"train/d: class folder has no images"):
        build_dataset('train', root, None)


def test_val_classes_must_match_train(tmp_path):
    root = make_tree(tmp_path, splits=('train',), classes=('a', 'b', 'c'))
    make_tree(tmp_path, splits=('val',), classes=('a', 'b', 'x'))
    with pytest.raises(UserError, match=r"only in val: \['x'\], only in train: \['c'\]"):
        build_dataset('val', root, None)


def test_corrupt_and_truncated_images_raise_with_path(tmp_path):
    root = make_tree(tmp_path, per_class=1)
    bad = os.path.join(root, 'train', 'a', 'broken.png')
    open(bad, 'wb').write(b'not an image at all')
    ds = build_dataset('train', root, None)
    i = ds.samples.index(bad)
    with pytest.raises(UserError, match='broken.png: cannot read image'):
        ds[i]
    # truncated JPEG and PNG: PIL must not silently fill the missing part
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    rng = np.random.default_rng(0)
    for ext, fmt in (('jpg', 'JPEG'), ('png', 'PNG')):
        path = os.path.join(root, 'train', 'b', f'trunc.{ext}')
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, format=fmt)
        data = open(path, 'rb').read()
        open(path, 'wb').write(data[: len(data) // 2])
        ds = build_dataset('train', root, None)
        with pytest.raises(UserError, match=f'trunc.{ext}: cannot read image'):
            ds[ds.samples.index(path)]
        os.remove(path)


def test_check_images_lists_every_bad_file(tmp_path):
    root = make_tree(tmp_path, per_class=2)
    assert build_dataset('train', root, None).check_images() == 6
    for name in ('a/bad1.png', 'c/bad2.jpg'):
        open(os.path.join(root, 'train', name), 'wb').write(b'junk')
    with pytest.raises(UserError, match=r'2 of 8 images cannot be read') as err:
        build_dataset('train', root, None).check_images()
    assert 'bad1.png' in str(err.value) and 'bad2.jpg' in str(err.value)


def test_unknown_format_and_split(tmp_path):
    with pytest.raises(UserError, match='no dataset format recognises'):
        p = tmp_path / 'labels.txt'
        p.write_text('x')
        build_dataset('train', str(p), None)
    with pytest.raises(UserError, match="split 'training'"):
        build_dataset('training', str(tmp_path), None)
    with pytest.raises(UserError, match="dataset format 'nzp' is not registered; did you mean 'npz'"):
        build_dataset('train', str(tmp_path), None, fmt='nzp')


def test_registry_is_generic(tmp_path):
    assert set(list_dataset_formats()) == {'folder', 'npz', 'csv_multilabel', 'csv_grading', 'odir'}
    with pytest.raises(ValueError):
        register_dataset_format('npz')(NpzDataset)


# ----------------------------------------------------------------------------- npz

def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_npz_basics_grayscale_and_column_labels(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (6, 28, 28), dtype=np.uint8)
    p = write_npz(tmp_path / 'd.npz', train_images=imgs, train_labels=np.array([[0], [2], [1], [2], [0], [0]]))
    ds = build_dataset('train', p, build_transform(True, 32))
    assert isinstance(ds, NpzDataset) and ds.class_names == ['0', '1', '2']
    np.testing.assert_array_equal(ds.class_counts(), [3, 1, 2])
    x, y = ds[1]
    assert x.shape == (3, 32, 32) and x.dtype == np.float32 and int(y) == 2
    assert build_dataset('train', p, None, num_classes=5).class_names == ['0', '1', '2', '3', '4']


def test_npz_errors(tmp_path):
    imgs = np.zeros((3, 8, 8, 3), np.uint8)
    p = write_npz(tmp_path / 'd.npz', train_images=imgs, train_labels=np.array([0, 1, 4]))
    with pytest.raises(UserError, match=r"arrays \['val_images', 'val_labels'\] missing \(found \['train_images', 'train_labels'\]"):
        build_dataset('val', p, None)
    with pytest.raises(UserError, match=r"1 labels outside \[0, 3\) \(values \[4\]\).*pass --nb_classes 5"):
        build_dataset('train', p, None, num_classes=3)
    p2 = write_npz(tmp_path / 'e.npz', train_images=imgs, train_labels=np.array([0, -1, 1]))
    with pytest.raises(UserError, match='labels outside'):
        build_dataset('train', p2, None)
    p3 = write_npz(tmp_path / 'f.npz', train_images=imgs.astype(np.float32), train_labels=np.array([0, 1, 1]))
    with pytest.raises(UserError, match='uint8'):
        build_dataset('train', p3, None)
    p4 = write_npz(tmp_path / 'g.npz', train_images=imgs, train_labels=np.array([0, 1]))
    with pytest.raises(UserError, match='one per image'):
        build_dataset('train', p4, None)
    bad = tmp_path / 'h.npz'
    bad.write_bytes(b'garbage')
    with pytest.raises(UserError, match='cannot read the .npz'):
        build_dataset('train', str(bad), None)


@pytest.mark.skipif(not os.path.exists(RETINAMNIST), reason='data/retinamnist.npz not present')
def test_real_retinamnist():
    ds = build_dataset('train', RETINAMNIST, build_transform(True, 64), num_classes=5)
    assert len(ds) == 1080 and ds.class_names == ['0', '1', '2', '3', '4']
    np.testing.assert_array_equal(ds.class_counts(), [486, 128, 206, 194, 66])
    assert len(build_dataset('val', RETINAMNIST, None)) == 120
    assert len(build_dataset('test', RETINAMNIST, None)) == 400
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == np.float32 and y.dtype == np.int64


@pytest.mark.parametrize('workers', [0, 2])
def test_dataloader_batches(workers):
    ds = build_dataset('val', RETINAMNIST, build_transform(False, 32), num_classes=5)
    loader = paddle.io.DataLoader(ds, batch_size=16, shuffle=False, num_workers=workers, drop_last=False)
    shapes, labels = [], []
    for xb, yb in loader:
        shapes.append(tuple(xb.shape))
        labels.append(yb.numpy().reshape(-1))
        assert xb.dtype == paddle.float32 and yb.dtype == paddle.int64
    assert shapes[0] == (16, 3, 32, 32) and shapes[-1] == (120 - 16 * 7, 3, 32, 32) and len(shapes) == 8
    np.testing.assert_array_equal(np.concatenate(labels), ds.targets)


# ----------------------------------------------------------------------------- options, detection, new layouts

def test_data_options_validation(tmp_path):
    root = make_tree(tmp_path)
    for opts, pattern in ((DataOptions(val_ratio=1.2), r'--val_ratio 1.2: outside \[0, 1\)'),
                          (DataOptions(val_ratio=0.5, test_ratio=0.5), 'leave no training rows'),
                          (DataOptions(eye_mode='both'), "--eye_mode 'both' is not registered"),
                          (DataOptions(task_type='multilabel'), "did you mean 'multi_label'"),
                          (DataOptions(image_root=str(tmp_path / 'nope')), '--image_root .*nope: not a directory')):
        with pytest.raises(UserError, match=pattern):
            build_dataset('train', root, None, options=opts)
    assert DataOptions(label_cols='a, b,').validate().label_cols == ['a', 'b']


def test_each_layout_is_detected_as_exactly_one_format(tmp_path):
    from util.datasets.base import _FORMATS
    imgs = np.zeros((2, 8, 8, 3), np.uint8)
    paths = {
        'folder': make_tree(tmp_path / 'f'),
        'npz': write_npz(tmp_path / 'd.npz', train_images=imgs, train_labels=np.array([0, 1])),
        'csv_multilabel': make_multilabel_csv(tmp_path / 'm', n=8),
        'csv_grading': make_grading_csv(tmp_path / 'g', n=8),
        'odir': make_odir_table(tmp_path / 'o', n_patients=8),
    }
    paths['csv_multilabel (dir)'] = make_multilabel_csv(tmp_path / 'md', n=10, layout='dir')
    make_tree(tmp_path / 'md', splits=('train',))   # class folders next to train.csv: still the table layout
    for expected, path in paths.items():
        claims = [name for name, cls in _FORMATS.items() if cls.detect(path, DataOptions())]
        assert claims == [expected.split(' ')[0]], (expected, claims)


def test_training_validation_layout_test_is_validation(tmp_path):
    root = make_eye_folders(tmp_path, counts={'training': 3, 'validation': 2})
    train, val, test = (build_dataset(s, root, None, num_classes=5) for s in ('train', 'val', 'test'))
    assert train.class_names == ['cataract', 'conjunctivitis', 'eyelid', 'normal', 'uveitis']
    assert (len(train), len(val), len(test)) == (15, 10, 10) and not train.notes and not val.notes
    assert [test.sample_id(i) for i in range(len(test))] == [val.sample_id(i) for i in range(len(val))]
    assert test.test_is_val and not val.test_is_val
    assert test.notes == [f"{root}: no test/ folder (training/ + validation/ layout): the test split is "
                          f"validation/, so test scores are not independent of model selection"]
    os.makedirs(os.path.join(root, 'test'))
    make_tree(root, splits=('test',), classes=('cataract', 'conjunctivitis', 'eyelid', 'normal', 'uveitis'),
              per_class=1)
    test = build_dataset('test', root, None)
    assert len(test) == 5 and not test.notes
    plain = make_tree(tmp_path / 'plain', splits=('train', 'val'))
    with pytest.raises(UserError, match=r'split folder missing'):   # train/ + val/ promises a test/ folder
        build_dataset('test', plain, None)


def test_folder_as_regression(tmp_path):
    root = make_tree(tmp_path, splits=('train', 'val'), classes=('0', '1', '3', '10'), per_class=1)
    reg = build_dataset('train', root, None, options=DataOptions(task_type='regression'))
    assert reg.task_type == 'regression' and reg.targets.dtype == np.float32
    assert reg.class_names == [str(g) for g in range(11)]
    np.testing.assert_array_equal(reg.targets, [0, 1, 10, 3])          # sorted folder order, grade values
    x, y = reg[2]
    assert y.dtype == np.float32 and float(y) == 10.0
    np.testing.assert_array_equal(reg.class_counts()[[0, 1, 3, 10]], [1, 1, 1, 1])
    with pytest.raises(UserError, match=r'grade folder 10 is not below --nb_classes 5 .*pass --nb_classes 11'):
        build_dataset('train', root, None, num_classes=5, options=DataOptions(task_type='regression'))
    named = make_tree(tmp_path / 'n', classes=('mild', '2'))
    with pytest.raises(UserError, match=r"class folders \['mild'\] are not integer grades"):
        build_dataset('train', named, None, options=DataOptions(task_type='regression'))
    with pytest.raises(UserError, match='--task_type multi_label does not apply to the folder format'):
        build_dataset('train', named, None, options=DataOptions(task_type='multi_label'))


def test_npz_regression_and_reader_hook(tmp_path):
    imgs = np.full((3, 6, 6, 3), 100, np.uint8)
    p = write_npz(tmp_path / 'd.npz', train_images=imgs, train_labels=np.array([0, 2, 1]))
    ds = build_dataset('train', p, None, options=DataOptions(task_type='regression'))
    assert ds.task_type == 'regression' and ds.targets.dtype == np.float32 and ds.class_names == ['0', '1', '2']
    _, y = ds[1]
    assert y.dtype == np.float32 and float(y) == 2.0

    class Reader:
        def process(self, img):
            return img.resize((4, 4))

    ds.reader = Reader()
    x, _ = ds[0]
    assert x.shape == (3, 4, 4)


def test_folder_reader_hook(tmp_path):
    root = make_tree(tmp_path, per_class=1)
    ds = build_dataset('train', root, None)
    ds.reader = lambda path: Image.new('RGB', (3, 5), (0, 255, 0))
    x, _ = ds[0]
    assert x.shape == (3, 5, 3) and x[1].min() == 1.0


def test_dual_views_without_transform_need_equal_sizes():
    class Pair(RetinaDataset):
        task_type, num_views = 'multi_label', 2

        def __init__(self, sizes):
            super().__init__('train', 'mem', None)
            self.sizes = sizes
            self.class_names = ['a', 'b']
            self.targets = np.array([[1, 0]], np.float32)

        def load_image(self, index):
            return [Image.new('RGB', s, (255, 0, 0)) for s in self.sizes]

        def sample_id(self, index):
            return 'l.png|r.png'

    x, y = Pair([(6, 4), (6, 4)])[0]
    assert x.shape == (2, 3, 4, 6) and x.dtype == np.float32 and y.dtype == np.float32 and y.shape == (2,)
    with pytest.raises(UserError, match=r"l.png\|r.png: the eye images differ in size \[\(6, 4\), \(5, 4\)\]"):
        Pair([(6, 4), (5, 4)])[0]
