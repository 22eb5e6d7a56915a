"""Table datasets: multi-label and grading CSV/xlsx, detection, splits, and every validation error (with rows)."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from fixtures_data import SEED_MULTILABEL_COLUMNS, make_grading_csv, make_multilabel_csv
from util.datasets import DataOptions, build_dataset
from util.datasets.csv_formats import GradingCsvDataset, MultiLabelCsvDataset, table_kind
from util.datasets.splits import stratified_assign
from util.errors import UserError
from util.transforms import build_transform


def ids(ds):
    return [ds.sample_id(i) for i in range(len(ds))]


def splits(path, **kw):
    opts = kw.pop('options', None)
    return {s: build_dataset(s, path, None, options=opts, **kw) for s in ('train', 'val', 'test')}


def write_csv(path, df):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    df.to_csv(path, index=False)
    return str(path)


# ----------------------------------------------------------------------------- multi-label

def test_seed_header_works_without_options(tmp_path):
    path = make_multilabel_csv(tmp_path, n=40)
    assert list(pd.read_csv(path).columns) == ['Image_File', *SEED_MULTILABEL_COLUMNS]
    ds = splits(path)
    train = ds['train']
    assert isinstance(train, MultiLabelCsvDataset) and train.format_name == 'csv_multilabel'
    assert train.task_type == 'multi_label' and train.num_views == 1
    assert train.class_names == list(SEED_MULTILABEL_COLUMNS)
    assert train.targets.dtype == np.float32 and train.targets.shape == (len(train), 4)
    # 40 rows: 15% -> 6 val, 6 test, 28 train; disjoint, covering every row
    assert [len(ds[s]) for s in ('train', 'val', 'test')] == [28, 6, 6]
    all_ids = ids(ds['train']) + ids(ds['val']) + ids(ds['test'])
    assert len(set(all_ids)) == 40 and all(i.startswith('images/img_') for i in all_ids)
    table = pd.read_csv(path).set_index('Image_File')
    for d in ds.values():
        np.testing.assert_array_equal(d.targets, table.loc[ids(d), list(SEED_MULTILABEL_COLUMNS)].to_numpy())
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert y.shape == (4,) and y.dtype == np.float32
    train.transform = build_transform(False, 16)
    x, _ = train[0]
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    assert 'carved from labels_image_centric_4_class_clean.csv' in ds['train'].notes[0]
    assert 'positives (cataract:' in train.describe()
    np.testing.assert_array_equal(train.class_counts(), train.targets.sum(0).astype(int))


def test_carved_split_is_deterministic_and_seeded(tmp_path):
    path = make_multilabel_csv(tmp_path, n=60)
    a, b = splits(path), splits(path)
    for s in ('train', 'val', 'test'):
        assert ids(a[s]) == ids(b[s])
    other = splits(path, options=DataOptions(split_seed=3))
    assert set(ids(other['val'])) != set(ids(a['val']))
    # each split built on its own (as every process does) gives the same rows
    assert ids(build_dataset('test', path, None)) == ids(a['test'])


def test_split_ratios_and_test_ratio_zero(tmp_path):
    path = make_multilabel_csv(tmp_path, n=100)
    ds = splits(path, options=DataOptions(val_ratio=0.2, test_ratio=0.1))
    assert [len(ds[s]) for s in ('train', 'val', 'test')] == [70, 20, 10]
    ds = splits(path, options=DataOptions(val_ratio=0.2, test_ratio=0.0))
    assert [len(ds[s]) for s in ('train', 'val')] == [80, 20]
    assert ids(ds['test']) == ids(ds['val']) and ds['test'].test_is_val
    assert any('the test split is the val split' in n and '--test_ratio 0' in n for n in ds['test'].notes)


def test_multilabel_split_is_stratified(tmp_path):
    # label 'rare' has 10 positives of 200: a plain random 15% split misses it in val about 20% of the time
    rng = np.random.default_rng(1)
    n = 200
    y = np.stack([rng.random(n) < 0.5, rng.random(n) < 0.3, np.arange(n) % 20 == 0], 1).astype(int)
    df = pd.DataFrame({'image': [f'i{k}.png' for k in range(n)], 'common': y[:, 0], 'mid': y[:, 1], 'rare': y[:, 2]})
    from PIL import Image
    for k in range(n):
        Image.new('RGB', (4, 4)).save(tmp_path / f'i{k}.png')
    path = write_csv(tmp_path / 't.csv', df)
    for seed in range(5):
        ds = splits(path, options=DataOptions(split_seed=seed))
        for s in ('val', 'test'):
            frac = ds[s].targets.mean(0)
            assert ds[s].class_counts()[2] in (1, 2), (seed, s, ds[s].class_counts())
            np.testing.assert_allclose(frac[:2], y.mean(0)[:2], atol=0.08)


def test_split_column_with_aliases(tmp_path):
    path = make_multilabel_csv(tmp_path, n=20, layout='split_col')
    df = pd.read_csv(path)
    df['split'] = df['split'].map({'train': 'Training', 'val': 'validation', 'test': 'TEST'})
    df.to_csv(path, index=False)
    ds = splits(path)
    assert [len(ds[s]) for s in ('train', 'val', 'test')] == [12, 4, 4]
    assert set(ids(ds['val'])) == set(df.loc[df['split'] == 'validation', 'Image_File'])
    assert not ds['train'].notes
    df.loc[[2, 5], 'split'] = ['tran', '']
    df.to_csv(path, index=False)
    with pytest.raises(UserError, match=r"split column 'split' has values other than train/val/test at rows "
                                        r"4 \('tran'\), 7 \(blank\)"):
        build_dataset('train', path, None)


def test_split_column_without_val_or_test(tmp_path):
    path = make_multilabel_csv(tmp_path, n=30, layout='split_col')
    df = pd.read_csv(path)
    df['split'] = ['train'] * 24 + ['test'] * 6
    df.to_csv(path, index=False)
    ds = splits(path, options=DataOptions(val_ratio=0.25))
    assert len(ds['val']) == 6 and len(ds['train']) == 18 and len(ds['test']) == 6
    assert "val carved from the 'train' rows" in ds['val'].notes[0]
    with pytest.raises(UserError, match=r"the val split is empty \(no 'val' rows in column 'split' and "
                                        r"--val_ratio 0\)"):
        build_dataset('val', path, None, options=DataOptions(val_ratio=0.0, test_ratio=0.0))
    df['split'] = ['train'] * 24 + ['val'] * 6
    df.to_csv(path, index=False)
    test = build_dataset('test', path, None)
    assert test.test_is_val and "no 'test' rows in column 'split'" in test.notes[0]


def test_directory_of_tables(tmp_path):
    root = make_multilabel_csv(tmp_path / 'd', n=25, layout='dir')
    ds = splits(root)
    assert isinstance(ds['train'], MultiLabelCsvDataset)  # not taken for a folder of classes
    assert [len(ds[s]) for s in ('train', 'val', 'test')] == [15, 5, 5]
    os.remove(os.path.join(root, 'test.csv'))
    test = build_dataset('test', root, None)
    assert ids(test) == ids(build_dataset('val', root, None)) and 'no test table' in test.notes[0]
    os.remove(os.path.join(root, 'val.csv'))
    val = build_dataset('val', root, None, options=DataOptions(val_ratio=0.2))
    assert len(val) == 3 and 'val carved from train.csv' in val.notes[0]


def test_error_rows_name_the_file_in_a_directory(tmp_path):
    root = make_multilabel_csv(tmp_path / 'd', n=25, layout='dir')
    df = pd.read_csv(os.path.join(root, 'val.csv'))
    df.loc[1, 'glaucoma'] = 3
    df.to_csv(os.path.join(root, 'val.csv'), index=False)
    with pytest.raises(UserError, match=r"column 'glaucoma' at val.csv row 3 \('3'\)"):
        build_dataset('train', root, None)
    df = df.drop(columns=['cataract'])
    df.to_csv(os.path.join(root, 'val.csv'), index=False)
    with pytest.raises(UserError, match=r"val.csv: columns differ from .*train.csv \(missing: \['cataract'\]"):
        build_dataset('train', root, None)


def test_column_options_and_missing_column(tmp_path):
    path = make_multilabel_csv(tmp_path, n=20, image_col='fname', labels=('a', 'b', 'c'))
    df = pd.read_csv(path)
    df.insert(1, 'ID', range(100, 120))      # an id column is not a label
    df['Patient Age'] = 50
    df.to_csv(path, index=False)
    assert build_dataset('train', path, None).class_names == ['a', 'b', 'c']
    ds = build_dataset('train', path, None, options=DataOptions(label_cols=['c', 'a'], image_col='fname'))
    assert ds.class_names == ['c', 'a']
    np.testing.assert_array_equal(ds.targets, df.set_index('fname').loc[ids(ds), ['c', 'a']].to_numpy())
    with pytest.raises(UserError) as err:
        build_dataset('train', path, None, options=DataOptions(label_cols=['a', 'bb']))
    msg = str(err.value)
    assert msg.startswith(f"{path}: column 'bb' not found (columns found: fname, ID, a, b, c, Patient Age; "
                          f"did you mean 'b'?); pass --label_cols")
    with pytest.raises(UserError, match=r"column 'Fname' not found .*did you mean 'fname'"):
        build_dataset('train', path, None, options=DataOptions(image_col='Fname'))
    with pytest.raises(UserError, match=r"3 label columns \['a', 'b', 'c'\] but --nb_classes 4; pass --nb_classes 3"):
        build_dataset('train', path, None, num_classes=4)


def test_image_column_guess(tmp_path):
    path = make_multilabel_csv(tmp_path, n=12, image_col='photo', labels=('a', 'b'))
    assert build_dataset('train', path, None).listed[0][0].startswith('images/')  # the only text column
    df = pd.read_csv(path)
    df['comment'] = 'x'
    df.to_csv(path, index=False)
    with pytest.raises(UserError, match=r"cannot tell which column holds the image paths \(text columns photo, "
                                        r"comment;.*pass --image_col"):
        build_dataset('train', path, None)
    assert len(build_dataset('train', path, None, options=DataOptions(image_col='photo'))) > 0


def test_labels_outside_01_with_rows(tmp_path):
    path = make_multilabel_csv(tmp_path, n=12)
    df = pd.read_csv(path, dtype=str)
    df.loc[3, 'glaucoma'] = '2'                 # spreadsheet row 5
    df.loc[6, 'glaucoma'] = ''                  # row 8
    df.loc[0, 'normal_fundus'] = 'yes'          # row 2
    df.to_csv(path, index=False)
    with pytest.raises(UserError) as err:
        build_dataset('train', path, None)
    msg = str(err.value)
    assert msg.startswith(f"{path}: label cells outside {{0, 1}}: column 'glaucoma' at rows 5 ('2'), 8 (blank); "
                          f"column 'normal_fundus' at row 2 ('yes') (each label cell 0 or 1")


def test_missing_images_listed_with_rows(tmp_path):
    path = make_multilabel_csv(tmp_path, n=12, layout='split_col')
    os.remove(tmp_path / 'images' / 'img_000.png')   # row 2, train
    os.remove(tmp_path / 'images' / 'img_005.png')   # row 7, train
    with pytest.raises(UserError) as err:
        build_dataset('train', path, None)
    msg = str(err.value)
    assert "2 of 8 images of the train split not found under" in msg
    assert "(rows 2 ('images/img_000.png'), 7 ('images/img_005.png'))" in msg and "column 'Image_File'" in msg
    assert len(build_dataset('val', path, None)) == 2   # other splits are not blocked by train's files


def test_duplicate_and_blank_image_paths(tmp_path):
    path = make_multilabel_csv(tmp_path, n=10)
    df = pd.read_csv(path)
    df.loc[7, 'Image_File'] = df.loc[2, 'Image_File']
    df.to_csv(path, index=False)
    with pytest.raises(UserError, match=r"1 image paths listed more than once: 'images/img_002.png' at row 4, "
                                        r"row 9 \(each image once\)"):
        build_dataset('train', path, None)
    df.loc[7, 'Image_File'] = ''
    df.to_csv(path, index=False)
    with pytest.raises(UserError, match=r"1 blank image path cells in column 'Image_File' at row 9"):
        build_dataset('train', path, None)


def test_label_without_train_positive_is_an_error(tmp_path):
    path = make_multilabel_csv(tmp_path, n=20, layout='split_col', labels=('a', 'b'))
    df = pd.read_csv(path)
    df['b'] = 0
    df.loc[3, 'b'] = 1                      # the only positive, in the val split (row 3 % 5 == 3)
    assert df.loc[3, 'split'] == 'val'
    df.to_csv(path, index=False)
    with pytest.raises(UserError, match=r"labels \['b'\] have no positive in the train split \(positives in the "
                                        r"whole table: 'b': 1\)"):
        build_dataset('train', path, None)
    assert len(build_dataset('val', path, None)) == 4


def test_image_root_and_subfolder_search(tmp_path):
    path = make_multilabel_csv(tmp_path, n=10, image_dir='')
    df = pd.read_csv(path)
    os.makedirs(tmp_path / 'pics')
    for f in df['Image_File']:
        os.rename(tmp_path / f, tmp_path / 'pics' / f)
    ds = build_dataset('train', path, None)          # found in the table folder's subfolder
    assert ds.image_root == str(tmp_path / 'pics') and os.path.isfile(ds.samples[0])
    elsewhere = tmp_path / 'elsewhere'
    os.makedirs(elsewhere)
    with pytest.raises(UserError, match=r"none of the first 10 listed images found \(e.g. 'img_000.png'\); looked "
                                        r"under .*elsewhere \(image paths relative to --image_root"):
        build_dataset('train', path, None, options=DataOptions(image_root=str(elsewhere)))
    os.makedirs(tmp_path / 'moved')
    os.rename(tmp_path / 'pics', tmp_path / 'moved' / 'pics')
    os.rename(tmp_path / 'moved', elsewhere / 'moved')
    ds = build_dataset('train', path, None, options=DataOptions(image_root=str(elsewhere / 'moved' / 'pics')))
    assert os.path.isfile(ds.samples[0])


def test_xlsx_table_and_row_numbers(tmp_path):
    csv = make_multilabel_csv(tmp_path, n=14)
    df = pd.read_csv(csv)
    xlsx = str(tmp_path / 'labels.xlsx')
    df.to_excel(xlsx, index=False)
    a, b = build_dataset('val', csv, None), build_dataset('val', xlsx, None)
    assert isinstance(b, MultiLabelCsvDataset) and ids(a) == ids(b)
    np.testing.assert_array_equal(a.targets, b.targets)
    df.loc[4, 'cataract'] = 5
    df.to_excel(xlsx, index=False)
    with pytest.raises(UserError, match=r"labels.xlsx: label cells outside \{0, 1\}: column 'cataract' at row 6 "
                                        r"\('5'\)"):
        build_dataset('train', xlsx, None)


def test_reader_hook_is_used(tmp_path):
    path = make_multilabel_csv(tmp_path, n=10)
    ds = build_dataset('train', path, None)
    seen = []

    def reader(p):
        seen.append(p)
        from PIL import Image
        return Image.new('RGB', (5, 7), (255, 0, 0))

    ds.reader = reader
    x, _ = ds[1]
    assert seen == [ds.samples[1]] and x.shape == (3, 7, 5) and x[0].min() == 1.0


# ----------------------------------------------------------------------------- grading

def test_grading_regression_and_single_label(tmp_path):
    path = make_grading_csv(tmp_path, n=40, with_extension=False)    # names without .png, column 'level'
    ds = splits(path)
    train = ds['train']
    assert isinstance(train, GradingCsvDataset) and train.task_type == 'regression' and train.grade_col == 'level'
    assert train.class_names == ['0', '1', '2', '3', '4'] and train.targets.dtype == np.float32
    # stratified by grade: 8 of each grade, 15% -> about one of each grade in val
    assert (ds['val'].class_counts() >= 1).sum() >= 4
    x, y = train[0]
    assert x.shape == (3, 32, 32) and y.dtype == np.float32 and y.shape == ()
    assert train.samples[0].endswith('.png') and not train.sample_id(0).endswith('.png')
    assert sum(len(d) for d in ds.values()) == 40 and len(set(ids(ds['train'])) & set(ids(ds['test']))) == 0
    single = build_dataset('train', path, None, num_classes=7, options=DataOptions(task_type='single_label'))
    assert single.task_type == 'single_label' and single.targets.dtype == np.int64 and len(single.class_names) == 7
    x, y = single[0]
    assert y.dtype == np.int64
    np.testing.assert_array_equal(single.targets, train.targets.astype(np.int64))
    with pytest.raises(UserError, match='--task_type multi_label does not apply to the csv_grading format'):
        build_dataset('train', path, None, options=DataOptions(task_type='multi_label', grade_col='level'))


def test_grading_class_names_from_whole_table(tmp_path):
    path = make_grading_csv(tmp_path, n=10, grades=5, layout='split_col')
    df = pd.read_csv(path)
    df.loc[df['split'] == 'train', 'level'] = [0, 1, 2, 3, 4, 4]
    df.loc[df['split'] != 'train', 'level'] = 0
    df.to_csv(path, index=False)
    names = {s: d.class_names for s, d in splits(path).items()}
    assert names['train'] == names['val'] == names['test'] == ['0', '1', '2', '3', '4']


@pytest.mark.parametrize('value, what', [('1.5', 'not an integer'), ('-1', 'negative'), ('', 'not a number'),
                                         ('two', 'not a number')])
def test_grading_bad_cells(tmp_path, value, what):
    path = make_grading_csv(tmp_path, n=10)
    df = pd.read_csv(path, dtype=str)
    df.loc[6, 'level'] = value
    df.to_csv(path, index=False)
    shown = 'blank' if value == '' else repr(value)
    with pytest.raises(UserError, match=rf"grade column 'level': 1 cells {what} at row 8 \({shown}\)"):
        build_dataset('train', path, None)


def test_grading_above_nb_classes(tmp_path):
    path = make_grading_csv(tmp_path, n=10, grades=5)
    with pytest.raises(UserError, match=r"2 grades not below --nb_classes 4 at rows 6 \('4'\), 11 \('4'\) "
                                        r"\(grades 0..3\); pass --nb_classes 5"):
        build_dataset('train', path, None, num_classes=4)


def test_grading_column_guess_and_option(tmp_path):
    path = make_grading_csv(tmp_path, n=10, grade_col='dr_grade')
    df = pd.read_csv(path)
    df['quality'] = 3
    df.to_csv(path, index=False)
    assert build_dataset('train', path, None).grade_col == 'dr_grade'   # the grade-named column wins
    df = df.rename(columns={'dr_grade': 'score'})
    df.to_csv(path, index=False)
    with pytest.raises(UserError, match=r"cannot tell the label columns \(numeric columns found: score \(0, 1, 2, 3, "
                                        r"4\), quality \(3\);.*pass --label_cols a,b,c or --grade_col"):
        build_dataset('train', path, None)
    assert build_dataset('train', path, None, options=DataOptions(grade_col='score')).grade_col == 'score'


# ----------------------------------------------------------------------------- detection and splitting helpers

def test_table_kind_detection(tmp_path):
    assert table_kind(make_multilabel_csv(tmp_path / 'm', n=6)) == 'csv_multilabel'
    assert table_kind(make_grading_csv(tmp_path / 'g', n=6)) == 'csv_grading'
    one = write_csv(tmp_path / 'one.csv', pd.DataFrame({'path': ['a.png', 'b.png'], 'referable': [0, 1]}))
    assert table_kind(one) == 'csv_grading'                  # a single 0/1 column is a two-grade table
    assert table_kind(one, DataOptions(task_type='multi_label')) == 'csv_multilabel'
    paired = write_csv(tmp_path / 'p.csv', pd.DataFrame({'left_eye': ['a.png'], 'right_eye': ['b.png'], 'x': [1]}))
    assert table_kind(paired) == 'odir'
    typo = write_csv(tmp_path / 't.csv', pd.DataFrame({'image': ['a', 'b', 'c'], 'p': [0, 1, 0], 'q': [0, 2, 1]}))
    with pytest.raises(UserError, match=r"numeric columns found: p \(0, 1\), q \(0, 1, 2\)"):
        table_kind(typo)
    assert table_kind(typo, DataOptions(label_cols=['p', 'q'])) == 'csv_multilabel'
    assert table_kind(typo, DataOptions(grade_col='q')) == 'csv_grading'
    assert table_kind(str(tmp_path / 'm')) is None           # a directory without train.csv
    (tmp_path / 'notes.txt').write_text('x')
    assert table_kind(str(tmp_path / 'notes.txt')) is None


def test_stratified_assign_groups_and_counts():
    labels = np.repeat(np.arange(4), 25)                # 100 rows, 4 classes
    groups = np.repeat(np.arange(50), 2).astype(str)    # 50 patients x 2 rows
    a = stratified_assign(labels, groups, {'val': 0.2, 'test': 0.1}, seed=0)
    assert (a == stratified_assign(labels, groups, {'val': 0.2, 'test': 0.1}, seed=0)).all()
    for g in np.unique(groups):
        assert len(set(a[groups == g])) == 1
    per_group = a[::2]
    assert (per_group == 'val').sum() == 10 and (per_group == 'test').sum() == 5
    b = stratified_assign(labels, None, {'val': 0.2}, seed=0)
    for c in range(4):                                   # exactly proportional per class
        assert (b[labels == c] == 'val').sum() == 5


def test_row_numbers_survive_blank_lines_and_windows_paths(tmp_path):
    from PIL import Image
    os.makedirs(tmp_path / 'im')
    for i in range(8):
        Image.new('RGB', (4, 4)).save(tmp_path / 'im' / f'{i}.png')
    lines = ['image,a,b'] + [f'im\\{i}.png,{i % 2},{(i + 1) % 2}' for i in range(4)] + ['', ',,']
    lines += [f'im\\{i}.png,{i % 2},{3 if i == 6 else (i + 1) % 2}' for i in range(4, 8)]
    (tmp_path / 't.csv').write_text('\n'.join(lines) + '\n')
    # file line 10 is the data row of image 6 (lines 6-7 are a blank line and a row of empty cells)
    with pytest.raises(UserError, match=r"column 'b' at row 10 \('3'\)"):
        build_dataset('train', str(tmp_path / 't.csv'), None, options=DataOptions(label_cols=['a', 'b']))
    (tmp_path / 't.csv').write_text('\n'.join(lines).replace(',0,3', ',0,1') + '\n')
    ds = build_dataset('train', str(tmp_path / 't.csv'), None, options=DataOptions(val_ratio=0.25, test_ratio=0.1))
    assert ds.sample_id(0).startswith('im/') and all(os.path.isfile(f) for f in ds.samples)
    assert set(ds.rows) <= {2, 3, 4, 5, 8, 9, 10, 11}


def test_too_few_rows_for_three_splits(tmp_path):
    path = make_multilabel_csv(tmp_path, n=2, labels=('a', 'b'))
    with pytest.raises(UserError, match=r'the train split is empty \(at least one row\)'):
        build_dataset('train', path, None)
