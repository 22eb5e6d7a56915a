"""Hostile or misleading tables: image paths leaving the table's folder, a --task_type that does not fit the
table, an npz split lacking the top class, and workbooks whose first sheet is not the table."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fixtures_data import make_grading_csv, make_multilabel_csv, make_odir_table, make_paired_csv
from util.datasets import DataOptions, build_dataset
from util.errors import UserError


def _outside_images(root, names=('a.png', 'b.png')):
    """Real images in a folder next to the table's folder (so only the outside-path check can refuse them)."""
    folder = os.path.join(str(root), 'outside')
    os.makedirs(folder, exist_ok=True)
    for n in names:
        Image.new('RGB', (8, 8), (200, 10, 10)).save(os.path.join(folder, n))
    return folder


# ----------------------------------------------------------------------------- image paths outside the folder

def test_outside_paths_refused_with_rows_and_allowed_by_flag(tmp_path):
    outside = _outside_images(tmp_path)
    path = make_multilabel_csv(tmp_path / 'data', n=20)
    df = pd.read_csv(path)
    df.loc[2, 'Image_File'] = '../outside/a.png'                  # spreadsheet row 4
    df.loc[6, 'Image_File'] = os.path.join(outside, 'b.png')       # row 8, absolute
    df.loc[9, 'Image_File'] = 'images/../../outside/a.png'         # row 11
    df.loc[12, 'Image_File'] = '..\\outside\\b.png'                # row 14, Windows separators
    df.to_csv(path, index=False)
    for split in ('train', 'val', 'test'):                          # every split refuses the whole table
        with pytest.raises(UserError) as err:
            build_dataset(split, path, None)
        msg = str(err.value)
        assert msg.startswith(f"{path}: 4 image paths lead outside the table's folder")
        assert "rows 4 ('../outside/a.png'), 8 (" in msg and "11 ('images/../../outside/a.png')" in msg
        assert "14 ('..\\\\outside\\\\b.png')" in msg
        assert '--image_root' in msg and '--allow_outside_paths' in msg
    ds = {s: build_dataset(s, path, None, options=DataOptions(allow_outside_paths=True))
          for s in ('train', 'val', 'test')}
    assert sum(len(d) for d in ds.values()) == 20
    assert any(os.path.realpath(f).startswith(os.path.realpath(outside)) for d in ds.values() for f in d.samples)


def test_outside_paths_report_all_rows_at_once(tmp_path):
    path = make_multilabel_csv(tmp_path / 'data', n=20)
    df = pd.read_csv(path)
    df['Image_File'] = df['Image_File'].astype(object)
    for i in range(12):
        df.loc[i, 'Image_File'] = f'../../../../etc/passwd{i}'
    df.to_csv(path, index=False)
    with pytest.raises(UserError, match=r"12 image paths lead outside the table's folder .*\(rows 2 "
                                        r"\('\.\./\.\./\.\./\.\./etc/passwd0'\), 3 .* and 7 more\)"):
        build_dataset('train', path, None)


def test_outside_paths_refused_even_when_none_is_found(tmp_path):
    path = make_multilabel_csv(tmp_path / 'data', n=10)
    df = pd.read_csv(path)
    df['Image_File'] = [f'/nonexistent/secret/{i}.png' for i in range(10)]
    df.to_csv(path, index=False)
    with pytest.raises(UserError, match=r"10 image paths lead outside the table's folder .*rows 2 "
                                        r"\('/nonexistent/secret/0.png'\)"):
        build_dataset('train', path, None)


def test_symlink_leaving_the_folder_is_refused(tmp_path):
    outside = _outside_images(tmp_path)
    path = make_multilabel_csv(tmp_path / 'data', n=10)
    df = pd.read_csv(path)
    link = tmp_path / 'data' / 'images' / 'img_003.png'            # listed in row 5, now a link leading out
    os.remove(link)
    os.symlink(os.path.join(outside, 'a.png'), link)
    with pytest.raises(UserError, match=r"1 image paths lead outside the table's folder .*row 5 "
                                        r"\('images/img_003.png'\).*symlinks and '\.\.' resolved"):
        build_dataset('train', path, None)
    # a linked folder of images counts the same
    os.rename(tmp_path / 'data' / 'images', tmp_path / 'elsewhere')
    os.symlink(tmp_path / 'elsewhere', tmp_path / 'data' / 'images')
    with pytest.raises(UserError, match=r"10 image paths lead outside"):
        build_dataset('train', path, None)
    ds = build_dataset('train', path, None, options=DataOptions(allow_outside_paths=True))
    assert len(ds) > 0 and df['Image_File'][0].startswith('images/')


def test_outside_image_root_is_refused(tmp_path):
    path = make_multilabel_csv(tmp_path / 'data', n=10)
    df = pd.read_csv(path)
    root = tmp_path / 'data' / 'images'
    df['Image_File'] = [os.path.basename(f) for f in df['Image_File']]
    df.loc[1, 'Image_File'] = '../labels_image_centric_4_class_clean.csv'    # row 3: inside the table's folder,
    df.to_csv(path, index=False)                                             # but not inside --image_root
    with pytest.raises(UserError, match=rf"1 image paths lead outside --image_root {root} \(row 3 "
                                        r"\('\.\./labels_image_centric_4_class_clean.csv'\)\).*pass --image_root"):
        build_dataset('train', path, None, options=DataOptions(image_root=str(root)))


def test_outside_paths_in_grading_and_paired_tables(tmp_path):
    grading = make_grading_csv(tmp_path / 'g', n=20)
    df = pd.read_csv(grading)
    df.loc[4, 'image'] = '../../../etc/shadow'
    df.to_csv(grading, index=False)
    with pytest.raises(UserError, match=r"grades.csv: 1 image paths lead outside .*row 6 \('\.\./\.\./\.\./etc/shadow'\)"):
        build_dataset('val', grading, None)

    paired = make_paired_csv(tmp_path / 'p', n_patients=12)
    df = pd.read_csv(paired)
    df.loc[0, 'left_image'] = '/etc/passwd'
    df.loc[3, 'right_image'] = '../x/../../y.png'
    df.to_csv(paired, index=False)
    for mode in ('dual', 'per_eye'):
        with pytest.raises(UserError, match=r"pairs.csv: 2 image paths lead outside .*rows 2 \('/etc/passwd'\), 5 "
                                            r"\('\.\./x/\.\./\.\./y.png'\)"):
            build_dataset('train', paired, None, options=DataOptions(eye_mode=mode))

    odir = make_odir_table(tmp_path / 'o', n_patients=12, fmt='csv')
    df = pd.read_csv(odir)
    df.loc[2, 'Right-Fundus'] = '../../../../root/.ssh/id_rsa'
    df.to_csv(odir, index=False)
    with pytest.raises(UserError, match=r"data.csv: 1 image paths lead outside .*row 4 "
                                        r"\('\.\./\.\./\.\./\.\./root/\.ssh/id_rsa'\)"):
        build_dataset('test', odir, None)


# ----------------------------------------------------------------------------- messages naming the culprit

def test_regression_on_multilabel_table_names_task_type(tmp_path):
    path = make_multilabel_csv(tmp_path, n=20)
    with pytest.raises(UserError) as err:
        build_dataset('train', path, None, options=DataOptions(task_type='regression'))
    msg = str(err.value)
    assert msg.startswith(f'{path}: --task_type regression needs a single numeric grade column')
    assert '4 0/1 label columns (cataract, glaucoma, diabetic_retinopathy, normal_fundus)' in msg
    assert '--grade_col' in msg and 'multi-label: drop --task_type regression' in msg
    # the table itself is fine without the flag
    assert build_dataset('train', path, None).task_type == 'multi_label'


def _npz(path, test_labels, train_labels=None):
    train_labels = np.arange(10) % 5 if train_labels is None else train_labels
    imgs = np.zeros((10, 8, 8, 3), np.uint8)
    np.savez(path, train_images=imgs, train_labels=train_labels, val_images=imgs, val_labels=np.arange(10) % 5,
             test_images=imgs, test_labels=test_labels)
    return str(path)


def test_npz_split_lacking_top_class_asks_for_nb_classes(tmp_path):
    p = _npz(tmp_path / 'd.npz', np.arange(10) % 4)
    assert build_dataset('train', p, None).class_names == ['0', '1', '2', '3', '4']
    with pytest.raises(UserError, match=r"d.npz\[test_labels\]: the test split lacks classes \[4\] \(its labels go up "
                                        r"to 3, but the train/val splits have labels up to 4, so 5 classes.*\); "
                                        r"pass --nb_classes 5$"):
        build_dataset('test', p, None)
    assert build_dataset('test', p, None, num_classes=5).class_names == ['0', '1', '2', '3', '4']
    # the train split lacking the top classes is named the same way
    p2 = _npz(tmp_path / 'e.npz', np.arange(10) % 5, train_labels=np.arange(10) % 3)
    with pytest.raises(UserError, match=r"the train split lacks classes \[3, 4\] .*pass --nb_classes 5$"):
        build_dataset('train', p2, None, options=DataOptions(task_type='regression'))


def _with_cover(table: pd.DataFrame, path, sheet='Data'):
    with pd.ExcelWriter(path) as book:
        pd.DataFrame({'Retina study': ['exported 2024', 'see sheet Data']}).to_excel(book, sheet_name='Cover',
                                                                                      index=False)
        table.to_excel(book, sheet_name=sheet, index=False)
    return str(path)


def test_xlsx_cover_sheet_lists_sheets_and_sheet_selects(tmp_path):
    csv = make_multilabel_csv(tmp_path, n=14)
    xlsx = _with_cover(pd.read_csv(csv), tmp_path / 'book.xlsx')
    with pytest.raises(UserError, match=r"book.xlsx: .*book.xlsx has 2 sheets \('Cover', 'Data'\) and only the "
                                        r"first, 'Cover', was read.*--sheet NAME \(e.g. --sheet Data\)"):
        build_dataset('train', xlsx, None)
    with pytest.raises(UserError, match=r"sheets \('Cover', 'Data'\).*--sheet"):
        build_dataset('train', xlsx, None, fmt='csv_multilabel')        # format named: the parse error says it
    a = build_dataset('val', csv, None)
    b = build_dataset('val', xlsx, None, options=DataOptions(sheet='Data'))
    assert b.format_name == 'csv_multilabel' and [b.sample_id(i) for i in range(len(b))] == \
        [a.sample_id(i) for i in range(len(a))]
    with pytest.raises(UserError, match=r"book.xlsx: no sheet named 'data' \(sheets in this workbook: 'Cover', "
                                        r"'Data'; did you mean 'Data'\?\); pass --sheet"):
        build_dataset('train', xlsx, None, options=DataOptions(sheet='data'))
    with pytest.raises(UserError, match=r"no sheet named 'Labels' \(sheets in this workbook: 'Cover', 'Data'"):
        build_dataset('train', xlsx, None, fmt='csv_multilabel', options=DataOptions(sheet='Labels'))
    with pytest.raises(UserError, match=r"\.csv: --sheet Data given, but a \.csv table has no sheets"):
        build_dataset('train', csv, None, options=DataOptions(sheet='Data'))


def test_sheet_selects_for_grading_odir_and_table_directories(tmp_path):
    grading = make_grading_csv(tmp_path / 'g', n=20)
    gx = _with_cover(pd.read_csv(grading), tmp_path / 'g' / 'grades.xlsx', sheet='Grades')
    with pytest.raises(UserError, match=r"sheets \('Cover', 'Grades'\)"):
        build_dataset('train', gx, None)
    ds = build_dataset('train', gx, None, options=DataOptions(sheet='Grades'))
    assert ds.format_name == 'csv_grading' and ds.task_type == 'regression' and len(ds) == 14

    odir = make_odir_table(tmp_path / 'o', n_patients=12, fmt='xlsx')
    ox = _with_cover(pd.read_excel(odir), tmp_path / 'o' / 'odir.xlsx', sheet='Annotations')
    with pytest.raises(UserError, match=r"sheets \('Cover', 'Annotations'\)"):
        build_dataset('train', ox, None)
    ds = build_dataset('train', ox, None, options=DataOptions(sheet='Annotations'))
    assert ds.format_name == 'odir' and ds.num_views == 2

    root = tmp_path / 'dir'
    make_multilabel_csv(root, n=20, layout='dir')
    for split in ('train', 'val', 'test'):
        _with_cover(pd.read_csv(root / f'{split}.csv'), root / f'{split}.xlsx', sheet='Rows')
        os.remove(root / f'{split}.csv')
    with pytest.raises(UserError, match=r"train.xlsx has 2 sheets \('Cover', 'Rows'\)"):
        build_dataset('train', str(root), None)
    ds = build_dataset('val', str(root), None, options=DataOptions(sheet='Rows'))
    assert ds.format_name == 'csv_multilabel' and len(ds) == 4
