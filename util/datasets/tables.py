"""Reading the tables of the table formats: cells, column roles, and the rows of a whole dataset.

A table is a ``.csv`` (UTF-8 or Latin-1; ``,``, ``;`` or tab separated), ``.xlsx`` or ``.xls`` file with a
header row (a workbook's first sheet, or the sheet named by ``--sheet``); a dataset is one table or a
directory with ``train.csv`` [+ ``val.csv``, ``test.csv``]. Cells are read as strings ('' for blank), blank
rows are dropped, and every row keeps its spreadsheet row number (header = row 1, first data row = row 2)
so that errors can name it. ``TableSource`` holds all rows of a dataset as one frame and checks them (blank
cells, 0/1 labels, duplicate images) with one error listing every bad cell.

Column roles are found by name, compared in normalised form (``norm``: lower case, letters and digits
only): the image column (``guess_image_col``), the split column (``find_split_col``), the patient column
(``find_patient_col``), left/right image columns of a paired table (``paired_columns``), and the numeric
label/grade candidates (``numeric_columns``, id/age/sex/patient/split/image columns excluded).

The patient column is ``--patient_col``, else the first column (other than the image and split columns)
named, in this order of preference, patient_id, patient, subject_id, subject, participant_id,
participant, pid or ID (any case; spaces, underscores and hyphens ignored: ``Patient ID``,
``patient-id``). A column named just ``ID`` is ambiguous in a per-image table: when its values repeat it
names patients; when every row has its own ID it is taken for an image id and not used, since grouping
by it would change nothing and saying "grouped by patient" would claim a protection that is not there
(``--patient_col ID`` says it is one patient per image, and silences the warning). In a paired table,
where a row holds one patient's two eyes, ``ID`` always counts.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import shlex

import numpy as np
import pandas as pd

from util.datasets.base import SPLITS, DataOptions
from util.datasets.image_paths import clean_path
from util.errors import UserError, close_matches

TABLE_EXTENSIONS = ('.csv', '.xlsx', '.xls')

# column names are compared in normalised form: lower case, letters and digits only
IMAGE_NAMES = ('imagefile', 'image', 'imagepath', 'imagename', 'imagefilename', 'filename', 'file', 'filepath',
               'path', 'img', 'imageid', 'idcode', 'fname')
SPLIT_NAMES = ('split', 'subset', 'partition', 'set')
# in order of preference; 'id' last, and only with repeated values in a per-image table (find_patient_col)
PATIENT_NAMES = ('patientid', 'patient', 'subjectid', 'subject', 'participantid', 'participant', 'pid', 'id')
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


WORKBOOK_EXTENSIONS = ('.xlsx', '.xls')


def is_workbook(path: str) -> bool:
    return path.lower().endswith(WORKBOOK_EXTENSIONS)


def _unreadable(path: str, ext: str, err: Exception) -> UserError:
    if isinstance(err, ImportError):
        return UserError(f"{path}: cannot read {ext} files ({err}) (openpyxl for .xlsx, xlrd for .xls); install "
                         f"the package or save the table as .csv")
    return UserError(f"{path}: cannot read the table ({type(err).__name__}: {err}) (a .csv, .xlsx or .xls "
                     f"table with a header row); check the file")


_READ_ERRORS = (ImportError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError, KeyError)


@functools.lru_cache(maxsize=8)
def _sheet_names_cached(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    try:
        with pd.ExcelFile(path) as book:
            return tuple(str(name) for name in book.sheet_names)
    except _READ_ERRORS as err:
        raise _unreadable(path, os.path.splitext(path)[1].lower(), err) from None


def sheet_names(path: str) -> list[str]:
    """The sheet names of the workbook at ``path``, in workbook order."""
    st = os.stat(path)
    return list(_sheet_names_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size))


def check_sheet(paths, sheet: str | None) -> None:
    """``--sheet`` needs a workbook among ``paths`` (a dataset's tables), and names a sheet of each one."""
    if sheet is None:
        return
    paths = list(paths)
    books = [p for p in paths if is_workbook(p)]
    if not books:
        raise UserError(f"{', '.join(paths)}: --sheet {sheet} given, but a .csv table has no sheets (an .xlsx/.xls "
                        f"workbook for --sheet); drop --sheet")
    for path in books:
        names = sheet_names(path)
        if sheet not in names:
            near = close_matches(sheet, names)
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ''
            raise UserError(f"{path}: no sheet named {sheet!r} (sheets in this workbook: "
                            f"{', '.join(repr(n) for n in names)}{hint}); pass --sheet with one of those names")


def sheet_hint(paths, sheet: str | None) -> str:
    """For an error about a table read from the first sheet of a workbook with several sheets (no
    ``--sheet``): a clause naming the sheets and ``--sheet``; '' otherwise."""
    if sheet is not None:
        return ''
    for path in paths:
        if not (is_workbook(path) and os.path.isfile(path)):
            continue
        try:
            names = sheet_names(path)
        except UserError:
            continue
        if len(names) > 1:
            return (f"; note that {os.path.basename(path)} has {len(names)} sheets "
                    f"({', '.join(repr(n) for n in names)}) and only the first, {names[0]!r}, was read: if the "
                    f"table is on another sheet, pass --sheet NAME (e.g. --sheet {shlex.quote(names[1])})")
    return ''


@contextlib.contextmanager
def explain_sheets(paths, sheet: str | None):
    """Re-raise a ``UserError`` about a table's contents with ``sheet_hint`` appended (``paths``: a callable
    giving the dataset's table files, evaluated only on error)."""
    try:
        yield
    except UserError as err:
        try:
            hint = sheet_hint(paths(), sheet)
        except (UserError, OSError):
            hint = ''
        if not hint or '--sheet' in str(err):
            raise
        raise UserError(f"{err}{hint}") from None


@functools.lru_cache(maxsize=8)
def _read_table_cached(path: str, mtime_ns: int, size: int, sheet: str | None) -> pd.DataFrame:
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
            df = pd.read_excel(path, dtype=object, sheet_name=0 if sheet is None else sheet)
    except _READ_ERRORS as err:
        raise _unreadable(path, ext, err) from None
    df.columns = [str(c).strip() for c in df.columns]
    df = df.apply(lambda col: col.map(_cell_text))
    # keep the original index: it gives the spreadsheet row of every remaining row
    return df[(df != '').any(axis=1)]


def read_table(path: str, sheet: str | None = None) -> pd.DataFrame:
    """The table at ``path`` as strings ('' for blank cells), blank rows dropped, index = data row (0-based).

    ``sheet``: the sheet of a workbook (``--sheet``; default the first; ignored for a .csv)."""
    if not is_workbook(path):
        sheet = None
    elif sheet is not None:
        check_sheet([path], sheet)
    st = os.stat(path)
    return _read_table_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size, sheet).copy()


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


def find_patient_col(df: pd.DataFrame, where: str, options: DataOptions, exclude: set | tuple = (),
                     rows_are_patients: bool = False) -> str | None:
    """``--patient_col``, else a column named like a patient id (``PATIENT_NAMES``; see the module docstring),
    else ``None``. ``exclude``: the image and split columns; ``rows_are_patients``: a paired table (one row =
    one patient's eyes), where a unique ``ID`` is a patient id, not an image id."""
    if options.patient_col:
        if options.patient_col not in df.columns:
            columns = list(df.columns)
            near = close_matches(options.patient_col, columns)
            hint = f"; did you mean {', '.join(repr(c) for c in near)}?" if near else ''
            raise UserError(f"{where}: --patient_col {options.patient_col!r} is not a column of the table (the "
                            f"column holding each row's patient id; columns found: {', '.join(columns)}{hint}); "
                            f"pass --patient_col with one of those columns, or drop it to use a column named like "
                            f"patient_id, patient, subject or ID")
        return options.patient_col
    by_norm: dict[str, str] = {}
    for col in df.columns:
        if col not in exclude:
            by_norm.setdefault(norm(col), col)
    for name in PATIENT_NAMES:
        col = by_norm.get(name)
        if col is None:
            continue
        filled = df[col][df[col] != '']
        if filled.empty:
            continue
        if name == 'id' and not rows_are_patients and not filled.duplicated().any():
            continue  # one ID per row of a per-image table: an image id
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


# ----------------------------------------------------------------------------- rows of one or several tables

class TableSource:
    """All rows of a table dataset as one frame of strings, with each row's file and spreadsheet row."""

    def __init__(self, data_path: str, sheet: str | None = None):
        self.data_path = data_path
        self.files = table_files(data_path)
        self.is_dir = os.path.isdir(data_path)
        if self.is_dir and 'train' not in self.files:
            raise UserError(f"{data_path}: no train table (train.csv, train.xlsx or train.xls in the directory); "
                            f"add it or point --data_path at the table")
        check_sheet(self.files.values(), sheet)
        self.where = data_path
        self.table_dir = data_path if self.is_dir else (os.path.dirname(data_path) or '.')
        frames, files, rows, preset = [], [], [], []
        columns = None
        for split, path in self.files.items():
            df = read_table(path, sheet)
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
