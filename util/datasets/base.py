"""Datasets: retinal image data in the formats the toolkit reads, validated when built.

Formats are registered by name (``@register_dataset_format('folder')``) and picked from ``data_path``
by ``build_dataset`` (or named with ``fmt``). Detection is unambiguous by construction:

- ``folder``: a directory of split folders ``<root>/<split>/<class>/*.png`` (torchvision ImageFolder
  layout and class order, as the RETFound reference uses); ``training/``/``validation/`` are accepted
  for train/val. A directory holding ``train.csv``/``train.xlsx`` is a table layout, never a folder tree.
- ``npz``: a ``.npz`` file with ``{split}_images`` / ``{split}_labels`` arrays (MedMNIST layout).
- ``odir``, ``csv_multilabel``, ``csv_grading`` (``csv_formats.py``, ``odir.py``):
  a table (.csv/.xlsx/.xls, or a directory with ``train.csv`` [+ ``val.csv``, ``test.csv``]); one
  function, ``csv_formats.table_kind``, reads its columns and names exactly one of the three.

Each dataset describes itself through ``task_type`` (single_label, multi_label, regression),
``class_names``, ``num_views`` (1, or 2 for a left/right eye pair) and ``targets``; ``__getitem__``
returns ``(image, label)`` with the shapes of the contract (``float32 [3, H, W]`` or ``[2, 3, H, W]``;
``int64`` scalar, ``float32 [L]`` or ``float32`` scalar). Things a user should know about how a split
was made (test = validation, carved splits) are in ``dataset.notes``, one line each.

Nothing here skips a bad sample: an unreadable or truncated image raises ``UserError`` with its path.

``DataOptions.jpeg_draft`` (``--jpeg_draft``) lets the train split decode its JPEGs at 1/2, 1/4 or 1/8 of
their size when the transform's first resize still gets at least the size it needs (its
``source_min_size``; ``util/image_io.py``). Only the train split: validation, test, ``--eval`` and
``predict.py`` always decode the full image, so every reported metric and every prediction is that of the
full decode, whatever the run trained with.

References: torchvision ``datasets/folder.py`` (ImageFolder class discovery and ordering);
MedMNIST v2 npz layout (Yang et al., Scientific Data 2023).
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import paddle
from PIL import Image

from util.errors import UserError, unknown_name_error
from util.image_io import MinSize, load_image
from util.task_names import TASK_NAMES

SPLITS = ('train', 'val', 'test')
TASKS = TASK_NAMES
EYE_MODES = ('dual', 'per_eye')

_FORMATS: dict[str, type] = {}


@dataclass
class DataOptions:
    """Format options (the CLI flags of the same names); each format ignores the fields it does not use.

    ``val_ratio``/``test_ratio``/``split_seed`` carve splits out of a table that does not define them;
    ``task_type`` overrides a format's natural task (a grading table as ``single_label``, class folders
    named by integer grades as ``regression``).
    """
    image_col: str | None = None
    label_cols: list[str] | None = None
    grade_col: str | None = None
    split_col: str | None = None
    val_ratio: float = 0.15
    test_ratio: float = 0.15
    split_seed: int = 0
    image_root: str | None = None
    left_col: str | None = None
    right_col: str | None = None
    patient_col: str | None = None
    eye_mode: str = 'dual'
    task_type: str | None = None
    sheet: str | None = None              # .xlsx: the sheet holding the table (default: the first)
    allow_outside_paths: bool = False     # image paths may leave the table's folder / image_root
    kfold: int = 0                        # --kfold K: K-fold cross-validation, the test split is fold
    fold: int | None = None               # ``fold`` (0..K-1) of util/datasets/folds.py
    dataratio: str = '1.0'                # build_splits trains on this share of the train split (subsample.py),
    stratified: bool = False              # drawn per class or not,
    seed: int = 0                         # with this seed (the run's --seed)
    jpeg_draft: bool = False              # train split: JPEGs decoded at a reduced size the transform allows

    def validate(self) -> 'DataOptions':
        for name, value in (('--val_ratio', self.val_ratio), ('--test_ratio', self.test_ratio)):
            if not (0.0 <= float(value) < 1.0):
                raise UserError(f"{name} {value}: outside [0, 1) (a fraction of the table's rows); "
                                f"pass e.g. {name} 0.15")
        if self.val_ratio + self.test_ratio >= 1.0:
            raise UserError(f"--val_ratio {self.val_ratio} + --test_ratio {self.test_ratio}: leave no training "
                            f"rows (sum below 1); lower one of them")
        if self.eye_mode not in EYE_MODES:
            raise unknown_name_error('--eye_mode', str(self.eye_mode), EYE_MODES)
        if self.task_type is not None and self.task_type not in TASKS:
            raise unknown_name_error('--task_type', str(self.task_type), TASKS)
        if isinstance(self.label_cols, str):
            self.label_cols = [c.strip() for c in self.label_cols.split(',') if c.strip()]
        if self.image_root is not None and not os.path.isdir(self.image_root):
            raise UserError(f"--image_root {self.image_root}: not a directory (the folder the table's image paths "
                            f"are relative to); check the path")
        return self


def register_dataset_format(name: str) -> Callable[[type], type]:
    """Class decorator registering a dataset format under ``name``.

    The class is constructed as ``cls(split, data_path, transform, num_classes, options=DataOptions)`` and
    provides a ``detect(data_path, options) -> bool`` staticmethod; ``build_dataset`` uses it to pick the
    format, so two formats must never both claim a path (``detect`` may raise ``UserError`` when a path is
    clearly of its kind but cannot be read).
    """
    def wrap(cls: type) -> type:
        if name in _FORMATS:
            raise ValueError(f'dataset format {name!r} registered twice')
        cls.format_name = name
        _FORMATS[name] = cls
        return cls
    return wrap


def list_dataset_formats() -> list[str]:
    return sorted(_FORMATS)


def build_dataset(split: str, data_path: str, transform: Callable | None, num_classes: int | None = None,
                  fmt: str | None = None, options: DataOptions | None = None) -> 'RetinaDataset':
    """Build the ``split`` of the dataset at ``data_path``.

    Args:
        split: 'train', 'val' or 'test'.
        data_path: class-folder root, ``.npz`` file, table (.csv/.xlsx) or a directory of tables.
        transform: ``callable(PIL.Image RGB) -> float32 [3, H, W]`` (dual-eye data:
            ``callable([left, right]) -> float32 [2, 3, H, W]``); ``None`` gives the image as float32 in
            [0, 1] without resizing.
        num_classes: expected number of classes (``--nb_classes``); ``None`` infers it.
        fmt: a registered format name; ``None`` picks the format from ``data_path``.
        options: format options (``DataOptions``); ``None`` = the defaults.
    """
    if split not in SPLITS:
        raise UserError(f"split {split!r}: unknown split (one of {', '.join(SPLITS)}); use one of those")
    if num_classes is not None and (int(num_classes) != num_classes or num_classes < 1):
        raise UserError(f"--nb_classes {num_classes}: not a positive integer; pass the number of classes")
    options = (options if options is not None else DataOptions()).validate()
    if not data_path or not os.path.exists(data_path):
        raise UserError(f"{data_path}: data path does not exist (a class-folder root with "
                        f"{'/'.join(SPLITS)} subfolders, a .npz file, or a .csv/.xlsx table); check --data_path")
    if fmt is None:
        found = [name for name, cls in _FORMATS.items() if cls.detect(data_path, options)]
        if not found:
            raise UserError(f"{data_path}: no dataset format recognises this path (registered: "
                            f"{', '.join(list_dataset_formats())}: a directory of class folders, a .npz file, "
                            f"or a .csv/.xlsx/.xls table); point --data_path at one of those")
        if len(found) > 1:
            raise UserError(f"{data_path}: several dataset formats claim this path ({', '.join(found)}) (exactly "
                            f"one); pass --data_format with one of them")
        fmt = found[0]
    elif fmt not in _FORMATS:
        raise unknown_name_error('dataset format', fmt, _FORMATS)
    dataset = _FORMATS[fmt](split, data_path, transform, None if num_classes is None else int(num_classes),
                            options=options)
    dataset.jpeg_draft = bool(options.jpeg_draft) and split == 'train'
    return dataset


def _to_unit_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)


def resolve_task(where: str, fmt: str, natural: str, allowed: tuple[str, ...], task_type: str | None) -> str:
    """``task_type`` if the format supports it, else its natural task; an unsupported override is an error."""
    if task_type is None or task_type == natural:
        return natural
    if task_type not in allowed:
        raise UserError(f"{where}: --task_type {task_type} does not apply to the {fmt} format (one of "
                        f"{', '.join(allowed)}); drop --task_type or use another data format")
    return task_type


class RetinaDataset(paddle.io.Dataset, abc.ABC):
    """Base of every format: subclasses fill ``task``, ``class_names``, ``num_views``, ``targets`` and
    implement ``load_image(i)``.

    Image reading goes through ``self.read(path)`` (file-based formats) or ``self.prepare(img)``
    (array-based formats) so a ``reader`` (e.g. fundus cropping with a cache, set by the caller after
    construction) applies to every format alike.

    ``jpeg_draft`` (set by ``build_dataset`` for the train split under ``--jpeg_draft``): ``read`` asks for a
    JPEG decoded at a reduced size, no smaller than the transform's ``source_min_size`` allows.
    """

    task_type = 'single_label'
    num_views = 1
    format_name = ''
    test_is_val = False  # True when the data has no test split and 'test' is the val split (see ``notes``)
    jpeg_draft = False

    def __init__(self, split: str, data_path: str, transform: Callable | None):
        super().__init__()
        self.split = split
        self.data_path = data_path
        self.transform = transform
        self.reader = None
        self.notes: list[str] = []
        self.class_names: list[str] = []
        self.targets = np.zeros(0, dtype=np.int64)

    @staticmethod
    def detect(data_path: str, options: DataOptions | None = None) -> bool:
        return False

    def decode_min_size(self) -> MinSize | None:
        """What a reduced JPEG decode must still give the transform (``None``: decode the full image), so
        ``None`` unless ``jpeg_draft`` and the transform states its ``source_min_size``."""
        return getattr(self.transform, 'source_min_size', None) if self.jpeg_draft else None

    def read(self, path: str) -> Image.Image:
        """The RGB image at ``path`` through the reader hook (default: ``load_image``); reduced in size
        (``decode_min_size``) only through ``load_image`` or a reader with ``accepts_min_size``."""
        need = self.decode_min_size()
        if self.reader is None:
            return load_image(path) if need is None else load_image(path, need)
        if need is None or not getattr(self.reader, 'accepts_min_size', False):
            return self.reader(path)
        return self.reader(path, need)

    def prepare(self, img: Image.Image) -> Image.Image:
        """An in-memory image through the reader's processing (array-based formats)."""
        return self.reader.process(img) if self.reader is not None else img

    @abc.abstractmethod
    def load_image(self, index: int) -> Image.Image | list[Image.Image]:
        """The image of sample ``index`` as RGB, or ``[left, right]`` when ``num_views == 2``
        (raise ``UserError`` naming the file when unreadable)."""

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        img = self.load_image(index)
        if self.transform is not None:
            x = self.transform(img)
        elif self.num_views == 1:
            x = _to_unit_array(img)
        else:
            sizes = [im.size for im in img]
            if len(set(sizes)) != 1:
                raise UserError(f"{self.sample_id(index)}: the eye images differ in size {sizes} (the same size "
                                f"when no transform is set); set a transform that resizes both eyes")
            x = np.stack([_to_unit_array(im) for im in img])
        return x, self.label(index)

    def label(self, index: int) -> np.ndarray:
        """The label of sample ``index`` as the contract types it for ``self.task_type``."""
        if self.task_type == 'multi_label':
            return np.asarray(self.targets[index], dtype=np.float32)
        if self.task_type == 'regression':
            return np.float32(self.targets[index])
        return np.int64(self.targets[index])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check_images(self) -> int:
        """Decode every image once; raise one ``UserError`` listing all unreadable files.

        Worth calling before training on a new folder: Paddle 3.3's DataLoader does not surface an
        exception raised in ``__getitem__`` well (with ``num_workers=0`` its reader thread dies and the
        loop blocks; with workers the main process gets a generic SystemError and the path only on
        stderr). Returns the number of samples checked.
        """
        bad = []
        for i in range(len(self)):
            try:
                self.load_image(i)
            except UserError as err:
                bad.append(str(err))
        if bad:
            listing = '\n  '.join(bad[:20]) + (f'\n  ... and {len(bad) - 20} more' if len(bad) > 20 else '')
            raise UserError(f"{self.data_path} ({self.split}): {len(bad)} of {len(self)} images cannot be read "
                            f"(every image decodable); replace or delete them:\n  {listing}")
        return len(self)

    def class_counts(self) -> np.ndarray:
        """Images per class (single_label), positives per label (multi_label), images per grade (regression)."""
        k = len(self.class_names)
        if self.task_type == 'multi_label':
            return np.asarray(self.targets, dtype=np.float64).reshape(-1, k).sum(0).astype(np.int64)
        if self.task_type == 'regression':
            return np.bincount(np.rint(self.targets).astype(np.int64), minlength=k)
        return np.bincount(self.targets, minlength=k)

    def sample_id(self, index: int) -> str:
        """How a user finds sample ``index`` (a file path relative to the split, or an array index)."""
        return f'{self.split}[{index}]'

    def describe(self) -> str:
        """One line for the log: source, size, task and images (or positives) per class."""
        counts = ', '.join(f'{n}: {c}' for n, c in zip(self.class_names, self.class_counts()))
        unit = 'images' if self.num_views == 1 else f'samples of {self.num_views} views'
        what = {'multi_label': 'labels, positives', 'regression': 'grades'}.get(self.task_type, 'classes')
        return (f'{self.format_name} {self.split} ({self.data_path}): {len(self)} {unit}, {self.task_type}, '
                f'{len(self.class_names)} {what} ({counts})')

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.describe()})'


def has_table_layout(data_path: str) -> bool:
    """A directory holding ``train.csv`` (or .xlsx/.xls): the table formats' layout, not class folders."""
    return os.path.isdir(data_path) and any(os.path.isfile(os.path.join(data_path, f'train{ext}'))
                                            for ext in ('.csv', '.xlsx', '.xls'))
