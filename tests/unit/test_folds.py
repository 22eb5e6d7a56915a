"""K-fold splits (util/datasets/folds.py): every row in one fold, patients never straddle folds, strata dealt
evenly; over the K runs every row is tested exactly once; tables with and without a patient column or a split
column, and class folders; the protocol flags' checks."""
from __future__ import annotations

import os
import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fixtures_data import make_multilabel_csv
from helpers import make_class_folders
from util.config import resolve_config
from util.datasets import DataOptions, build_splits
from util.datasets.folds import assign_folds, fold_assignment
from util.errors import UserError

SPLITS = ("train", "val", "test")


def test_every_group_in_one_fold_and_each_stratum_dealt_evenly():
    rng = np.random.default_rng(0)
    groups = np.repeat([f"P{p:02d}" for p in range(50)], rng.integers(1, 4, 50))  # 1-3 images per patient
    first = {g: i for i, g in reversed(list(enumerate(groups)))}
    patient_class = {g: int(rng.integers(0, 3)) for g in first}
    labels = np.array([patient_class[g] for g in groups])
    folds = assign_folds(labels, groups, 5, seed=1)
    assert set(folds.tolist()) == {0, 1, 2, 3, 4}
    fold_of = {}
    for g, f in zip(groups, folds):
        assert fold_of.setdefault(g, f) == f  # all rows of a patient in one fold
    for c in range(3):  # each class's patients: floor or ceil of count / 5 per fold
        per_fold = Counter(fold_of[g] for g in first if patient_class[g] == c)
        total = sum(per_fold.values())
        assert {per_fold.get(f, 0) for f in range(5)} <= {total // 5, -(-total // 5)}, (c, per_fold)
    rows = np.bincount(folds, minlength=5)
    assert rows.max() - rows.min() <= 3, rows  # row counts stay close (a patient holds up to 3 rows)
    assert np.array_equal(assign_folds(labels, groups, 5, seed=1), folds)  # seeded
    assert not np.array_equal(assign_folds(labels, groups, 5, seed=2), folds)


def test_multi_label_folds_keep_each_label_in_every_fold():
    rng = np.random.default_rng(3)
    y = (rng.random((90, 4)) < 0.3).astype(np.float32)
    y[np.arange(90), np.arange(90) % 4] = 1  # every label common enough
    folds = assign_folds(y, None, 3, seed=0)
    for f in range(3):
        assert (y[folds == f].sum(0) >= 5).all(), y[folds == f].sum(0)
    assert np.bincount(folds).tolist() == [30, 30, 30]


def test_too_few_groups_for_the_folds_is_an_error():
    with pytest.raises(UserError, match="--kfold 5: the data has 3 patients"):
        assign_folds(np.array([0, 1, 0, 1]), np.array(["a", "b", "c", "a"]), 5, seed=0)


def test_fold_assignment_tests_each_row_once_with_val_from_the_other_folds():
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(40).astype(str), 2)
    labels = np.repeat(rng.integers(0, 2, 40), 2)
    tested = np.zeros(80, dtype=int)
    for k in range(4):
        split = fold_assignment(labels, groups, DataOptions(kfold=4, fold=k, val_ratio=0.2, split_seed=7))
        tested += split == "test"
        for s, t in (("train", "val"), ("train", "test"), ("val", "test")):
            assert not set(groups[split == s]) & set(groups[split == t]), (k, s, t)
        assert (split == "test").sum() == 20 and (split == "val").sum() == 12  # 10 patients; 0.2 of the other 30
    assert (tested == 1).all()
    with pytest.raises(UserError, match="--fold 4 is not one of the folds 0..3"):
        fold_assignment(labels, groups, DataOptions(kfold=4, fold=4))


def _patient_table(root, n_patients=18, split_col=False):
    """Grading table, two eyes per patient (grades differ by one), an image per row."""
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rows = []
    for p in range(n_patients):
        for side in "LR":
            rel = f"img/p{p:02d}{side}.png"
            Image.new("RGB", (8, 8), (20 * p % 255, 0, 0)).save(os.path.join(root, rel))
            rows.append({"image": rel, "patient_id": f"P{p:02d}", "grade": (p + (side == "R")) % 3})
    df = pd.DataFrame(rows)
    if split_col:
        df["split"] = ["train", "train", "val", "val", "test", "test"] * (n_patients // 3)
    path = os.path.join(root, "labels.csv")
    df.to_csv(path, index=False)
    return path, df


def _folds_of(path, k, **options):
    """{fold: {split: dataset}} for every fold."""
    return {f: build_splits(path, list(SPLITS), None, None, DataOptions(kfold=k, fold=f, **options), say=lambda m: None)
            for f in range(k)}


@pytest.mark.parametrize("split_col", [False, True])
def test_table_folds_are_patient_level_and_test_every_row_once(tmp_path, split_col):
    path, df = _patient_table(str(tmp_path), split_col=split_col)
    patient = dict(zip(df["image"], df["patient_id"]))
    tested = []
    for f, ds in _folds_of(path, 3).items():
        ids = {s: [ds[s].sample_id(i) for i in range(len(ds[s]))] for s in SPLITS}
        pats = {s: {patient[i] for i in ids[s]} for s in SPLITS}
        assert not pats["train"] & pats["test"] and not pats["val"] & pats["test"] and not pats["train"] & pats["val"]
        assert sum(len(v) for v in ids.values()) == len(df)  # every row in one split of the fold
        tested += ids["test"]
        note = [n for n in ds["test"].notes if "--kfold 3" in n][0]
        assert f"--kfold 3 --fold {f}:" in note and "grouped by patient column 'patient_id' (18 patients)" in note
        assert ("split column set aside" in note) == split_col
        assert not ds["test"].test_is_val
    assert sorted(tested) == sorted(df["image"])  # each row tested exactly once over the folds


def test_table_without_patient_column_folds_by_image_and_warns(tmp_path):
    path = make_multilabel_csv(str(tmp_path), n=30)
    tested = []
    for ds in _folds_of(path, 3).values():
        tested += [ds["test"].sample_id(i) for i in range(len(ds["test"]))]
        assert any(n.startswith("warning:") and "folds are made image by image" in n for n in ds["test"].notes)
    assert len(tested) == 30 and len(set(tested)) == 30


def test_class_folder_folds_pool_every_split_folder(tmp_path):
    root = make_class_folders(tmp_path / "data", counts={"train": 6, "val": 2, "test": 4})
    all_files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
    tested = []
    for ds in _folds_of(root, 3, val_ratio=0.2).values():
        ids = {s: {ds[s].sample_id(i) for i in range(len(ds[s]))} for s in SPLITS}
        assert not ids["train"] & ids["test"] and not ids["val"] & ids["test"] and not ids["train"] & ids["val"]
        assert sorted(ids["train"] | ids["val"] | ids["test"]) == all_files  # 'train/a/a_0.png', 'test/c/c_3.png'
        counts = ds["test"].class_counts().tolist()
        assert counts == [4, 4, 4] and ds["test"].class_names == ["a", "b", "c"]  # 12 images a class, 3 folds
        assert any("no patient ids (class folders carry none)" in n for n in ds["test"].notes)
        tested += sorted(ids["test"])
    assert sorted(tested) == all_files


@pytest.mark.parametrize("argv, message", [
    (["--fold", "1"], "--fold 1: given without --kfold"),
    (["--kfold", "3", "--fold", "3"], "--fold 3: not one of the folds of --kfold 3 (0..2)"),
    (["--kfold", "1"], "--kfold 1: out of range"),
    (["--seeds", "1"], "--seeds 1: out of range"),
    (["--seeds", "3", "--kfold", "3"], "--seeds and --kfold: one protocol per command"),
    (["--kfold", "3", "--eval", "--resume", "x"], "--kfold with --eval"),
    (["--seeds", "2", "--resume", "x"], "--seeds with --resume x: the sub-runs resume themselves"),
    (["--kfold", "3", "--data_path", "d.npz"], "the npz format keeps its given splits"),
    (["--external", "nowhere,elsewhere"], "--external: nowhere, elsewhere not found"),
])
def test_protocol_flags_are_checked(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        resolve_config(["--data_path", "d", *argv])
