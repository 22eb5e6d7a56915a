"""Per-image tables split by patient: the patient column (given or found by name), the split line, the warning."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fixtures_data import make_paired_csv
from util.datasets import DataOptions, build_dataset, build_splits
from util.errors import UserError

SPLITS = ('train', 'val', 'test')
LABELS = ('cataract', 'glaucoma', 'dr')


def per_image_table(root, n_patients: int = 40, patient_col: str | None = 'patient_id', kind: str = 'multilabel',
                    extra: dict | None = None) -> str:
    """A per-image table, two eyes (two rows) per patient, no split column; tiny blank images."""
    root = str(root)
    os.makedirs(os.path.join(root, 'img'), exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for p in range(n_patients):
        for side in ('L', 'R'):
            rel = f'img/p{p:03d}_{side}.png'
            Image.new('RGB', (4, 4)).save(os.path.join(root, rel))
            row = {'image': rel, 'eye': side}
            if patient_col:
                row[patient_col] = f'P{p:03d}'
            if kind == 'multilabel':
                row.update({c: int(v) for c, v in zip(LABELS, rng.random(3) < 0.4)})
                row[LABELS[p % 3]] = 1
            else:
                row['grade'] = (p + (side == 'R')) % 4     # the two eyes of a patient differ by one grade
            rows.append(row)
    df = pd.DataFrame(rows)
    for col, values in (extra or {}).items():
        df[col] = values(df)
    path = os.path.join(root, 'labels.csv')
    df.to_csv(path, index=False)
    return path


def patients_per_split(path: str, options: DataOptions | None = None, col: str = 'patient_id') -> dict[str, set]:
    table = pd.read_csv(path, dtype=str).set_index('image')
    out = {}
    for s in SPLITS:
        ds = build_dataset(s, path, None, options=options)
        out[s] = set(table.loc[[ds.sample_id(i) for i in range(len(ds))], col])
    return out


def assert_disjoint(patients: dict[str, set]) -> None:
    for a, b in (('train', 'val'), ('train', 'test'), ('val', 'test')):
        assert not patients[a] & patients[b], (a, b, sorted(patients[a] & patients[b])[:5])


@pytest.mark.parametrize('name', ['patient_id', 'Patient ID', 'subject', 'PID'])
def test_auto_detected_patient_column_keeps_both_eyes_together(tmp_path, name):
    path = per_image_table(tmp_path, patient_col=name)
    patients = patients_per_split(path, col=name)
    assert_disjoint(patients)
    assert sum(len(p) for p in patients.values()) == 40
    assert [len(patients[s]) for s in SPLITS] == [28, 6, 6]            # ratios count patients
    notes = build_dataset('train', path, None).notes
    assert f"grouped by patient column {name!r} (40 patients)" in notes[0]
    assert not any(n.startswith('warning:') for n in notes)


def test_grading_table_is_grouped_deterministic_and_stratified(tmp_path):
    path = per_image_table(tmp_path, n_patients=80, kind='grading')
    first = patients_per_split(path)
    assert_disjoint(first)
    assert patients_per_split(path) == first                              # same seed, same split
    other = patients_per_split(path, DataOptions(split_seed=5))
    assert_disjoint(other)
    assert other['test'] != first['test']
    # stratified by each patient's (first eye's) grade: 20 patients per grade, 12 in val -> 3 of each
    table = pd.read_csv(path)
    first_grade = table.groupby('patient_id')['grade'].first()
    for s in ('val', 'test'):
        counts = np.bincount(first_grade[sorted(first[s])].to_numpy(), minlength=4)
        assert counts.tolist() == [3, 3, 3, 3], (s, counts)


def test_explicit_patient_col_with_unusual_name(tmp_path):
    path = per_image_table(tmp_path, patient_col='MRN_code')
    options = DataOptions(patient_col='MRN_code')
    assert_disjoint(patients_per_split(path, options, col='MRN_code'))
    notes = build_dataset('train', path, None, options=options).notes
    assert "grouped by patient column 'MRN_code' (40 patients)" in notes[0]
    assert 'grouped by rows' not in notes[0]
    assert not any(n.startswith('warning:') for n in notes)
    # not a name the toolkit recognises: without the flag the split is by image, and says so
    notes = build_dataset('train', path, None).notes
    assert 'grouped by' not in notes[0]
    assert any(n.startswith('warning:') and 'images of one patient' in n for n in notes)


def test_warning_when_no_patient_column_printed_once(tmp_path):
    path = per_image_table(tmp_path, patient_col=None)
    lines: list[str] = []
    build_splits(path, list(SPLITS), say=lines.append)
    warnings = [line for line in lines if 'images of one patient' in line]
    assert len(warnings) == 1
    assert (f"{path}: no patient column" in warnings[0] and "may land in two splits; pass --patient_col NAME "
            "(or add a split column) to keep each patient in one split" in warnings[0])
    carve = [line for line in lines if 'carved from labels.csv' in line]
    assert len(carve) == 1 and 'grouped by' not in carve[0]


def test_id_column_counts_only_when_it_repeats(tmp_path):
    repeated = per_image_table(tmp_path / 'a', patient_col='ID')
    assert_disjoint(patients_per_split(repeated, col='ID'))
    assert "grouped by patient column 'ID' (40 patients)" in build_dataset('val', repeated, None).notes[0]
    # one ID per row: an image id, so no claim of patient grouping, and the warning
    unique = per_image_table(tmp_path / 'b', patient_col=None, extra={'ID': lambda df: range(len(df))})
    notes = build_dataset('val', unique, None).notes
    assert 'grouped by' not in notes[0]
    assert any(n.startswith('warning:') for n in notes)
    # ...unless the user says it is the patient column
    notes = build_dataset('val', unique, None, options=DataOptions(patient_col='ID')).notes
    assert "grouped by patient column 'ID' (80 patients)" in notes[0]


def test_missing_patient_col_is_a_clear_error(tmp_path):
    path = per_image_table(tmp_path)
    with pytest.raises(UserError) as err:
        build_dataset('train', path, None, options=DataOptions(patient_col='patient'))
    msg = str(err.value)
    assert msg.startswith(f"{path}: --patient_col 'patient' is not a column of the table")
    assert 'columns found: image, eye, patient_id, cataract, glaucoma, dr' in msg
    assert "did you mean 'patient_id'?" in msg and msg.endswith('or ID')


def test_split_column_kept_and_patient_leak_noted(tmp_path):
    split = lambda df: ['train', 'test'] * 20 + ['train', 'train', 'val', 'val'] * 10  # noqa: E731
    path = per_image_table(tmp_path, extra={'split': split})
    table = pd.read_csv(path)
    for s in SPLITS:
        ds = build_dataset(s, path, None)
        assert sorted(ds.sample_id(i) for i in range(len(ds))) == sorted(table.loc[table['split'] == s, 'image'])
    notes = build_dataset('train', path, None).notes
    assert any('20 patients are in more than one split' in n for n in notes)
    assert not any(n.startswith('warning:') for n in notes)


def test_paired_table_split_line_names_patient_column(tmp_path):
    path = make_paired_csv(tmp_path, n_patients=20, rows_per_patient=2, per_eye=False)
    notes = build_dataset('train', path, None).notes
    assert "grouped by patient column 'patient_id' (20 patients)" in notes[0]
