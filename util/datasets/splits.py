"""Splits of a table dataset: given by tables or a split column, or carved by a seeded stratified split.

``assign_splits`` decides, in this order:

1. a directory of tables: ``train.csv``/``val.csv``/``test.csv`` are the splits;
2. a split column (``--split_col``, or a column named ``split``): values train/val/test (also
   training/validation/valid/dev/testing, any case);
3. otherwise one seeded, stratified split of all rows by ``val_ratio``/``test_ratio``/``split_seed``.

With 1 or 2, a missing val split is carved from the train rows by ``val_ratio``; a missing test split
(or ``test_ratio`` 0 with 3) makes test = val, said in ``dataset.notes``. Carving (``stratified_assign``) is
stratified (class, grade, or for multi-label the label combination, rare combinations pooled by their
rarest label) and grouped (rows sharing a patient stay together); it depends only on the table and
the options, so every process and every separately built split sees the same assignment. Ratios count
groups.

The patient column is ``--patient_col`` or one found by name (``tables.find_patient_col``), for every table
format; the carve line in ``dataset.notes`` says ``grouped by patient column 'patient_id' (N patients)``.
A per-image table without one is carved image by image, so a patient's two eyes can land in train and test:
then one more note, starting ``warning:``, says so and how to keep each patient in one split.

References: sklearn ``model_selection.StratifiedShuffleSplit`` / ``GroupShuffleSplit`` (what the
stratified and grouped split aims at; the allocation here is largest-remainder per stratum); Sechidis
et al., "On the Stratification of Multi-Label Data", ECML PKDD 2011 (rare label sets).
"""
from __future__ import annotations

import math
import os
from collections import Counter

import numpy as np

from util.datasets.base import SPLITS, DataOptions
from util.datasets.tables import SPLIT_ALIASES, TableSource, find_split_col
from util.errors import UserError


def group_labels(labels: np.ndarray, gid: np.ndarray, num_groups: int) -> np.ndarray:
    """The label of each group (patient): a multi-label row is the union of its rows' labels, a single label
    the first row's (a patient's rows share it)."""
    if labels.ndim == 2:
        glab = np.zeros((num_groups, labels.shape[1]), dtype=np.float64)
        np.maximum.at(glab, gid, labels)
        return glab
    _, first_row = np.unique(gid, return_index=True)
    return np.asarray(labels, dtype=np.float64)[first_row]


def _stratum_keys(labels: np.ndarray, min_count: int) -> list:
    """Stratum of each group: its class/grade; multi-label: its label combination, combinations seen fewer
    than ``min_count`` times pooled by their rarest positive label (all-negative rare ones together)."""
    if labels.ndim == 1:
        return [int(v) for v in np.rint(labels)]
    combos = [tuple(np.flatnonzero(r > 0).tolist()) for r in labels]
    counts = Counter(combos)
    freq = labels.sum(0)
    keys = []
    for combo in combos:
        if counts[combo] >= min_count:
            keys.append(('set',) + combo)
        else:
            keys.append(('rare', min(combo, key=lambda j: (freq[j], j)) if combo else -1))
    return keys


def stratified_assign(labels: np.ndarray, groups: np.ndarray | None, fractions: dict[str, float],
                      seed: int) -> np.ndarray:
    """Split names ('train'/'val'/'test') for ``len(labels)`` rows, seeded, stratified and grouped.

    Rows of one group stay together; a group's label is its first row's (single-label/grade) or the union
    of its rows' labels (multi-label). Each split in ``fractions`` gets ``max(1, round(fraction * groups))``
    groups, spread over the strata by largest remainder (random tie-breaks), test first, then val.
    """
    n = len(labels)
    if groups is None:
        gid = np.arange(n)
    else:
        _, first, gid = np.unique(np.asarray(groups, dtype=str), return_index=True, return_inverse=True)
        gid = np.argsort(np.argsort(first))[gid]  # number groups by first appearance, not by name
    num_groups = int(gid.max()) + 1 if n else 0
    glab = group_labels(labels, gid, num_groups)
    min_count = math.ceil(1.0 / min(f for f in fractions.values() if f > 0))
    keys = _stratum_keys(glab, min_count)
    rng = np.random.default_rng(seed)
    strata: dict = {}
    for g in rng.permutation(num_groups):
        strata.setdefault(keys[g], []).append(int(g))
    remaining = [strata[k] for k in sorted(strata, key=str)]
    assigned = np.full(num_groups, 'train', dtype=object)
    for name in ('test', 'val'):
        frac = fractions.get(name, 0.0)
        if frac <= 0:
            continue
        want = max(1, int(round(frac * num_groups)))
        sizes = np.array([len(s) for s in remaining], dtype=np.float64)
        if sizes.sum() == 0:
            break
        want = min(want, int(sizes.sum()))
        expected = sizes * want / sizes.sum()
        take = np.floor(expected).astype(int)
        order = np.lexsort((rng.random(len(sizes)), -(expected - take)))
        take[order[:want - take.sum()]] += 1
        for stratum, k in zip(remaining, take):
            for g in stratum[:k]:
                assigned[g] = name
            del stratum[:k]
    return assigned[gid]


def assign_splits(src: TableSource, options: DataOptions, strat: np.ndarray, groups: np.ndarray | None,
                  patient_col: str | None = None) -> tuple[np.ndarray, bool, dict[str, list[str]]]:
    """The split of every row of ``src``; whether test is the val split; notes per split.

    ``groups``: the patient of each row (from ``patient_col``), or ``None`` when rows are images of unknown
    patients (carving then warns); ``groups`` without ``patient_col``: a paired table's one patient per row.
    """
    notes: dict[str, list[str]] = {s: [] for s in SPLITS}
    split_col = None if src.is_dir else find_split_col(src.frame, src.where, options)
    if src.is_dir:
        preset = src.preset.copy()
        test_reason = f'no test table in {src.where}'
        pool_name = os.path.basename(src.files['train'])
    elif split_col is not None:
        raw = src.frame[split_col].to_numpy()
        preset = np.array([SPLIT_ALIASES.get(v.strip().lower(), '?') for v in raw], dtype=object)
        bad = np.flatnonzero(preset == '?')
        if bad.size:
            raise UserError(f"{src.where}: split column {split_col!r} has values other than train/val/test at "
                            f"{src.rows_text(bad, raw[bad])} (train, val or test in every row; also training, "
                            f"validation); fix those cells")
        test_reason = f"no 'test' rows in column {split_col!r}"
        pool_name = f"the 'train' rows of {os.path.basename(src.where)}"
    else:
        preset = np.full(len(src.frame), '', dtype=object)
        test_reason = '--test_ratio 0'
        pool_name = os.path.basename(src.where)
    fractions: dict[str, float] = {}
    if not (preset != '').any():
        pool = np.ones(len(preset), dtype=bool)
        fractions = {'val': options.val_ratio, 'test': options.test_ratio}
        why_val = 'no split column'
    else:
        pool = preset == 'train'
        if not (preset == 'val').any():
            fractions = {'val': options.val_ratio}
        why_val = 'no val table' if src.is_dir else f"no 'val' rows in column {split_col!r}"
    if fractions:
        if fractions['val'] <= 0:
            raise UserError(f"{src.where}: the val split is empty ({why_val} and --val_ratio 0) (a val split to "
                            f"select the model on); pass --val_ratio 0.15 or provide the val rows")
        if not pool.any():
            raise UserError(f"{src.where}: no train rows to carve the val split from (rows with split 'train'); "
                            f"add train rows")
        pool_idx = np.flatnonzero(pool)
        carved = stratified_assign(strat[pool_idx], None if groups is None else groups[pool_idx], fractions,
                                   options.split_seed)
        preset[pool_idx] = carved
        counts = {s: int(((preset == s) & pool).sum()) for s in SPLITS}
        names = ' and '.join(s for s in ('val', 'test') if fractions.get(s, 0) > 0)
        ratios = ', '.join(f'--{s}_ratio {fractions[s]}' for s in ('val', 'test') if s in fractions)
        if patient_col is not None:
            grouped = f", grouped by patient column {patient_col!r} ({len(set(groups[pool_idx]))} patients)"
        elif groups is not None:
            grouped = ', one patient per row'
        else:
            grouped = ''
        line = (f"{src.where}: {names} carved from {pool_name} by a seeded stratified split ({ratios}, "
                f"--split_seed {options.split_seed}{grouped}): "
                + ', '.join(f'{s} {counts[s]}' for s in SPLITS if counts[s]) + ' rows')
        for s in SPLITS:
            notes[s].append(line)
        if groups is None:
            fix = 'add a split column' if split_col is None and not src.is_dir else 'give the val rows yourself'
            warning = (f"warning: {src.where}: no patient column (one named like patient_id/patient/subject, an ID "
                       f"with repeated values, or --patient_col), so the split is by image and images of one "
                       f"patient (e.g. the two eyes) may land in two splits; pass --patient_col NAME (or {fix}) "
                       f"to keep each patient in one split")
            for s in SPLITS:
                notes[s].append(warning)
    test_is_val = not (preset == 'test').any()
    if test_is_val:
        notes['test'].append(f"{src.where}: no test split ({test_reason}): the test split is the val split, so "
                             f"test scores are not independent of model selection")
    return preset, test_is_val, notes
