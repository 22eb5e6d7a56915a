"""Paired-eye tables: ODIR-5K and any table with a left and a right image column per patient.

One row = one patient: a left and a right fundus image and patient-level 0/1 labels. The ODIR-5K
annotation table (.xlsx or .csv; columns ``ID, Patient Age, Patient Sex, Left-Fundus, Right-Fundus,
Left-Diagnostic Keywords, Right-Diagnostic Keywords, N, D, G, C, A, H, M, O``) is read with no options;
a generic paired table names its columns with ``--left_col``/``--right_col`` (or calls them like
``left_image``/``right_image``), its labels with ``--label_cols`` (default: the other 0/1 columns) and its
patients with ``--patient_col`` (default: a column named ID/patient/patient_id/subject, as
``tables.find_patient_col`` finds it; none = one patient per row).

``eye_mode``:

- ``'dual'`` (default): ``num_views`` 2, image ``float32 [2, 3, H, W]`` (0 = left, 1 = right), targets
  float32 [N, L]; ``sample_id`` = ``'left_file|right_file'``. A row with a blank eye cell is an error.
- ``'per_eye'``: ``num_views`` 1, one sample per eye image, with that eye's labels. ODIR labels are per
  patient, so per-eye labels come from the ``Left-/Right-Diagnostic Keywords`` through ``KEYWORD_RULES``
  (first matching rule wins; ``NON_DIAGNOSTIC_KEYWORDS`` are ignored, so an eye with only those has no
  label); a generic table needs per-eye label columns (``left_<label>``/``right_<label>`` or
  ``<label>_left``/``<label>_right``). A blank eye cell just drops that eye.

Splits are made per patient (``splits.assign_splits`` grouped by the patient column): both
eyes and every row of a patient land in the same split. Images are looked for under ``--image_root``,
else the table's folder and its subfolders (``Training Images/``, ``images/``, ...).

References: ODIR-5K annotation table (Peking University International Competition on Ocular Disease
Intelligent Recognition, 2019); keyword classes follow its N/D/G/C/A/H/M/O label definitions.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from util.datasets.base import DataOptions, register_dataset_format, resolve_task
from util.datasets.csv_formats import TableDataset, _patient_groups
from util.datasets.tables import (
    LEFT_RIGHT_SUFFIXES,
    TableSource,
    find_patient_col,
    find_split_col,
    is_numeric_like,
    missing_column_error,
    norm,
    numeric_columns,
    paired_columns,
    require_column,
)
from util.errors import UserError

ODIR_CLASSES = ('N', 'D', 'G', 'C', 'A', 'H', 'M', 'O')
ODIR_CLASS_NAMES = {'N': 'normal', 'D': 'diabetes', 'G': 'glaucoma', 'C': 'cataract', 'A': 'AMD',
                    'H': 'hypertension', 'M': 'myopia', 'O': 'other'}
ODIR_EYE_COLUMNS = ('Left-Fundus', 'Right-Fundus')
ODIR_KEYWORD_COLUMNS = ('Left-Diagnostic Keywords', 'Right-Diagnostic Keywords')

# keywords about the photograph, not the eye
NON_DIAGNOSTIC_KEYWORDS = ('lens dust', 'low image quality', 'image offset', 'optic disk photographically invisible',
                           'no fundus image', 'anterior segment image')

# (substring of the lower-cased keyword, class); the first match wins, no match -> 'O' (other diseases).
# Order matters: 'hypertensive retinopathy' and 'myopia retinopathy' are not diabetic retinopathy.
KEYWORD_RULES = (
    ('normal fundus', 'N'),
    ('hypertensive', 'H'),
    ('myopi', 'M'),                        # pathological myopia, myopia retinopathy, myopic maculopathy
    ('macular degeneration', 'A'),         # (dry/wet) age-related macular degeneration
    ('glaucoma', 'G'),                     # glaucoma, suspected glaucoma
    ('cataract', 'C'),
    ('diabetic retinopathy', 'D'),         # (proliferative) diabetic retinopathy
    ('proliferative retinopathy', 'D'),    # mild/moderate/severe (non)proliferative retinopathy
)


def keyword_class(keyword: str) -> str | None:
    """The ODIR class of one diagnostic keyword (``None`` for a non-diagnostic one)."""
    k = ' '.join(keyword.strip().lower().split())
    if not k or k in NON_DIAGNOSTIC_KEYWORDS:
        return None
    for needle, cls in KEYWORD_RULES:
        if needle in k:
            return cls
    return 'O'


def keyword_classes(text: str) -> list[str]:
    """The ODIR classes of a keyword cell (keywords separated by ',' or the full-width '，'), in class order."""
    found = {keyword_class(k) for k in re.split(r'[,，;；]', text or '')} - {None}
    return [c for c in ODIR_CLASSES if c in found]


def per_eye_label_columns(df: pd.DataFrame, exclude: set) -> dict[str, tuple[str, str]]:
    """``{label: (left column, right column)}`` for numeric column pairs like left_N/right_N or N_left/N_right."""
    by_norm = {norm(c): c for c in df.columns if c not in exclude}
    out = {}
    for col in df.columns:
        if col in exclude:
            continue
        n = norm(col)
        if n.startswith('left') and len(n) > 4:
            stem, partner = n[4:], 'right' + n[4:]
        elif n.endswith('left') and len(n) > 4:
            stem, partner = n[:-4], n[:-4] + 'right'
        else:
            continue
        if partner in by_norm and stem not in LEFT_RIGHT_SUFFIXES and is_numeric_like(df[col]):
            label = re.sub(r'(?i)^left[\s_\-.]*|[\s_\-.]*left$', '', col) or stem
            out[label] = (col, by_norm[partner])
    return out


@register_dataset_format('odir')
class PairedEyeDataset(TableDataset):
    """ODIR-5K or a generic paired table; see the module docstring. Task multi_label."""

    image_subfolders = ('Training Images', 'ODIR-5K_Training_Images', 'ODIR-5K_Training_Dataset',
                        'training_images', 'images', 'Images')

    def _parse(self, src: TableSource, options: DataOptions, num_classes: int | None) -> None:
        self.task_type = resolve_task(src.where, 'odir', 'multi_label', ('multi_label',), options.task_type)
        df, where = src.frame, src.where
        split_col = find_split_col(df, where, options)
        auto_left, auto_right = paired_columns(df)
        left = require_column(df, where, options.left_col, '--left_col') if options.left_col else auto_left
        right = require_column(df, where, options.right_col, '--right_col') if options.right_col else auto_right
        if left is None or right is None:
            raise UserError(f"{where}: no {'left' if left is None else 'right'} eye image column (ODIR's "
                            f"Left-Fundus/Right-Fundus or columns named like left_image/right_image; columns "
                            f"found: {', '.join(df.columns)}); pass --left_col and --right_col")
        patient_col = find_patient_col(df, where, options, {left, right, split_col}, rows_are_patients=True)
        if patient_col is None:
            self.notes.append(f"{where}: no patient column (ID/patient/patient_id, or --patient_col): each row "
                              f"is taken as a different patient when splitting")
        self.is_odir = all(c in df.columns for c in ODIR_EYE_COLUMNS)
        exclude = {c for c in (left, right, split_col, patient_col) if c}
        eye_pairs = per_eye_label_columns(df, exclude)
        if options.label_cols:
            label_cols = [require_column(df, where, c, '--label_cols') for c in options.label_cols]
        elif self.is_odir:
            absent = [c for c in ODIR_CLASSES if c not in df.columns]
            if absent:
                err = missing_column_error(where, absent[0], df.columns, '--label_cols')
                raise UserError(f"{err} (ODIR label columns {', '.join(ODIR_CLASSES)}; missing: "
                                f"{', '.join(absent)})")
            label_cols = list(ODIR_CLASSES)
        else:
            label_cols = numeric_columns(df, exclude | {c for pair in eye_pairs.values() for c in pair})
            if not label_cols and not eye_pairs:
                raise UserError(f"{where}: no label columns (0/1 columns besides {left!r}/{right!r}, or per-eye "
                                f"columns left_<label>/right_<label>; columns found: {', '.join(df.columns)}); "
                                f"pass --label_cols")
        names = label_cols or list(eye_pairs)
        if num_classes is not None and num_classes != len(names):
            raise UserError(f"{where}: {len(names)} labels {names} but --nb_classes {num_classes}; pass "
                            f"--nb_classes {len(names)} or choose the columns with --label_cols")
        eye_targets = self._per_eye_targets(src, names, eye_pairs, options.eye_mode == 'per_eye')
        y = src.binary_labels(label_cols) if label_cols else eye_targets.max(axis=1)
        if options.eye_mode == 'per_eye':
            self.num_views = 1
            if self.is_odir and eye_targets is not None and not eye_pairs:
                self._compare_keywords(src, names, y, eye_targets)
        else:
            self.num_views = 2
            self._check_both_eyes(src, left, right)
        src.check_duplicates([left, right])
        self.image_cols = [left, right]
        self.class_names = list(names)
        self._row_paths = list(zip(df[left].to_numpy(), df[right].to_numpy()))
        self._row_targets = y
        self._eye_targets = eye_targets
        self._strat = y
        self.patient_col = patient_col
        self._groups = _patient_groups(src, patient_col)
        if self._groups is None:  # group = row, but the split must still keep a row's two eyes together
            self._groups = np.arange(len(df)).astype(str)

    def _per_eye_targets(self, src: TableSource, names: list[str], eye_pairs: dict, needed: bool):
        """float32 [N, 2, L] per-eye labels from per-eye columns or ODIR keywords; ``None`` if unavailable."""
        by_norm = {norm(k): v for k, v in eye_pairs.items()}
        pairs = [by_norm.get(norm(n)) for n in names]
        if all(p is not None for p in pairs):
            left = src.binary_labels([p[0] for p in pairs])
            right = src.binary_labels([p[1] for p in pairs])
            return np.stack([left, right], axis=1)
        if not needed:
            return None
        has_keywords = all(c in src.frame.columns for c in ODIR_KEYWORD_COLUMNS)
        if has_keywords and set(names) <= set(ODIR_CLASSES):
            out = np.zeros((len(src.frame), 2, len(names)), dtype=np.float32)
            for eye, col in enumerate(ODIR_KEYWORD_COLUMNS):
                for i, text in enumerate(src.frame[col].to_numpy()):
                    for c in keyword_classes(text):
                        if c in names:
                            out[i, eye, names.index(c)] = 1.0
            return out
        missing = [n for n, p in zip(names, pairs) if p is None]
        raise UserError(f"{src.where}: --eye_mode per_eye needs a label per eye, but the labels {missing} are per "
                        f"patient (ODIR's Left-/Right-Diagnostic Keywords with N..O labels, or per-eye 0/1 columns "
                        f"left_<label>/right_<label>); add per-eye label columns or use --eye_mode dual")

    def _compare_keywords(self, src: TableSource, names: list[str], y: np.ndarray, eye: np.ndarray) -> None:
        """Note patients whose keyword-derived labels disagree with the table's (ODIR: N = both eyes normal)."""
        derived = eye.max(axis=1)
        if 'N' in names:
            j = names.index('N')
            diseased = np.delete(derived, j, axis=1).any(axis=1)
            derived[:, j] = (eye[:, 0, j] * eye[:, 1, j]) * ~diseased
        bad = np.flatnonzero((derived != y).any(axis=1))
        if bad.size:
            self.notes.append(f"{src.where}: for {bad.size} of {len(y)} patients the labels derived from the "
                              f"diagnostic keywords differ from the {'/'.join(names)} columns "
                              f"({src.rows_text(bad, limit=5)}); per-eye labels follow the keywords")

    @staticmethod
    def _check_both_eyes(src: TableSource, left: str, right: str) -> None:
        parts = []
        count = 0
        for col in (left, right):
            blank = np.flatnonzero((src.frame[col] == '').to_numpy())
            if blank.size:
                parts.append(f"blank {col!r} at {src.rows_text(blank)}")
                count += blank.size
        if parts:
            raise UserError(f"{src.where}: {count} patients miss an eye image: {'; '.join(parts)} (both eyes in "
                            f"every row for --eye_mode dual); fill the cells, delete those rows, or use "
                            f"--eye_mode per_eye")

    def _samples(self, sel: np.ndarray):
        if self.num_views == 2:
            return super()._samples(sel)
        listed, targets, rows, blank = [], [], [], 0
        for i in sel:
            for eye in (0, 1):
                path = self._row_paths[i][eye]
                if not path:
                    blank += 1
                    continue
                listed.append((path,))
                targets.append(self._eye_targets[i, eye])
                rows.append(int(i))
        if blank:
            self.notes.append(f"{self.where}: {blank} blank eye cells in the {self.split} split: those eyes are "
                              f"left out")
        self.eyes = ['left' if self._row_paths[r][0] == p[0] else 'right' for p, r in zip(listed, rows)]
        return listed, np.asarray(targets, dtype=np.float32).reshape(-1, len(self.class_names)), rows
