"""K-fold cross-validation splits (``--kfold K --fold k``): fold k is the test split, val is carved from the rest.

Every row of the dataset (the given train/val/test splits pooled: a split column, a directory of tables or the
split folders of a class-folder tree) is put in one of K folds. Fold ``k`` is the test split of the run; the
other K - 1 folds are split into train and val exactly as a table without a split column is carved
(``splits.stratified_assign``: seeded, stratified, grouped, ``--val_ratio`` of their groups to val). So over
the K runs every row is tested exactly once, by a model that never saw it in training or model selection.

Folds are made of groups, not rows: the patients of a table's patient column (``--patient_col`` or the column
``tables.find_patient_col`` finds, the same grouping the ordinary split uses), one patient per row in a paired
table, else one image per group, which ``dataset.notes`` warns about as the ordinary split does (class folders
carry no patient ids). The assignment is stratified: each stratum (class, grade, or multi-label combination
with the rare ones pooled, ``splits._stratum_keys``) is dealt over the folds, its groups in a seeded random
order with the larger ones (more images) first, each group to the fold holding the fewest groups of its
stratum so far (ties: the fewest rows, then the fewest groups, then a seeded order of the folds), so every
fold gets ``floor`` or ``ceil`` of each stratum's groups and the row counts stay close. It depends only on
the labels, the groups, K and ``--split_seed``.

References: scikit-learn ``model_selection.StratifiedGroupKFold`` (what the assignment aims at: stratified
folds that never split a group); Kohavi, "A Study of Cross-Validation and Bootstrap for Accuracy Estimation
and Model Selection", IJCAI 1995 (stratified K-fold).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from util.datasets.base import SPLITS, DataOptions
from util.datasets.splits import _stratum_keys, group_labels, stratified_assign
from util.datasets.tables import TableSource, find_split_col
from util.errors import UserError


def _group_index(groups, n: int) -> np.ndarray:
    """Group number of each row, numbered by first appearance (each row its own group when ``groups`` is None)."""
    if groups is None:
        return np.arange(n)
    _, first, gid = np.unique(np.asarray(groups, dtype=str), return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[gid.reshape(-1)]


def assign_folds(labels: np.ndarray, groups, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of each of ``len(labels)`` rows: stratified, grouped and seeded (module docstring).

    ``labels``: one class/grade per row, or a 0/1 row per sample (multi-label); ``groups``: the patient of
    each row, or ``None`` (every row its own group). A group's label is its first row's (single-label,
    grade) or the union of its rows' labels (multi-label), as in ``splits.stratified_assign``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    k = int(k)
    if k < 2:
        raise ValueError(f"assign_folds: k must be 2 or more, got {k}")
    gid = _group_index(groups, n)
    num_groups = int(gid.max()) + 1 if n else 0
    if num_groups < k:
        raise UserError(f"--kfold {k}: the data has {num_groups} {'patients' if groups is not None else 'images'} "
                        f"(at least {k}, one per fold); pass a smaller --kfold")
    glab = group_labels(labels, gid, num_groups)
    size = np.bincount(gid, minlength=num_groups)
    keys = _stratum_keys(glab, k)  # multi-label combinations seen fewer than k times pooled
    rng = np.random.default_rng(seed)
    strata: dict = {}
    for g in rng.permutation(num_groups):
        strata.setdefault(keys[g], []).append(int(g))
    fold_rows, fold_groups = np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64)
    fold_of_group = np.empty(num_groups, dtype=np.int64)
    for key in sorted(strata, key=str):
        order = rng.permutation(k)  # the seeded order of the folds among equals, drawn per stratum
        in_stratum = np.zeros(k, dtype=np.int64)
        for g in sorted(strata[key], key=lambda g: -size[g]):  # large patients first: row counts even out
            f = int(np.lexsort((order, fold_groups, fold_rows, in_stratum))[0])
            fold_of_group[g] = f
            in_stratum[f] += 1
            fold_rows[f] += size[g]
            fold_groups[f] += 1
    return fold_of_group[gid]


def fold_assignment(strat: np.ndarray, groups, options: DataOptions) -> np.ndarray:
    """Split names ('train'/'val'/'test') of every row for fold ``options.fold`` of ``options.kfold``."""
    k, fold = int(options.kfold), options.fold
    if fold is None or not 0 <= int(fold) < k:
        raise UserError(f"--kfold {k}: --fold {fold!r} is not one of the folds 0..{k - 1} (the fold tested by this "
                        f"run); pass --fold 0 to --fold {k - 1}, or leave both out of a plain run")
    if options.val_ratio <= 0:
        raise UserError(f"--kfold {k}: --val_ratio {options.val_ratio} leaves no val split (the val split selects "
                        f"the model, carved from the folds that are not tested); pass --val_ratio 0.15")
    folds = assign_folds(strat, groups, k, options.split_seed)
    assigned = np.full(len(folds), 'test', dtype=object)
    rest = np.flatnonzero(folds != int(fold))
    assigned[rest] = stratified_assign(strat[rest], None if groups is None else np.asarray(groups)[rest],
                                       {'val': options.val_ratio}, options.split_seed)
    return assigned


def _fold_note(where: str, options: DataOptions, assigned: np.ndarray, pooled: str, grouping: str,
               unit: str = 'rows') -> str:
    counts = ', '.join(f'{s} {int((assigned == s).sum())}' for s in SPLITS)
    return (f"{where}: --kfold {options.kfold} --fold {options.fold}: {pooled} in {options.kfold} stratified folds "
            f"(--split_seed {options.split_seed}, {grouping}); test = fold {options.fold}, val carved from the other "
            f"folds (--val_ratio {options.val_ratio}): {counts} {unit}")


def _no_patient_warning(where: str, what: str, fix: str) -> str:
    return (f"warning: {where}: no patient ids ({what}), so the folds are made image by image and images of one "
            f"patient (e.g. the two eyes) may be tested in one fold and trained on in another; {fix} to keep each "
            f"patient in one fold")


def fold_splits(src: TableSource, options: DataOptions, strat: np.ndarray, groups: np.ndarray | None,
                patient_col: str | None = None) -> tuple[np.ndarray, bool, dict[str, list[str]]]:
    """``splits.assign_splits`` for ``--kfold``: the split of every row of ``src``, whether test is val (never),
    and the notes per split. ``groups``/``patient_col`` as there."""
    assigned = fold_assignment(strat, groups, options)
    if src.is_dir:
        pooled = f"the rows of {', '.join(os.path.basename(f) for f in src.files.values())} pooled"
    elif find_split_col(src.frame, src.where, options) is not None:
        pooled = f"all {len(assigned)} rows (the split column set aside)"
    else:
        pooled = f"all {len(assigned)} rows"
    if patient_col is not None:
        grouping = f"grouped by patient column {patient_col!r} ({len(set(groups))} patients)"
    elif groups is not None:
        grouping = "one patient per row"
    else:
        grouping = "one image per group"
    notes = [_fold_note(src.where, options, assigned, pooled, grouping)]
    if groups is None:
        notes.append(_no_patient_warning(src.where, "no column named like patient_id/patient/subject, an ID with "
                                                    "repeated values, or --patient_col", "pass --patient_col NAME"))
    return assigned, False, {s: list(notes) for s in SPLITS}


def take_folder_fold(ds, data_path: str, split: str, num_classes: int | None, options: DataOptions) -> None:
    """Fill the class-folder dataset ``ds`` (an ``ImageFolderDataset`` being built) with the ``split`` of fold
    ``options.fold``: the images of every split folder present (train/, val/, test/ or training/,
    validation/) pooled, folded by class (image by image: folders carry no patient ids), the other folds split
    into train and val. Each split folder is first read as a dataset of its own, so every check of the
    format applies; the sample ids become paths under ``data_path`` (``train/a/x.png``)."""
    plain = dataclasses.replace(options, kfold=0, fold=None)
    parts, roots = [], set()
    for name in SPLITS:
        try:
            part = type(ds)(name, data_path, None, num_classes, options=plain)
        except UserError:
            if name == 'train':
                raise  # the tree needs its train folder in any case; its error says what is missing
            continue  # no val/ or test/ folder: the pool is what there is
        if part.root not in roots:  # a training/validation tree's test split is its val folder: counted once
            roots.add(part.root)
            parts.append(part)
    regression = ds.task_type == 'regression'
    samples = [s for p in parts for s in p.samples]
    targets = np.concatenate([p.targets for p in parts])
    strat = np.rint(targets).astype(np.int64)
    assigned = fold_assignment(strat, None, options)
    sel = np.flatnonzero(assigned == split)
    if sel.size == 0:
        raise UserError(f"{data_path}: fold {options.fold} of --kfold {options.kfold} leaves the {split} split empty "
                        f"(at least one image); pass a smaller --kfold or a larger --val_ratio")
    ds.root = data_path  # sample ids keep the split folder: train/a/x.png and test/a/x.png stay apart
    ds.samples = [samples[i] for i in sel]
    ds.targets = targets[sel].astype(np.float32 if regression else np.int64)
    if regression:
        ds.class_names = [str(g) for g in range(num_classes or int(np.rint(targets).max()) + 1)]
    else:
        ds.class_names = list(parts[0].class_names)
    folders = ', '.join(os.path.basename(p.root) + '/' for p in parts)
    ds.notes.append(_fold_note(data_path, options, assigned, f"the {len(samples)} images of {folders} pooled",
                               "one image per group", "images"))
    ds.notes.append(_no_patient_warning(data_path, "class folders carry none",
                                        "use a table with a patient column (image, label, patient_id)"))
