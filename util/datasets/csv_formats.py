"""Table datasets: the multi-label and grading table formats, and the table dataset base ODIR shares.

A table dataset is one table (``labels.csv``) or a directory with ``train.csv`` [+ ``val.csv``,
``test.csv``] (``.xlsx``/``.xls`` also read; ``tables.py``). Rows are validated as a whole when a
split is built, and every error names the file and the spreadsheet row numbers (header = row 1, first
data row = row 2).

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

Splits come from ``splits.py`` (``assign_splits``: tables, a split column, or a seeded stratified
split grouped by patient) and image paths are resolved by ``image_paths.py`` (relative to
``--image_root``, by default the table's folder or the subfolder holding the images).
"""
from __future__ import annotations

import abc
import os
from collections import Counter
from typing import Callable

import numpy as np
import pandas as pd

from util.datasets.base import DataOptions, RetinaDataset, has_table_layout, register_dataset_format, resolve_task
from util.datasets.folds import fold_splits
from util.datasets.image_paths import ImageResolver, clean_path, is_inside
from util.datasets.splits import assign_splits
from util.datasets.tables import (
    GRADE_NAMES,
    TableSource,
    check_sheet,
    explain_sheets,
    find_patient_col,
    find_split_col,
    guess_image_col,
    is_binary,
    is_table_file,
    norm,
    numbers,
    numeric_columns,
    paired_columns,
    read_table,
    require_column,
    table_files,
)
from util.errors import UserError

# ----------------------------------------------------------------------------- which table format

def _value_summary(df: pd.DataFrame, col: str) -> str:
    vals = sorted(set(df[col]) - {''}, key=lambda v: (len(v), v))
    return f"{col} ({', '.join(vals[:6])}{', ...' if len(vals) > 6 else ''})"


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
    with explain_sheets(lambda: [path], options.sheet):
        check_sheet(table_files(data_path).values(), options.sheet)
        return _kind_of(read_table(path, options.sheet), path, options)


def _kind_of(df: pd.DataFrame, path: str, options: DataOptions) -> str:
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
    if len(binary) >= 2 and not graded and options.task_type in ('single_label', 'regression'):
        # the 0/1 columns would be read as multi-label but for --task_type: that flag is the likely mistake
        what = 'grade' if options.task_type == 'regression' else 'class'
        others = [c for c in numeric if c not in binary]
        also = (f"; its other numeric columns: {', '.join(_value_summary(df, c) for c in others)}" if others else '')
        raise UserError(f"{path}: --task_type {options.task_type} needs a single numeric {what} column, but this "
                        f"table has {len(binary)} 0/1 label columns ({', '.join(binary)}) and no column named "
                        f"like a grade{also} (one integer {what} per image in one column, named like "
                        f"grade/level/diagnosis/label or given with --grade_col); the table "
                        f"{'looks' if others else 'is'} multi-label: drop --task_type {options.task_type} to "
                        f"train on its labels, or pass --grade_col <column> naming the {what} column")
    found = ', '.join(_value_summary(df, c) for c in numeric) if numeric else 'none'
    raise UserError(f"{path}: cannot tell the label columns (numeric columns found: {found}; expected two or more "
                    f"0/1 columns for multi-label data or one grade column); pass --label_cols a,b,c or "
                    f"--grade_col <column>")

# ----------------------------------------------------------------------------- the table dataset base

class TableDataset(RetinaDataset):
    """Base of the table formats. A subclass's ``_parse(src, options, num_classes)`` reads and validates the
    columns of all rows and sets ``task``, ``num_views``, ``class_names``, ``image_cols``,
    ``_row_paths`` (listed paths per row, one or two), ``_row_targets``, ``_strat`` (labels to stratify on),
    ``patient_col`` (``--patient_col`` or the column found by ``find_patient_col``, or ``None``) and
    ``_groups`` (patient of each row or ``None``); this class assigns splits, resolves the images of the
    split and checks them."""

    image_subfolders: tuple[str, ...] = ('images', 'Images', 'image', 'imgs', 'img')
    patient_col: str | None = None

    @classmethod
    def detect(cls, data_path: str, options: DataOptions | None = None) -> bool:
        return table_kind(data_path, options) == cls.format_name

    @classmethod
    def read_rows(cls, data_path: str, source: TableSource, options: DataOptions,
                  num_classes: int | None = None) -> TableDataset:
        """Every row of the table parsed and validated as the format reads it (``_row_paths``,
        ``_row_targets``, ``class_names``, ``task_type``, ...), with no splits and no image checks: a whole
        labelled table scored at once (``predict.py``)."""
        ds = cls.__new__(cls)
        RetinaDataset.__init__(ds, "test", data_path, None)
        ds.options = options
        ds._groups = None
        ds._parse(source, options, num_classes)
        return ds

    def __init__(self, split: str, data_path: str, transform: Callable | None, num_classes: int | None = None,
                 options: DataOptions | None = None):
        super().__init__(split, data_path, transform)
        options = options or DataOptions()
        self.options = options
        with explain_sheets(lambda: table_files(data_path).values(), options.sheet):
            src = self.source = TableSource(data_path, options.sheet)
            self.where = src.where
            self._groups = None
            self._parse(src, options, num_classes)
        assignment, self.test_is_val, notes = (fold_splits if options.kfold else assign_splits)(
            src, options, self._strat, self._groups, self.patient_col)
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
        try:
            resolver = ImageResolver(src.where, [p for paths in self._row_paths for p in paths if p],
                                     options.image_root, src.table_dir, self.image_subfolders)
        except UserError:
            # none found: paths leaving the folder are the better reason to give, when there are some
            self._check_inside(src, options, None)
            raise
        self._check_inside(src, options, resolver)
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

    def _check_inside(self, src: TableSource, options: DataOptions, resolver: ImageResolver | None) -> None:
        """Every listed path of the table (all splits) stays inside ``--image_root``, by default the table's
        folder, once symlinks and '..' are resolved; one error listing the rows that leave it."""
        if options.allow_outside_paths:
            return
        base = options.image_root or src.table_dir
        idx, paths = [], []
        for i, listed in enumerate(self._row_paths):
            for p in listed:
                if not p:
                    continue
                target = resolver.target(p) if resolver is not None else os.path.join(base, clean_path(p))
                if not is_inside(target, base):
                    idx.append(i)
                    paths.append(p)
        if not idx:
            return
        folder = (f"--image_root {options.image_root}" if options.image_root else
                  f"the table's folder {os.path.realpath(base)}")
        raise UserError(f"{src.where}: {len(idx)} image paths lead outside {folder} ({src.rows_text(idx, paths, 5)}) "
                        f"(every listed image inside {'--image_root' if options.image_root else 'the table folder'}"
                        f", with symlinks and '..' resolved); fix those paths, pass --image_root with the folder "
                        f"holding the images, or pass --allow_outside_paths if the table is trusted")

    @abc.abstractmethod
    def _parse(self, src: TableSource, options: DataOptions, num_classes: int | None) -> None:
        """Read and validate the columns of every row and set the attributes listed in the class docstring."""

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
        if self.task_type == 'multi_label':
            # a label never positive in training cannot be learnt, and pos_weight (negatives / positives)
            # would divide by zero: refuse rather than train a head that always says no
            total = self._row_targets.reshape(len(self._row_targets), -1).sum(0)
            detail = ', '.join(f'{n!r}: {int(total[self.class_names.index(n)])}' for n in empty)
            raise UserError(f"{self.where}: labels {empty} have no positive in the train split (positives in the "
                            f"whole table: {detail}) (at least one positive per label in train); add positive "
                            f"images, drop the label from --label_cols, or change --split_seed or the split column")
        kind = 'grades' if self.task_type == 'regression' else 'classes'
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


def _common_columns(src: TableSource, options: DataOptions) -> tuple[str | None, str | None, set, str]:
    """(split column, patient column, the columns that are neither image nor label, image column)."""
    split_col = find_split_col(src.frame, src.where, options)
    if options.patient_col:  # checked before the image column is guessed, which must not take it
        patient_col = find_patient_col(src.frame, src.where, options)
        image_col = _image_column(src, options, {c for c in (split_col, patient_col) if c})
    else:  # found by name among the columns that are not the image or split column
        image_col = _image_column(src, options, {split_col} - {None})
        patient_col = find_patient_col(src.frame, src.where, options, {split_col, image_col})
    exclude = {c for c in (split_col, patient_col) if c}
    return split_col, patient_col, exclude, image_col


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

    def _parse(self, src: TableSource, options: DataOptions, num_classes: int | None) -> None:
        self.task_type = resolve_task(src.where, 'csv_multilabel', 'multi_label', ('multi_label',), options.task_type)
        df = src.frame
        split_col, patient_col, exclude, image_col = _common_columns(src, options)
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
        if num_classes is not None and num_classes != len(label_cols):
            raise UserError(f"{src.where}: {len(label_cols)} label columns {label_cols} but --nb_classes "
                            f"{num_classes}; pass --nb_classes {len(label_cols)} or choose the columns with "
                            f"--label_cols")
        src.check_filled(image_col, '--image_col', 'image path')
        y = src.binary_labels(label_cols)
        src.check_duplicates([image_col])
        self.image_cols = [image_col]
        self.class_names = list(label_cols)
        self._row_paths = [(p,) for p in df[image_col].to_numpy()]
        self._row_targets = y
        self._strat = y
        self.patient_col = patient_col
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
    ``num_classes`` or the largest grade in the table + 1 (so every split has the same class names).
    Task regression (float32 grade targets) unless ``task_type='single_label'`` (int64)."""

    def _parse(self, src: TableSource, options: DataOptions, num_classes: int | None) -> None:
        self.task_type = resolve_task(src.where, 'csv_grading', 'regression', ('regression', 'single_label'),
                                 options.task_type)
        df = src.frame
        split_col, patient_col, exclude, image_col = _common_columns(src, options)
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
        if num_classes is not None and top >= num_classes:
            bad = np.flatnonzero(grades >= num_classes)
            raise UserError(f"{src.where}: grade column {grade_col!r}: {bad.size} grades not below --nb_classes "
                            f"{num_classes} at {src.rows_text(bad, raw[bad])} (grades 0..{num_classes - 1}); pass "
                            f"--nb_classes {top + 1} or fix those cells")
        src.check_filled(image_col, '--image_col', 'image path')
        src.check_duplicates([image_col])
        self.image_cols = [image_col]
        self.grade_col = grade_col
        self.class_names = [str(g) for g in range(num_classes or top + 1)]
        self._row_paths = [(p,) for p in df[image_col].to_numpy()]
        self._row_targets = grades.astype(np.float32) if self.task_type == 'regression' else grades
        self._strat = grades
        self.patient_col = patient_col
        self._groups = _patient_groups(src, patient_col)
