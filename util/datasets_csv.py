"""Table datasets: multi-label and grading tables (.csv/.xlsx), and the table machinery the ODIR format shares.

A table dataset is one table (``labels.csv``) or a directory with ``train.csv`` [+ ``val.csv``,
``test.csv``] (``.xlsx``/``.xls`` also read). Rows are validated as a whole when a split is built, and
every error names the file and the spreadsheet row numbers (header = row 1, first data row = row 2).

Formats registered here:

- ``csv_multilabel``: an image-path column + one 0/1 column per label (the multi-label seed's
  ``Image_File, cataract, glaucoma, diabetic_retinopathy, normal_fundus`` works with no options).
- ``csv_grading``: an image-path column + one integer grade column; task ``regression`` (float32
  grades) or, with ``task_type='single_label'``, classification of the grades (int64).

Which table format a path is (``table_kind``): left/right image columns (``--left_col``/``--right_col``,
ODIR's ``Left-Fundus``/``Right-Fundus``, or columns named like ``left_image``/``right_eye``) -> ``odir``;
else ``--label_cols`` -> csv_multilabel, ``--grade_col`` -> csv_grading; else by the numeric label
columns found (id/age/sex/patient/split/image columns excluded): exactly one -> csv_grading, two or more
of which at least two are 0/1 -> csv_multilabel, else the one named like a grade -> csv_grading, else an
error asking for ``--label_cols`` or ``--grade_col``. ``--task_type`` breaks ties (multi_label picks
csv_multilabel; single_label/regression stop 0/1 columns from meaning multi-label).

Splits (``assign_splits``), in this order:

1. a directory of tables: ``train.csv``/``val.csv``/``test.csv`` are the splits;
2. a split column (``--split_col``, or a column named ``split``): values train/val/test (also
   training/validation/valid/dev/testing, any case);
3. otherwise one seeded, stratified split of all rows by ``val_ratio``/``test_ratio``/``split_seed``.

With 1 or 2, a missing val split is carved from the train rows by ``val_ratio``; a missing test split
(or ``test_ratio`` 0 with 3) makes test = val, said in ``dataset.notes``. Carving is stratified (class,
grade, or for multi-label the label combination, rare combinations pooled by their rarest label) and
grouped (rows sharing ``--patient_col`` stay together); it depends only on the table and the options,
so every process and every separately built split sees the same assignment. Ratios count groups.

Image paths are relative to ``--image_root`` (default: the table's folder, or the one of its
subfolders holding the listed images); a path without extension is tried with the usual ones
(APTOS ``id_code`` columns).

References: sklearn ``model_selection.StratifiedShuffleSplit`` / ``GroupShuffleSplit`` (what the
stratified and grouped split aims at; the allocation here is largest-remainder per stratum); Sechidis
et al., "On the Stratification of Multi-Label Data", ECML PKDD 2011 (rare label sets).
"""
from __future__ import annotations

import functools
import math
import os
import re
from collections import Counter
from typing import Callable

import numpy as np
import pandas as pd

from util.datasets import (IMG_EXTENSIONS, SPLITS, DataOptions, RetinaDataset, has_table_layout,
                           register_dataset_format, resolve_task)
from util.errors import UserError, close_matches

TABLE_EXTENSIONS = ('.csv', '.xlsx', '.xls')

# column names are compared in normalised form: lower case, letters and digits only
IMAGE_NAMES = ('imagefile', 'image', 'imagepath', 'imagename', 'imagefilename', 'filename', 'file', 'filepath',
               'path', 'img', 'imageid', 'idcode', 'fname')
SPLIT_NAMES = ('split', 'subset', 'partition', 'set')
PATIENT_NAMES = ('patientid', 'patient', 'id', 'subjectid', 'subject')
GRADE_NAMES = ('grade', 'level', 'diagnosis', 'label', 'drgrade', 'drlevel', 'dr', 'class', 'target', 'severity')
META_NAMES = set(PATIENT_NAMES) | {'age', 'patientage', 'sex', 'patientsex', 'gender', 'eye', 'laterality', 'side',
                                   'index', 'fold', 'year', 'width', 'height'}
SPLIT_ALIASES = {'train': 'train', 'training': 'train', 'val': 'val', 'valid': 'val', 'validation': 'val',
                 'dev': 'val', 'test': 'test', 'testing': 'test'}


def norm(name: str) -> str:
    return re.sub(r'[^a-z0-9]', '', str(name).lower())


def _is_meta(column: str) -> bool:
    n = norm(column)
    return n in META_NAMES or n.startswith('unnamed')


# ----------------------------------------------------------------------------- reading tables

def is_table_file(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(TABLE_EXTENSIONS)


def table_files(data_path: str) -> dict[str | None, str]:
    """``{split: path}`` for a directory of tables, ``{None: path}`` for a single table."""
    if not os.path.isdir(data_path):
        return {None: data_path}
    found = {}
    for split in SPLITS:
        for ext in TABLE_EXTENSIONS:
            path = os.path.join(data_path, split + ext)
            if os.path.isfile(path):
                found[split] = path
                break
    return found


def _cell_text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ''
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


@functools.lru_cache(maxsize=8)
def _read_table_cached(path: str, mtime_ns: int, size: int) -> pd.DataFrame:
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == '.csv':
            df = None
            for encoding in ('utf-8-sig', 'latin-1'):
                try:
                    df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], skip_blank_lines=False,
                                     encoding=encoding)
                    break
                except UnicodeDecodeError:
                    continue
            if df.shape[1] == 1:  # a ';' or tab separated export
                for sep in (';', '\t'):
                    if sep in str(df.columns[0]):
                        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[],
                                         skip_blank_lines=False, sep=sep, encoding=encoding)
                        break
        else:
            df = pd.read_excel(path, dtype=object, sheet_name=0)
    except ImportError as err:
        raise UserError(f"{path}: cannot read {ext} files ({err}) (openpyxl for .xlsx, xlrd for .xls); install "
                        f"the package or save the table as .csv") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError, KeyError) as err:
        raise UserError(f"{path}: cannot read the table ({type(err).__name__}: {err}) (a .csv, .xlsx or .xls "
                        f"table with a header row); check the file") from None
    df.columns = [str(c).strip() for c in df.columns]
    df = df.apply(lambda col: col.map(_cell_text))
    # keep the original index: it gives the spreadsheet row of every remaining row
    return df[(df != '').any(axis=1)]


def read_table(path: str) -> pd.DataFrame:
    """The table at ``path`` as strings ('' for blank cells), blank rows dropped, index = data row (0-based)."""
    st = os.stat(path)
    return _read_table_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size).copy()


def numbers(series: pd.Series) -> np.ndarray:
    """Cells as float64, NaN where blank or not a number."""
    return pd.to_numeric(series.where(series != ''), errors='coerce').to_numpy(dtype=np.float64)


def is_numeric_like(series: pd.Series) -> bool:
    """Most non-blank cells are numbers (a label column with a typo still counts)."""
    filled = (series != '').to_numpy()
    return bool(filled.any()) and np.isfinite(numbers(series)[filled]).mean() >= 0.5


def is_binary(series: pd.Series) -> bool:
    vals = numbers(series[series != ''])
    return vals.size > 0 and bool(np.isin(vals, (0.0, 1.0)).all())


def find_split_col(df: pd.DataFrame, where: str, options: DataOptions) -> str | None:
    """``--split_col``, or a column named ``split`` (``subset``/``partition``/``set`` when every value is a split)."""
    if options.split_col:
        return require_column(df, where, options.split_col, '--split_col')
    for col in df.columns:
        if norm(col) == 'split':
            return col
    for col in df.columns:
        values = set(df[col].str.lower()) - {''}
        if norm(col) in SPLIT_NAMES and values and values <= set(SPLIT_ALIASES):
            return col
    return None


def missing_column_error(where: str, name: str, columns, flag: str) -> UserError:
    columns = list(columns)
    near = close_matches(name, columns)
    hint = f"; did you mean {', '.join(repr(c) for c in near)}?" if near else ''
    return UserError(f"{where}: column {name!r} not found (columns found: {', '.join(columns)}{hint}); "
                     f"pass {flag} with one of those columns")


def require_column(df: pd.DataFrame, where: str, name: str, flag: str) -> str:
    if name not in df.columns:
        raise missing_column_error(where, name, df.columns, flag)
    return name


def guess_image_col(df: pd.DataFrame, where: str, exclude: set) -> str:
    """A column named like Image_File/image/filename/path, else the single text column."""
    cols = [c for c in df.columns if c not in exclude]
    by_norm = {norm(c): c for c in cols}
    for name in IMAGE_NAMES:
        if name in by_norm:
            return by_norm[name]
    text = [c for c in cols if not _is_meta(c) and not is_numeric_like(df[c])]
    if len(text) == 1:
        return text[0]
    found = f"text columns {', '.join(text)}" if text else 'no text column'
    pairs = ' (or --left_col and --right_col for a table of left/right eye pairs)' if len(text) > 1 else ''
    raise UserError(f"{where}: cannot tell which column holds the image paths ({found}; expected one named "
                    f"like Image_File/image/filename/path, or a single text column); pass --image_col{pairs}")


def numeric_columns(df: pd.DataFrame, exclude: set) -> list[str]:
    """Candidate label/grade columns, in file order: numeric cells, not an id/age/sex/patient/image column."""
    return [c for c in df.columns if c not in exclude and not _is_meta(c) and norm(c) not in IMAGE_NAMES
            and is_numeric_like(df[c])]


def _value_summary(df: pd.DataFrame, col: str) -> str:
    vals = sorted(set(df[col]) - {''}, key=lambda v: (len(v), v))
    return f"{col} ({', '.join(vals[:6])}{', ...' if len(vals) > 6 else ''})"


LEFT_RIGHT_SUFFIXES = ('', 'eye', 'image', 'img', 'fundus', 'path', 'file', 'filename', 'imagefile', 'imagepath',
                       'eyeimage', 'fundusimage', 'imagename')


def _side_stem(column: str, side: str) -> str | None:
    n = norm(column)
    if n.startswith(side):
        return n[len(side):]
    if n.endswith(side):
        return n[:-len(side)]
    return None


def paired_columns(df: pd.DataFrame) -> tuple[str | None, str | None]:
    """The left/right image columns of a paired table (ODIR's Left-Fundus/Right-Fundus, left_image, ...)."""
    found = {}
    for side in ('left', 'right'):
        for col in df.columns:
            stem = _side_stem(col, side)
            if stem is not None and stem in LEFT_RIGHT_SUFFIXES and not is_numeric_like(df[col]):
                found[side] = col
                break
    if len(found) == 2:
        return found['left'], found['right']
    return None, None


def table_kind(data_path: str, options: DataOptions | None = None) -> str | None:
    """'odir', 'csv_multilabel' or 'csv_grading' for a table (or a directory with train.csv); ``None`` when
    ``data_path`` is no table. Raises ``UserError`` for a table whose columns fit none or several."""
    options = options or DataOptions()
    if os.path.isdir(data_path):
        if not has_table_layout(data_path):
            return None
        path = table_files(data_path)['train']
    elif is_table_file(data_path):
        path = data_path
    else:
        return None
    df = read_table(path)
    if options.left_col or options.right_col or paired_columns(df)[0] is not None:
        return 'odir'
    if options.label_cols and options.grade_col:
        raise UserError(f"{path}: both --label_cols and --grade_col given (one of them: label columns for "
                        f"multi-label data, a grade column for grading); drop one")
    if options.label_cols:
        return 'csv_multilabel'
    if options.grade_col:
        return 'csv_grading'
    exclude = {c for c in (options.image_col, options.patient_col, find_split_col(df, path, options)) if c}
    numeric = numeric_columns(df, exclude)
    binary = [c for c in numeric if is_binary(df[c])]
    graded = [c for c in numeric if norm(c) in GRADE_NAMES]
    if options.task_type == 'multi_label' and numeric:
        return 'csv_multilabel'
    if len(numeric) == 1:
        return 'csv_grading'
    if len(binary) >= 2 and options.task_type not in ('single_label', 'regression'):
        return 'csv_multilabel'
    if len(graded) == 1:
        return 'csv_grading'
    found = ', '.join(_value_summary(df, c) for c in numeric) if numeric else 'none'
    raise UserError(f"{path}: cannot tell the label columns (numeric columns found: {found}; expected two or more "
                    f"0/1 columns for multi-label data or one grade column); pass --label_cols a,b,c or "
                    f"--grade_col <column>")


# ----------------------------------------------------------------------------- rows of one or several tables

class TableSource:
    """All rows of a table dataset as one frame of strings, with each row's file and spreadsheet row."""

    def __init__(self, data_path: str):
        self.data_path = data_path
        self.files = table_files(data_path)
        self.is_dir = os.path.isdir(data_path)
        if self.is_dir and 'train' not in self.files:
            raise UserError(f"{data_path}: no train table (train.csv, train.xlsx or train.xls in the directory); "
                            f"add it or point --data_path at the table")
        self.where = data_path
        self.table_dir = data_path if self.is_dir else (os.path.dirname(data_path) or '.')
        frames, files, rows, preset = [], [], [], []
        columns = None
        for split, path in self.files.items():
            df = read_table(path)
            if columns is None:
                columns, first = list(df.columns), path
            elif set(df.columns) != set(columns):
                raise UserError(f"{path}: columns differ from {first} (missing: "
                                f"{sorted(set(columns) - set(df.columns))}, extra: "
                                f"{sorted(set(df.columns) - set(columns))}) (the same columns in every split "
                                f"table); make the headers match")
            frames.append(df[columns])
            files += [path] * len(df)
            rows.append(df.index.to_numpy() + 2)
            preset += [split or ''] * len(df)
        self.frame = pd.concat(frames, ignore_index=True)
        self.file = np.asarray(files, dtype=object)
        self.row = np.concatenate(rows).astype(np.int64)
        self.preset = np.asarray(preset, dtype=object)
        if len(self.frame) == 0:
            raise UserError(f"{data_path}: the table has no data rows (a header row and one row per image); "
                            f"fill the table")

    def rows_text(self, idx, values=None, limit: int = 8) -> str:
        """'rows 4 ('2'), 9 (blank) and 3 more' (per file for a directory: 'train.csv rows 4; val.csv row 2')."""
        idx = list(idx)
        shown, more = idx[:limit], len(idx) - limit
        parts: dict[str, list[str]] = {}
        for j, i in enumerate(shown):
            item = str(self.row[i])
            if values is not None:
                v = values[j]
                item += ' (blank)' if v == '' else f' ({v!r})'
            parts.setdefault(os.path.basename(self.file[i]) if self.is_dir else '', []).append(item)
        text = '; '.join(f"{(name + ' ') if name else ''}row{'s' if len(items) > 1 else ''} {', '.join(items)}"
                         for name, items in parts.items())
        return text + (f' and {more} more' if more > 0 else '')

    def check_filled(self, col: str, flag: str, what: str) -> None:
        blank = np.flatnonzero((self.frame[col] == '').to_numpy())
        if blank.size:
            raise UserError(f"{self.where}: {blank.size} blank {what} cells in column {col!r} at "
                            f"{self.rows_text(blank)} (a {what} in every row); fill them or delete those rows")

    def binary_labels(self, cols: list[str], flag: str = '--label_cols') -> np.ndarray:
        """The 0/1 cells of ``cols`` as float32 [N, len(cols)]; one error listing every bad cell."""
        out = np.zeros((len(self.frame), len(cols)), dtype=np.float32)
        problems, hints = [], []
        for j, col in enumerate(cols):
            vals = numbers(self.frame[col])
            bad = np.flatnonzero(~np.isin(vals, (0.0, 1.0)))
            if bad.size:
                problems.append(f"column {col!r} at {self.rows_text(bad, self.frame[col].to_numpy()[bad])}")
                finite = vals[np.isfinite(vals)]
                if finite.size and np.all(finite == np.round(finite)) and (finite > 1).mean() >= 0.1:
                    hints.append(f"if {col!r} is a grade, pass --grade_col {col}")
            out[:, j] = np.where(np.isfinite(vals), vals, 0)
        if problems:
            hint = ('; ' + '; '.join(hints)) if hints else ''
            raise UserError(f"{self.where}: label cells outside {{0, 1}}: {'; '.join(problems)} (each label cell 0 "
                            f"or 1, blank cells included); fix those cells or choose other columns with "
                            f"{flag}{hint}")
        return out

    def check_duplicates(self, cols: list[str]) -> None:
        """No image path listed twice (across ``cols``, e.g. left and right eye columns)."""
        seen: dict[str, list[tuple[int, str]]] = {}
        for col in cols:
            for i, p in enumerate(self.frame[col].to_numpy()):
                if p:
                    seen.setdefault(clean_path(p), []).append((i, col))
        dups = [(p, hits) for p, hits in seen.items() if len(hits) > 1]
        if dups:
            def where(hits):
                return ', '.join(f"{self.rows_text([i])}" + (f' ({c})' if len(cols) > 1 else '') for i, c in hits)
            listing = '; '.join(f"{p!r} at {where(hits)}" for p, hits in dups[:5])
            more = f' and {len(dups) - 5} more' if len(dups) > 5 else ''
            raise UserError(f"{self.where}: {len(dups)} image paths listed more than once: {listing}{more} (each "
                            f"image once); remove the duplicate rows")


def clean_path(listed: str) -> str:
    return listed.strip().replace('\\', '/')


# ----------------------------------------------------------------------------- splits

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
    if labels.ndim == 2:
        glab = np.zeros((num_groups, labels.shape[1]), dtype=np.float64)
        np.maximum.at(glab, gid, labels)
    else:
        _, first_row = np.unique(gid, return_index=True)
        glab = np.asarray(labels, dtype=np.float64)[first_row]
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
                  unit: str = 'rows') -> tuple[np.ndarray, bool, dict[str, list[str]]]:
    """The split of every row of ``src``; whether test is the val split; notes per split."""
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
        grouped = f', grouped by {unit}' if groups is not None else ''
        line = (f"{src.where}: {names} carved from {pool_name} by a seeded stratified split ({ratios}, "
                f"--split_seed {options.split_seed}{grouped}): "
                + ', '.join(f'{s} {counts[s]}' for s in SPLITS if counts[s]) + ' rows')
        for s in SPLITS:
            notes[s].append(line)
    test_is_val = not (preset == 'test').any()
    if test_is_val:
        notes['test'].append(f"{src.where}: no test split ({test_reason}): the test split is the val split, so "
                             f"test scores are not independent of model selection")
    return preset, test_is_val, notes


# ----------------------------------------------------------------------------- image paths

def _has_image_ext(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)


_EXTENSION_TRIALS = tuple(e for ext in IMG_EXTENSIONS for e in (ext, ext.upper()))


class ImageResolver:
    """Finds the folder the listed paths are relative to and turns listed paths into files."""

    def __init__(self, where: str, listed: list[str], image_root: str | None, table_dir: str,
                 subfolders: tuple[str, ...] = ()):
        probe = [clean_path(p) for p in listed if p][:30]
        roots = [image_root] if image_root else self.candidates(table_dir, subfolders)
        best, best_hits, suffix = roots[0], -1, ''
        for root in roots:
            hits, found_suffix = 0, ''
            for p in probe:
                s = self._match(root, p, _EXTENSION_TRIALS)
                if s is not None:
                    hits += 1
                    found_suffix = found_suffix or s
            if hits > best_hits:
                best, best_hits, suffix = root, hits, found_suffix
        if probe and best_hits == 0:
            looked = ', '.join(roots[:8]) + (f' and {len(roots) - 8} more folders' if len(roots) > 8 else '')
            raise UserError(f"{where}: none of the first {len(probe)} listed images found (e.g. {probe[0]!r}); "
                            f"looked under {looked} (image paths relative to --image_root, by default the "
                            f"table's folder or one of its subfolders); pass --image_root with the folder "
                            f"holding the images")
        self.root, self.suffix = best, suffix

    @staticmethod
    def candidates(table_dir: str, subfolders: tuple[str, ...]) -> list[str]:
        roots = [table_dir]
        roots += [os.path.join(table_dir, s) for s in subfolders if os.path.isdir(os.path.join(table_dir, s))]
        try:
            subs = sorted(e.path for e in os.scandir(table_dir) if e.is_dir() and not e.name.startswith('.'))
        except OSError:
            subs = []
        for sub in subs:
            roots.append(sub)
            try:
                roots += sorted(e.path for e in os.scandir(sub) if e.is_dir() and not e.name.startswith('.'))
            except OSError:
                pass
        seen, out = set(), []
        for r in roots:
            key = os.path.normpath(r)
            if key not in seen:
                seen.add(key)
                out.append(r)
        return out[:60]

    @staticmethod
    def _match(root: str, listed: str, trials: tuple[str, ...]) -> str | None:
        path = listed if os.path.isabs(listed) else os.path.join(root, listed)
        if os.path.isfile(path):
            return ''
        if not _has_image_ext(listed):
            for ext in trials:
                if os.path.isfile(path + ext):
                    return ext
        return None

    def resolve(self, listed: str) -> str | None:
        """The file of a listed path, ``None`` when absent."""
        listed = clean_path(listed)
        s = self._match(self.root, listed, (self.suffix,) if self.suffix else ())
        if s is None:
            return None
        path = listed if os.path.isabs(listed) else os.path.join(self.root, listed)
        return path + s


# ----------------------------------------------------------------------------- the table dataset base

class TableDataset(RetinaDataset):
    """Base of the table formats. A subclass's ``_parse(src, options, nb_classes)`` reads and validates the
    columns of all rows and sets ``task``, ``num_views``, ``class_names``, ``image_cols``,
    ``_row_paths`` (listed paths per row, one or two), ``_row_targets``, ``_strat`` (labels to stratify on)
    and ``_groups`` (patient of each row or ``None``); this class assigns splits, resolves the images of the
    split and checks them."""

    image_subfolders: tuple[str, ...] = ('images', 'Images', 'image', 'imgs', 'img')
    unit = 'rows'

    @classmethod
    def detect(cls, data_path: str, options: DataOptions | None = None) -> bool:
        return table_kind(data_path, options) == cls.format_name

    def __init__(self, split: str, data_path: str, transform: Callable | None, nb_classes: int | None = None,
                 options: DataOptions | None = None):
        super().__init__(split, data_path, transform)
        options = options or DataOptions()
        self.options = options
        src = self.source = TableSource(data_path)
        self.where = src.where
        self._groups = None
        self._parse(src, options, nb_classes)
        assignment, self.test_is_val, notes = assign_splits(src, options, self._strat, self._groups, self.unit)
        self.notes += notes[split]
        self._check_groups(assignment)
        wanted = 'val' if split == 'test' and self.test_is_val else split
        sel = np.flatnonzero(assignment == wanted)
        if sel.size == 0:
            raise UserError(f"{src.where}: the {split} split is empty (at least one row); add rows to it or change "
                            f"--val_ratio/--test_ratio")
        listed, targets, rows = self._samples(sel)
        if not listed:
            raise UserError(f"{src.where}: the {split} split has no images (at least one listed image); add rows")
        resolver = ImageResolver(src.where, [p for paths in self._row_paths for p in paths if p],
                                 options.image_root, src.table_dir, self.image_subfolders)
        self.image_root = resolver.root
        samples, missing, missing_paths = [], [], []
        for paths, r in zip(listed, rows):
            files = [resolver.resolve(p) for p in paths]
            for p, f in zip(paths, files):
                if f is None:
                    missing.append(r)
                    missing_paths.append(p)
            samples.append(files[0] if len(files) == 1 else tuple(files))
        if missing:
            cols = ', '.join(repr(c) for c in self.image_cols)
            raise UserError(f"{src.where}: {len(missing)} of {sum(len(p) for p in listed)} images of the {split} "
                            f"split not found under {resolver.root} ({src.rows_text(missing, missing_paths)}) "
                            f"(every listed image present); fix the paths in column {cols}, restore the files, "
                            f"or pass --image_root")
        self.samples = samples
        self.listed = listed
        self.rows = src.row[np.asarray(rows, dtype=np.int64)]
        self.targets = targets
        if split == 'train':
            self._check_train_labels()

    def _parse(self, src: TableSource, options: DataOptions, nb_classes: int | None) -> None:
        raise NotImplementedError

    def _samples(self, sel: np.ndarray) -> tuple[list[tuple[str, ...]], np.ndarray, list[int]]:
        """Listed paths, targets and source row index of each sample of the selected rows."""
        return [self._row_paths[i] for i in sel], self._row_targets[sel], list(sel)

    def _check_groups(self, assignment: np.ndarray) -> None:
        """Given splits (a split column or tables) may put one patient in two splits: say so."""
        if self._groups is None:
            return
        splits_of: dict[str, set] = {}
        for g, s in zip(self._groups, assignment):
            splits_of.setdefault(g, set()).add(s)
        leaked = [g for g, s in splits_of.items() if len(s) > 1]
        if leaked:
            self.notes.append(f"{self.where}: {len(leaked)} patients are in more than one split (e.g. "
                              f"{', '.join(map(repr, leaked[:5]))}): their images leak between splits; give all "
                              f"rows of a patient the same split")

    def _check_train_labels(self) -> None:
        counts = self.class_counts()
        empty = [n for n, c in zip(self.class_names, counts) if c == 0]
        if not empty:
            return
        if self.task == 'multi_label':
            # a label never positive in training cannot be learnt, and pos_weight (negatives / positives)
            # would divide by zero: refuse rather than train a head that always says no
            total = self._row_targets.reshape(len(self._row_targets), -1).sum(0)
            detail = ', '.join(f'{n!r}: {int(total[self.class_names.index(n)])}' for n in empty)
            raise UserError(f"{self.where}: labels {empty} have no positive in the train split (positives in the "
                            f"whole table: {detail}) (at least one positive per label in train); add positive "
                            f"images, drop the label from --label_cols, or change --split_seed or the split column")
        kind = 'grades' if self.task == 'regression' else 'classes'
        self.notes.append(f"{self.where}: the train split has no images of {kind} {empty}; the model will not "
                          f"learn them")

    def load_image(self, index: int):
        sample = self.samples[index]
        if isinstance(sample, tuple):
            return [self.read(p) for p in sample]
        return self.read(sample)

    def sample_id(self, index: int) -> str:
        return '|'.join(clean_path(p) for p in self.listed[index])


def _patient_groups(src: TableSource, col: str | None) -> np.ndarray | None:
    if col is None:
        return None
    vals = src.frame[col].to_numpy().astype(str)
    # a blank patient cell is a patient of its own
    return np.array([v if v else f'<blank patient, row {i}>' for i, v in enumerate(vals)], dtype=object)


def _image_column(src: TableSource, options: DataOptions, exclude: set) -> str:
    if options.image_col:
        return require_column(src.frame, src.where, options.image_col, '--image_col')
    return guess_image_col(src.frame, src.where, exclude)


@register_dataset_format('csv_multilabel')
class MultiLabelCsvDataset(TableDataset):
    """An image column + one 0/1 column per label. Columns: ``--image_col`` (default: a column named like
    Image_File/image/filename/path, else the single text column) and ``--label_cols`` (default: the other
    numeric columns, in file order, except id/age/sex/patient/split ones). Task multi_label: targets
    float32 [N, L]; class names = label column names."""

    def _parse(self, src: TableSource, options: DataOptions, nb_classes: int | None) -> None:
        self.task = resolve_task(src.where, 'csv_multilabel', 'multi_label', ('multi_label',), options.task_type)
        df = src.frame
        split_col = find_split_col(df, src.where, options)
        patient_col = options.patient_col and require_column(df, src.where, options.patient_col, '--patient_col')
        exclude = {c for c in (split_col, patient_col) if c}
        image_col = _image_column(src, options, exclude)
        if options.label_cols:
            label_cols = [require_column(df, src.where, c, '--label_cols') for c in options.label_cols]
            dup = sorted(c for c, k in Counter(label_cols).items() if k > 1)
            if dup:
                raise UserError(f"--label_cols: {dup} given twice (each label column once); drop the repeats")
        else:
            label_cols = numeric_columns(df, exclude | {image_col})
            if not label_cols:
                raise UserError(f"{src.where}: no label columns (0/1 columns besides the image column "
                                f"{image_col!r}; columns found: {', '.join(df.columns)}); pass --label_cols")
        if nb_classes is not None and nb_classes != len(label_cols):
            raise UserError(f"{src.where}: {len(label_cols)} label columns {label_cols} but --nb_classes "
                            f"{nb_classes}; pass --nb_classes {len(label_cols)} or choose the columns with "
                            f"--label_cols")
        src.check_filled(image_col, '--image_col', 'image path')
        y = src.binary_labels(label_cols)
        src.check_duplicates([image_col])
        self.image_cols = [image_col]
        self.class_names = list(label_cols)
        self._row_paths = [(p,) for p in df[image_col].to_numpy()]
        self._row_targets = y
        self._strat = y
        self._groups = _patient_groups(src, patient_col)


def guess_grade_col(df: pd.DataFrame, where: str, exclude: set) -> str:
    numeric = numeric_columns(df, exclude)
    graded = [c for c in numeric if norm(c) in GRADE_NAMES]
    if len(graded) == 1:
        return graded[0]
    if len(numeric) == 1:
        return numeric[0]
    found = ', '.join(_value_summary(df, c) for c in numeric) if numeric else 'none'
    raise UserError(f"{where}: cannot tell the grade column (numeric columns: {found}; expected one named like "
                    f"grade/level/diagnosis/label, or a single numeric column); pass --grade_col")


@register_dataset_format('csv_grading')
class GradingCsvDataset(TableDataset):
    """An image column + an integer grade column (``--grade_col``; default: the numeric column named like
    grade/level/diagnosis/label, else the single numeric column). Grades are integers 0..G-1, G =
    ``nb_classes`` or the largest grade in the table + 1 (so every split has the same class names).
    Task regression (float32 grade targets) unless ``task_type='single_label'`` (int64)."""

    def _parse(self, src: TableSource, options: DataOptions, nb_classes: int | None) -> None:
        self.task = resolve_task(src.where, 'csv_grading', 'regression', ('regression', 'single_label'),
                                 options.task_type)
        df = src.frame
        split_col = find_split_col(df, src.where, options)
        patient_col = options.patient_col and require_column(df, src.where, options.patient_col, '--patient_col')
        exclude = {c for c in (split_col, patient_col) if c}
        image_col = _image_column(src, options, exclude)
        if options.grade_col:
            grade_col = require_column(df, src.where, options.grade_col, '--grade_col')
        else:
            grade_col = guess_grade_col(df, src.where, exclude | {image_col})
        raw = df[grade_col].to_numpy()
        vals = numbers(df[grade_col])
        checks = (
            (~np.isfinite(vals), 'not a number'),
            (np.isfinite(vals) & (vals != np.round(vals)), 'not an integer'),
            (np.isfinite(vals) & (vals < 0), 'negative'),
        )
        for mask, what in checks:
            bad = np.flatnonzero(mask)
            if bad.size:
                raise UserError(f"{src.where}: grade column {grade_col!r}: {bad.size} cells {what} at "
                                f"{src.rows_text(bad, raw[bad])} (integer grades 0, 1, 2, ...); fix those cells "
                                f"or choose the column with --grade_col")
        grades = vals.astype(np.int64)
        top = int(grades.max())
        if nb_classes is not None and top >= nb_classes:
            bad = np.flatnonzero(grades >= nb_classes)
            raise UserError(f"{src.where}: grade column {grade_col!r}: {bad.size} grades not below --nb_classes "
                            f"{nb_classes} at {src.rows_text(bad, raw[bad])} (grades 0..{nb_classes - 1}); pass "
                            f"--nb_classes {top + 1} or fix those cells")
        src.check_filled(image_col, '--image_col', 'image path')
        src.check_duplicates([image_col])
        self.image_cols = [image_col]
        self.grade_col = grade_col
        self.class_names = [str(g) for g in range(nb_classes or top + 1)]
        self._row_paths = [(p,) for p in df[image_col].to_numpy()]
        self._row_targets = grades.astype(np.float32) if self.task == 'regression' else grades
        self._strat = grades
        self._groups = _patient_groups(src, patient_col)


# registers 'odir' (it imports this module at its top; see the end of util/datasets.py)
import util.datasets_odir  # noqa: E402,F401
