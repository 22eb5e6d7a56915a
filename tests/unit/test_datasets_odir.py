"""Paired-eye tables: ODIR-5K (.xlsx/.csv), generic paired CSVs, patient-level splits, per-eye mode, errors."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest

from fixtures_data import ODIR_CLASSES, make_odir_table, make_paired_csv, odir_patients
from util.datasets import DataOptions, build_dataset
from util.datasets.loader import BatchLoader
from util.datasets.odir import PairedEyeDataset, keyword_class, keyword_classes
from util.errors import UserError
from util.transforms.dual import build_dual_transform


def ids(ds):
    return [ds.sample_id(i) for i in range(len(ds))]


def splits(path, **opts):
    options = DataOptions(**opts)
    return {s: build_dataset(s, path, None, options=options) for s in ('train', 'val', 'test')}


def test_odir_xlsx_dual(tmp_path):
    path = make_odir_table(tmp_path, n_patients=24, fmt='xlsx')
    table = pd.read_excel(path)
    assert list(table.columns) == ['ID', 'Patient Age', 'Patient Sex', 'Left-Fundus', 'Right-Fundus',
                                   'Left-Diagnostic Keywords', 'Right-Diagnostic Keywords', *ODIR_CLASSES]
    ds = splits(path)
    train = ds['train']
    assert isinstance(train, PairedEyeDataset) and train.format_name == 'odir'
    assert train.task_type == 'multi_label' and train.num_views == 2 and train.class_names == list(ODIR_CLASSES)
    assert train.image_root == os.path.join(str(tmp_path), 'Training Images')   # found in the subfolder
    assert [len(ds[s]) for s in ('train', 'val', 'test')] == [16, 4, 4]
    sid = train.sample_id(0)
    left, right = sid.split('|')
    assert left.endswith('_left.png') and right == left.replace('_left', '_right')
    row = table[table['Left-Fundus'] == left].iloc[0]
    np.testing.assert_array_equal(train.targets[0], row[list(ODIR_CLASSES)].to_numpy(dtype=np.float32))
    x, y = train[0]
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.float32 and y.shape == (8,) and y.dtype == np.float32
    # index 0 is the left eye
    from PIL import Image
    np.testing.assert_allclose(x[0], np.asarray(Image.open(train.samples[0][0]).convert('RGB'),
                                                np.float32).transpose(2, 0, 1) / 255)
    train.transform = build_dual_transform(True, 16, (0.5,) * 3, (0.5,) * 3)
    x, _ = train[0]
    assert x.shape == (2, 3, 16, 16) and x.dtype == np.float32
    batches = list(BatchLoader(ds['val'], [[0, 1, 2]], num_workers=0))
    xb, yb = batches[0]
    assert tuple(xb.shape) == (3, 2, 3, 32, 32) and tuple(yb.shape) == (3, 8)


def test_odir_csv_and_xlsx_agree(tmp_path):
    xlsx = make_odir_table(tmp_path, n_patients=16, fmt='xlsx')
    csv = str(tmp_path / 'data.csv')
    pd.read_excel(xlsx).to_csv(csv, index=False)
    a, b = build_dataset('val', xlsx, None), build_dataset('val', csv, None)
    assert ids(a) == ids(b)
    np.testing.assert_array_equal(a.targets, b.targets)


def test_patient_level_split_is_disjoint_deterministic(tmp_path):
    path = make_paired_csv(tmp_path, n_patients=30, rows_per_patient=3)
    table = pd.read_csv(path).set_index('left_image')
    ds = splits(path)
    patients = {s: set(table.loc[[i.split('|')[0] for i in ids(d)], 'patient_id']) for s, d in ds.items()}
    assert not patients['train'] & patients['val'] and not patients['train'] & patients['test']
    assert not patients['val'] & patients['test']
    assert [len(patients[s]) for s in ('train', 'val', 'test')] == [22, 4, 4]     # ratios count patients
    assert [len(ds[s]) for s in ('train', 'val', 'test')] == [66, 12, 12]       # every visit of a patient
    assert ds['train'].class_names == ['cataract', 'glaucoma', 'dr']
    again = splits(path)
    assert all(ids(again[s]) == ids(ds[s]) for s in ds)
    # per-eye samples of a patient are in the same split as its pair
    per_eye = splits(path, eye_mode='per_eye')
    for s in ('train', 'val', 'test'):
        eyes = {i for pair in ids(ds[s]) for i in pair.split('|')}
        assert set(ids(per_eye[s])) == eyes


def test_per_eye_from_odir_keywords(tmp_path):
    path = make_odir_table(tmp_path, n_patients=24)
    ds = build_dataset('train', path, None, options=DataOptions(eye_mode='per_eye'))
    dual = build_dataset('train', path, None)
    assert ds.num_views == 1 and ds.task_type == 'multi_label' and len(ds) == 2 * len(dual)
    truth = {}
    for pid, (left, right) in enumerate(odir_patients(24, np.random.default_rng(0))):
        truth[f'{pid}_left.png'], truth[f'{pid}_right.png'] = left, right
    for i in range(len(ds)):
        expected = [float(c in truth[ds.sample_id(i)]) for c in ODIR_CLASSES]
        np.testing.assert_array_equal(ds.targets[i], expected, err_msg=ds.sample_id(i))
    assert ds.eyes[:2] == ['left', 'right']
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y.shape == (8,) and y.dtype == np.float32
    assert not any('differ from' in n for n in ds.notes)   # fixture labels follow ODIR's rule


def test_keyword_table():
    cases = {'normal fundus': 'N', 'mild nonproliferative retinopathy': 'D',
             'moderate non proliferative retinopathy': 'D', 'proliferative diabetic retinopathy': 'D',
             'diabetic retinopathy': 'D', 'glaucoma': 'G', 'suspected glaucoma': 'G', 'cataract': 'C',
             'wet age-related macular degeneration': 'A', 'hypertensive retinopathy': 'H',
             'pathological myopia': 'M', 'myopia retinopathy': 'M', 'drusen': 'O', 'epiretinal membrane': 'O',
             'lens dust': None, 'low image quality': None, 'image offset': None, ' Normal  Fundus ': 'N'}
    for keyword, cls in cases.items():
        assert keyword_class(keyword) == cls, keyword
    assert keyword_classes('cataract，lens dust,moderate non proliferative retinopathy') == ['D', 'C']
    assert keyword_classes('lens dust') == []


def test_keyword_disagreement_is_noted(tmp_path):
    path = make_odir_table(tmp_path, n_patients=12, fmt='csv')
    df = pd.read_csv(path)
    df.loc[2, 'Left-Diagnostic Keywords'] = 'glaucoma'
    df.loc[2, 'Right-Diagnostic Keywords'] = 'glaucoma'
    df.loc[2, list(ODIR_CLASSES)] = 0
    df.loc[2, 'C'] = 1
    df.to_csv(path, index=False)
    ds = build_dataset('train', path, None, options=DataOptions(eye_mode='per_eye', val_ratio=0.1, test_ratio=0.1))
    assert any('for 1 of 12 patients the labels derived from the diagnostic keywords differ' in n and 'row 4' in n
               for n in ds.notes), ds.notes


def test_per_eye_generic_columns_and_refusal(tmp_path):
    path = make_paired_csv(tmp_path, n_patients=20)
    table = pd.read_csv(path)
    ds = build_dataset('val', path, None, options=DataOptions(eye_mode='per_eye'))
    for i in range(len(ds)):
        side = 'left' if ds.sample_id(i) in set(table['left_image']) else 'right'
        row = table[table[f'{side}_image'] == ds.sample_id(i)].iloc[0]
        np.testing.assert_array_equal(ds.targets[i], [row[f'{side}_{c}'] for c in ds.class_names])
    no_eye = make_paired_csv(tmp_path / 'b', n_patients=20, per_eye=False)
    assert len(build_dataset('train', no_eye, None)) > 0
    with pytest.raises(UserError, match=r"--eye_mode per_eye needs a label per eye, but the labels \['cataract', "
                                        r"'glaucoma', 'dr'\] are per patient"):
        build_dataset('train', no_eye, None, options=DataOptions(eye_mode='per_eye'))
    odir = make_odir_table(tmp_path / 'c', n_patients=12, fmt='csv')
    pd.read_csv(odir).drop(columns=['Left-Diagnostic Keywords', 'Right-Diagnostic Keywords']).to_csv(odir, index=False)
    with pytest.raises(UserError, match='needs a label per eye'):
        build_dataset('train', odir, None, options=DataOptions(eye_mode='per_eye'))


def test_only_per_eye_columns_give_patient_labels(tmp_path):
    path = make_paired_csv(tmp_path, n_patients=16)
    table = pd.read_csv(path).drop(columns=['cataract', 'glaucoma', 'dr'])
    table.to_csv(path, index=False)
    ds = build_dataset('train', path, None)
    assert ds.class_names == ['cataract', 'glaucoma', 'dr'] and ds.num_views == 2
    row = table[table['left_image'] == ds.sample_id(0).split('|')[0]].iloc[0]
    np.testing.assert_array_equal(ds.targets[0], [max(row[f'left_{c}'], row[f'right_{c}']) for c in ds.class_names])


def test_missing_eye(tmp_path):
    path = make_odir_table(tmp_path, n_patients=16, fmt='csv')
    df = pd.read_csv(path)
    df.loc[3, 'Right-Fundus'] = None     # row 5
    df.loc[8, 'Left-Fundus'] = None      # row 10
    df.to_csv(path, index=False)
    with pytest.raises(UserError) as err:
        build_dataset('train', path, None)
    assert str(err.value) == (f"{path}: 2 patients miss an eye image: blank 'Left-Fundus' at row 10; blank "
                              f"'Right-Fundus' at row 5 (both eyes in every row for --eye_mode dual); fill the "
                              f"cells, delete those rows, or use --eye_mode per_eye")
    per_eye = splits(path, eye_mode='per_eye')
    assert sum(len(d) for d in per_eye.values()) == 2 * 16 - 2
    assert any('blank eye cells' in n for d in per_eye.values() for n in d.notes)


def test_odir_label_errors_and_missing_column(tmp_path):
    path = make_odir_table(tmp_path, n_patients=12, fmt='csv')
    df = pd.read_csv(path)
    df.loc[5, 'G'] = 2
    df.to_csv(path, index=False)
    with pytest.raises(UserError, match=r"label cells outside \{0, 1\}: column 'G' at row 7 \('2'\)"):
        build_dataset('train', path, None)
    df.drop(columns=['G', 'H']).to_csv(path, index=False)
    with pytest.raises(UserError, match=r"column 'G' not found \(columns found: ID, .*pass --label_cols.*"
                                        r"missing: G, H"):
        build_dataset('train', path, None)


def test_odir_missing_images(tmp_path):
    path = make_odir_table(tmp_path, n_patients=12, fmt='csv')
    ds = build_dataset('train', path, None, options=DataOptions(val_ratio=0.1, test_ratio=0.1))
    left, right = ds.listed[0]
    row = ds.rows[0]
    os.remove(ds.samples[0][1])
    with pytest.raises(UserError, match=rf"1 of 20 images of the train split not found under .*Training Images "
                                        rf"\(row {row} \('{right}'\)\)"):
        build_dataset('train', path, None, options=DataOptions(val_ratio=0.1, test_ratio=0.1))
    shutil.copy(ds.samples[0][0], ds.samples[0][1])
    deep = tmp_path / 'other' / 'deeper' / 'deepest'
    os.makedirs(deep)
    os.rename(tmp_path / 'Training Images', deep / 'Training Images')    # three levels down: not searched
    with pytest.raises(UserError, match=r"none of the first 24 listed images found \(e.g. '0_left.png'\); looked "
                                        r"under .*other/deeper \(image paths relative to --image_root"):
        build_dataset('train', path, None)
    # a folder two levels down is searched
    os.rename(deep / 'Training Images', tmp_path / 'other' / 'Training Images')
    assert build_dataset('val', path, None).image_root.endswith(os.path.join('other', 'Training Images'))


def test_generic_paired_options(tmp_path):
    path = make_paired_csv(tmp_path, n_patients=16, per_eye=False)
    df = pd.read_csv(path).rename(columns={'left_image': 'OS', 'right_image': 'OD', 'patient_id': 'subject_code'})
    df.to_csv(path, index=False)
    with pytest.raises(UserError, match=r'cannot tell which column holds the image paths \(text columns '
                                        r'subject_code, OS, OD;.*pass --image_col \(or --left_col and --right_col'):
        build_dataset('train', path, None)
    opts = DataOptions(left_col='OS', right_col='OD', patient_col='subject_code')
    ds = build_dataset('train', path, None, options=opts)
    assert ds.num_views == 2 and ds.class_names == ['cataract', 'glaucoma', 'dr']
    assert ds.sample_id(0) == f"{df.loc[df['OS'] == ds.listed[0][0], 'OS'].iloc[0]}|{ds.listed[0][1]}"
    with pytest.raises(UserError, match=r"column 'OSS' not found .*did you mean 'OS'"):
        build_dataset('train', path, None, options=DataOptions(left_col='OSS', right_col='OD'))
    no_patient = DataOptions(left_col='OS', right_col='OD')
    assert any('no patient column' in n for n in build_dataset('train', path, None, options=no_patient).notes)


def test_split_column_patient_leak_is_noted(tmp_path):
    path = make_paired_csv(tmp_path, n_patients=10, rows_per_patient=2)
    df = pd.read_csv(path)
    df['split'] = ['train', 'val'] * 10             # each patient's two visits in two splits
    df.to_csv(path, index=False)
    ds = build_dataset('train', path, None)
    assert len(ds) == 10 and any('10 patients are in more than one split' in n for n in ds.notes)


def test_nb_classes_and_task_type_checks(tmp_path):
    path = make_odir_table(tmp_path, n_patients=12, fmt='csv')
    with pytest.raises(UserError, match=r"8 labels .* but --nb_classes 5; pass --nb_classes 8"):
        build_dataset('train', path, None, num_classes=5)
    with pytest.raises(UserError, match='--task_type single_label does not apply to the odir format'):
        build_dataset('train', path, None, options=DataOptions(task_type='single_label'))
    assert build_dataset('train', path, None, options=DataOptions(label_cols=['N', 'D'])).class_names == ['N', 'D']
