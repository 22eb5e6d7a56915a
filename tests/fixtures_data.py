"""Tiny synthetic datasets in every table/folder layout the toolkit reads, for unit and end-to-end tests.

Each ``make_*`` writes deterministic content (seeded) under ``root`` and returns the ``data_path`` to pass
to ``build_dataset`` / ``--data_path``. Images are small PNGs whose colour depends on the labels (a
coloured patch per positive label, brightness per grade), so a tiny model can learn something.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
from PIL import Image

SEED_MULTILABEL_COLUMNS = ('cataract', 'glaucoma', 'diabetic_retinopathy', 'normal_fundus')
EXTERNAL_EYE_CLASSES = ('cataract', 'conjunctivitis', 'eyelid', 'normal', 'uveitis')
ODIR_CLASSES = ('N', 'D', 'G', 'C', 'A', 'H', 'M', 'O')
ODIR_KEYWORDS = {'N': 'normal fundus', 'D': 'moderate non proliferative retinopathy', 'G': 'glaucoma',
                 'C': 'cataract', 'A': 'dry age-related macular degeneration', 'H': 'hypertensive retinopathy',
                 'M': 'pathological myopia', 'O': 'drusen'}
PALETTE = ((230, 40, 40), (40, 230, 40), (40, 40, 230), (230, 230, 40), (230, 40, 230), (40, 230, 230),
           (250, 150, 40), (150, 40, 250))


def label_image(labels, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A dark image with one coloured patch per positive label (patch j in grid cell j), plus noise."""
    labels = np.asarray(labels).reshape(-1)
    cells = int(np.ceil(np.sqrt(max(len(labels), 1))))
    step = size // cells
    img = np.full((size, size, 3), 30.0)
    for j in np.flatnonzero(labels > 0):
        r, c = divmod(int(j), cells)
        img[r * step:(r + 1) * step, c * step:(c + 1) * step] = PALETTE[j % len(PALETTE)]
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def grade_image(grade: int, rng: np.random.Generator, size: int = 32, grades: int = 5) -> Image.Image:
    """Red-channel brightness rising with the grade, plus noise."""
    img = np.zeros((size, size, 3))
    img[..., 0] = 40 + 200 * grade / max(grades - 1, 1)
    img[..., 1] = 30
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _save(img: Image.Image, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format='PNG')


def _multilabel_rows(n: int, labels, rng: np.random.Generator, seed_semantics: bool) -> np.ndarray:
    """0/1 [n, L]; every label positive at least twice. With the seed's columns, normal_fundus = no disease."""
    num = len(labels)
    y = (rng.random((n, num)) < 0.3).astype(np.int64)
    for j in range(num):
        y[(2 * j) % n, j] = 1
        y[(2 * j + 1) % n, j] = 1
    if seed_semantics and 'normal_fundus' in labels:
        k = list(labels).index('normal_fundus')
        disease = np.delete(y, k, axis=1).any(axis=1)
        y[:, k] = (~disease).astype(np.int64)
    return y


def _write_table(df: pd.DataFrame, path: str) -> str:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    if path.endswith('.xlsx'):
        df.to_excel(path, index=False)
    else:
        df.to_csv(path, index=False)
    return path


def _split_names(n: int) -> list[str]:
    """A deterministic train/val/test column: 60/20/20 interleaved."""
    return [('train', 'train', 'train', 'val', 'test')[i % 5] for i in range(n)]


def make_multilabel_csv(root, n: int = 40, labels=SEED_MULTILABEL_COLUMNS, layout: str = 'single', size: int = 32,
                        seed: int = 0, image_dir: str = 'images', image_col: str = 'Image_File',
                        name: str = 'labels_image_centric_4_class_clean.csv') -> str:
    """Multi-label table with the seed's header by default.

    layout: 'single' (one table, splits carved by ratio), 'split_col' (a ``split`` column),
    'dir' (train.csv/val.csv/test.csv in ``root``; returns ``root``).
    """
    root = str(root)
    rng = np.random.default_rng(seed)
    y = _multilabel_rows(n, labels, rng, tuple(labels) == SEED_MULTILABEL_COLUMNS)
    files = []
    for i in range(n):
        rel = f'{image_dir}/img_{i:03d}.png' if image_dir else f'img_{i:03d}.png'
        _save(label_image(y[i], rng, size), os.path.join(root, rel))
        files.append(rel)
    df = pd.DataFrame({image_col: files, **{c: y[:, j] for j, c in enumerate(labels)}})
    if layout == 'single':
        return _write_table(df, os.path.join(root, name))
    if layout == 'split_col':
        df['split'] = _split_names(n)
        return _write_table(df, os.path.join(root, name))
    if layout == 'dir':
        split = np.asarray(_split_names(n))
        for s in ('train', 'val', 'test'):
            _write_table(df[split == s], os.path.join(root, f'{s}.csv'))
        return root
    raise ValueError(f'layout {layout!r}')


def make_grading_csv(root, n: int = 40, grades: int = 5, size: int = 32, seed: int = 0, image_col: str = 'image',
                     grade_col: str = 'level', with_extension: bool = True, layout: str = 'single',
                     name: str = 'grades.csv') -> str:
    """Grading table (image, grade), grades cycling 0..grades-1 (so each is present), images by brightness.

    ``with_extension=False`` lists image names without '.png' (as APTOS/EyePACS tables do).
    """
    root = str(root)
    rng = np.random.default_rng(seed)
    g = np.array([i % grades for i in range(n)])
    files = []
    for i in range(n):
        _save(grade_image(int(g[i]), rng, size, grades), os.path.join(root, 'images', f'eye_{i:03d}.png'))
        files.append(f'images/eye_{i:03d}' + ('.png' if with_extension else ''))
    df = pd.DataFrame({image_col: files, grade_col: g})
    if layout == 'split_col':
        df['split'] = _split_names(n)
    return _write_table(df, os.path.join(root, name))


def odir_patients(n: int, rng: np.random.Generator) -> list[tuple[list[str], list[str]]]:
    """Per-eye ODIR classes of ``n`` patients; each class occurs in some eye."""
    out = []
    for i in range(n):
        if i % 4 == 0:  # a normal patient: both eyes normal
            out.append((['N'], ['N']))
            continue
        eyes = []
        for e in range(2):
            forced = ODIR_CLASSES[(2 * i + e) % 8]
            extra = ODIR_CLASSES[rng.integers(1, 8)] if rng.random() < 0.2 else None
            cls = [forced] if forced == 'N' or extra is None or extra == forced else [forced, extra]
            eyes.append(cls)
        out.append((eyes[0], eyes[1]))
    return out


def odir_patient_labels(left: list[str], right: list[str]) -> dict[str, int]:
    """ODIR's patient rule: N when both eyes are normal, other classes when either eye has them."""
    both = set(left) | set(right)
    labels = {c: int(c in both) for c in ODIR_CLASSES if c != 'N'}
    labels['N'] = int(set(left) == {'N'} and set(right) == {'N'})
    return {c: labels[c] for c in ODIR_CLASSES}


def make_odir_table(root, n_patients: int = 24, fmt: str = 'xlsx', image_dir: str = 'Training Images',
                    size: int = 32, seed: int = 0, name: str = 'data') -> str:
    """An ODIR-5K style annotation table (columns in ODIR order) + ``image_dir/<id>_left.jpg``-like PNGs.

    Keywords use ODIR spellings, joined with the full-width comma, with an occasional 'lens dust'.
    Returns the table path (``.xlsx`` or ``.csv``).
    """
    root = str(root)
    rng = np.random.default_rng(seed)
    rows = []
    for pid, (left, right) in enumerate(odir_patients(n_patients, rng)):
        files = []
        for side, cls in (('left', left), ('right', right)):
            rel = f'{pid}_{side}.png'
            vec = [int(c in cls) for c in ODIR_CLASSES]
            _save(label_image(vec, rng, size), os.path.join(root, image_dir, rel) if image_dir else
                  os.path.join(root, rel))
            files.append(rel)
        kw = ['，'.join(ODIR_KEYWORDS[c] for c in cls) + ('，lens dust' if (pid + j) % 7 == 0 else '')
              for j, cls in enumerate((left, right))]
        rows.append({'ID': pid, 'Patient Age': 40 + pid % 30, 'Patient Sex': ('Male', 'Female')[pid % 2],
                     'Left-Fundus': files[0], 'Right-Fundus': files[1], 'Left-Diagnostic Keywords': kw[0],
                     'Right-Diagnostic Keywords': kw[1], **odir_patient_labels(left, right)})
    return _write_table(pd.DataFrame(rows), os.path.join(root, f'{name}.{fmt}'))


def make_paired_csv(root, n_patients: int = 24, labels=('cataract', 'glaucoma', 'dr'), per_eye: bool = True,
                    rows_per_patient: int = 1, size: int = 32, seed: int = 0, name: str = 'pairs.csv') -> str:
    """A generic paired table: patient_id, left_image, right_image, <label>... [, left_<label>, right_<label>...].

    ``rows_per_patient`` > 1 gives several visits (rows) per patient, to test patient-level splits.
    """
    root = str(root)
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for v in range(rows_per_patient):
            eye = (rng.random((2, len(labels))) < 0.35).astype(np.int64)
            eye[0, (p + v) % len(labels)] = 1
            files = []
            for e, side in enumerate(('L', 'R')):
                rel = f'img/p{p:03d}_v{v}_{side}.png'
                _save(label_image(eye[e], rng, size), os.path.join(root, rel))
                files.append(rel)
            row = {'patient_id': f'P{p:03d}', 'left_image': files[0], 'right_image': files[1]}
            row.update({c: int(eye[:, j].max()) for j, c in enumerate(labels)})
            if per_eye:
                row.update({f'left_{c}': int(eye[0, j]) for j, c in enumerate(labels)})
                row.update({f'right_{c}': int(eye[1, j]) for j, c in enumerate(labels)})
            rows.append(row)
    return _write_table(pd.DataFrame(rows), os.path.join(root, name))


def make_eye_folders(root, classes=EXTERNAL_EYE_CLASSES, counts=None, size: int = 32, seed: int = 0) -> str:
    """The external-eye seed layout: ``training/<class>/`` and ``validation/<class>/`` (no test split)."""
    root = str(root)
    counts = counts or {'training': 6, 'validation': 3}
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for ci, cls in enumerate(classes):
            for i in range(n):
                vec = np.eye(len(classes))[ci]
                _save(label_image(vec, rng, size), os.path.join(root, split, cls, f'{cls}_{i}.png'))
    return root
