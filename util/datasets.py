"""Datasets: retinal image data in the formats the toolkit reads, validated when built.

Formats are registered by name (``@register_dataset_format('folder')``) and picked from ``data_path``
by ``build_dataset`` (or named with ``fmt``). Detection is unambiguous by construction:

- ``folder``: a directory of split folders ``<root>/<split>/<class>/*.png`` (torchvision ImageFolder
  layout and class order, as the RETFound reference uses); ``training/``/``validation/`` are accepted
  for train/val. A directory holding ``train.csv``/``train.xlsx`` is a table layout, never a folder tree.
- ``npz``: a ``.npz`` file with ``{split}_images`` / ``{split}_labels`` arrays (MedMNIST layout).
- ``odir``, ``csv_multilabel``, ``csv_grading`` (``util/datasets_csv.py``, ``util/datasets_odir.py``):
  a table (.csv/.xlsx/.xls, or a directory with ``train.csv`` [+ ``val.csv``, ``test.csv``]); one
  function, ``datasets_csv.table_kind``, reads its columns and names exactly one of the three.

Each dataset describes itself through ``task`` (single_label, multi_label, regression),
``class_names``, ``num_views`` (1, or 2 for a left/right eye pair) and ``targets``; ``__getitem__``
returns ``(image, label)`` with the shapes of the contract (``float32 [3, H, W]`` or ``[2, 3, H, W]``;
``int64`` scalar, ``float32 [L]`` or ``float32`` scalar). Things a user should know about how a split
was made (test = validation, carved splits) are in ``dataset.notes``, one line each.

Nothing here skips a bad sample: an unreadable or truncated image raises ``UserError`` with its path.

References: torchvision ``datasets/folder.py`` (ImageFolder class discovery and ordering);
MedMNIST v2 npz layout (Yang et al., Scientific Data 2023).
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import paddle
from PIL import Image, ImageFile

from util.errors import UserError, unknown_name_error
from util.image_ops import to_rgb

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')
SPLITS = ('train', 'val', 'test')
TASKS = ('single_label', 'multi_label', 'regression')
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

    def summary(self) -> str:
        """The options that differ from the defaults, for a log line."""
        default = DataOptions()
        return ', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in fields(self)
                         if getattr(self, f.name) != getattr(default, f.name)) or 'defaults'


def register_dataset_format(name: str) -> Callable[[type], type]:
    """Class decorator registering a dataset format under ``name``.

    The class is constructed as ``cls(split, data_path, transform, nb_classes, options=DataOptions)`` and
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


def build_dataset(split: str, data_path: str, transform: Callable | None, nb_classes: int | None = None,
                  fmt: str | None = None, options: DataOptions | None = None) -> 'RetinaDataset':
    """Build the ``split`` of the dataset at ``data_path``.

    Args:
        split: 'train', 'val' or 'test'.
        data_path: class-folder root, ``.npz`` file, table (.csv/.xlsx) or a directory of tables.
        transform: ``callable(PIL.Image RGB) -> float32 [3, H, W]`` (dual-eye data:
            ``callable([left, right]) -> float32 [2, 3, H, W]``); ``None`` gives the image as float32 in
            [0, 1] without resizing.
        nb_classes: expected number of classes (``--nb_classes``); ``None`` infers it.
        fmt: a registered format name; ``None`` picks the format from ``data_path``.
        options: format options (``DataOptions``); ``None`` = the defaults.
    """
    if split not in SPLITS:
        raise UserError(f"split {split!r}: unknown split (one of {', '.join(SPLITS)}); use one of those")
    if nb_classes is not None and (int(nb_classes) != nb_classes or nb_classes < 1):
        raise UserError(f"--nb_classes {nb_classes}: not a positive integer; pass the number of classes")
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
    return _FORMATS[fmt](split, data_path, transform, None if nb_classes is None else int(nb_classes),
                         options=options)


def load_image(path: str) -> Image.Image:
    """Open ``path`` fully (truncated files fail here, not later) and convert it to 8-bit RGB.

    High-bit-depth images (16-bit grey PNG/TIFF as OCT devices export them, 32-bit integer or float TIFF)
    are scaled to 0..255 rather than clipped; ``util.image_ops.to_rgb`` documents the mapping.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise UserError(f"{path}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (False, so truncated images "
                        f"are reported); do not set it, fix or remove broken images instead")
    try:
        with Image.open(path) as img:
            img.load()
            rgb = to_rgb(img)
            return img.copy() if rgb is img else rgb
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"{path}: cannot read image ({type(err).__name__}: {err}) (a complete "
                        f"JPEG/PNG/BMP/TIFF file); replace or delete the file") from None


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
    """

    task = 'single_label'
    num_views = 1
    format_name = ''
    test_is_val = False  # True when the data has no test split and 'test' is the val split (see ``notes``)

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

    def read(self, path: str) -> Image.Image:
        """The RGB image at ``path`` through the reader hook (default: ``load_image``)."""
        return self.reader(path) if self.reader is not None else load_image(path)

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
        """The label of sample ``index`` as the contract types it for ``self.task``."""
        if self.task == 'multi_label':
            return np.asarray(self.targets[index], dtype=np.float32)
        if self.task == 'regression':
            return np.float32(self.targets[index])
        return np.int64(self.targets[index])

    @property
    def nb_classes(self) -> int:
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
        if self.task == 'multi_label':
            return np.asarray(self.targets, dtype=np.float64).reshape(-1, k).sum(0).astype(np.int64)
        if self.task == 'regression':
            return np.bincount(np.rint(self.targets).astype(np.int64), minlength=k)
        return np.bincount(self.targets, minlength=k)

    def sample_id(self, index: int) -> str:
        """How a user finds sample ``index`` (a file path relative to the split, or an array index)."""
        return f'{self.split}[{index}]'

    def describe(self) -> str:
        """One line for the log: source, size, task and images (or positives) per class."""
        counts = ', '.join(f'{n}: {c}' for n, c in zip(self.class_names, self.class_counts()))
        unit = 'images' if self.num_views == 1 else f'samples of {self.num_views} views'
        what = {'multi_label': 'labels, positives', 'regression': 'grades'}.get(self.task, 'classes')
        return (f'{self.format_name} {self.split} ({self.data_path}): {len(self)} {unit}, {self.task}, '
                f'{len(self.class_names)} {what} ({counts})')

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.describe()})'


# the name used before the dataset layer grew multi-label, regression and dual-eye formats
ClassificationDataset = RetinaDataset


def _visible(name: str) -> bool:
    return not name.startswith('.')


def scan_images(folder: str) -> list[str]:
    """The image files under ``folder`` (any depth, sorted, hidden files and folders left out).

    Symbolic links to folders are followed (datasets are often linked in), but every real folder is read
    once: a link back to the folder being scanned or one of its ancestors (``loop -> .``), or a second link
    to a folder already read, is skipped, so a link cycle can neither multiply the images nor recurse
    until the path is too long.
    """
    real_top = os.path.realpath(folder)
    seen = {real_top}
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for d in sorted(d for d in dirnames if _visible(d)):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real in seen or real_top.startswith(real.rstrip(os.sep) + os.sep):
                continue  # already read, or an ancestor of the scanned folder (a cycle)
            seen.add(real)
            kept.append(d)
        dirnames[:] = kept
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if _visible(f) and f.lower().endswith(IMG_EXTENSIONS)]
    return found


def _class_folders(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and _visible(e.name))


# split folder names accepted, first match wins
SPLIT_FOLDERS = {'train': ('train', 'training'), 'val': ('val', 'validation'), 'test': ('test',)}


def _split_folder(data_path: str, split: str) -> str | None:
    for name in SPLIT_FOLDERS[split]:
        if os.path.isdir(os.path.join(data_path, name)):
            return name
    return None


def has_table_layout(data_path: str) -> bool:
    """A directory holding ``train.csv`` (or .xlsx/.xls): the table formats' layout, not class folders."""
    return os.path.isdir(data_path) and any(os.path.isfile(os.path.join(data_path, f'train{ext}'))
                                            for ext in ('.csv', '.xlsx', '.xls'))


@register_dataset_format('folder')
class ImageFolderDataset(RetinaDataset):
    """``<data_path>/<split>/<class>/**/*.{jpg,jpeg,png,bmp,tif,tiff}``; classes are the sorted folder
    names (torchvision ImageFolder order); hidden files and folders are ignored.

    Split folders: ``train/`` or ``training/``, ``val/`` or ``validation/``, ``test/``. A tree in the
    ``training/`` + ``validation/`` layout (the external-eye seed) has no test split by design: its test
    split is the validation folder, said in ``notes``. A ``train/`` + ``val/`` tree without ``test/`` is
    an error (that layout promises a test split, so a missing one is more likely a wrong path).

    ``options.task_type == 'regression'``: the class folders are integer grades ``0..G-1`` (G =
    ``nb_classes`` or the largest grade + 1, missing grades allowed) and targets are float32 grades.
    """

    @staticmethod
    def detect(data_path: str, options: DataOptions | None = None) -> bool:
        return os.path.isdir(data_path) and not has_table_layout(data_path)

    def __init__(self, split: str, data_path: str, transform: Callable | None, nb_classes: int | None = None,
                 options: DataOptions | None = None):
        super().__init__(split, data_path, transform)
        options = options or DataOptions()
        self.task = resolve_task(data_path, 'folder', 'single_label', ('single_label', 'regression'),
                                 options.task_type)
        folder = _split_folder(data_path, split)
        if folder is None and split == 'test' and _split_folder(data_path, 'train') == 'training':
            folder = _split_folder(data_path, 'val')
            if folder is not None:
                self.test_is_val = True
                self.notes.append(f"{data_path}: no test/ folder (training/ + validation/ layout): the test split is "
                                  f"{folder}/, so test scores are not independent of model selection")
        root = os.path.join(data_path, folder or split)
        if folder is None:
            present = _class_folders(data_path)
            names = ' or '.join(f'{n}/' for n in SPLIT_FOLDERS[split])
            raise UserError(f"{root}: split folder missing (folders {', '.join(SPLITS)} under {data_path}, "
                            f"found {present}); create {names} with one subfolder per class")
        classes = _class_folders(root)
        if not classes:
            raise UserError(f"{root}: no class folders (one subfolder per class holding its images); "
                            f"arrange the images as {folder}/<class>/<image>")
        if self.task == 'regression':
            grades = self._grades(root, classes, nb_classes)
        elif nb_classes is not None and len(classes) != nb_classes:
            raise UserError(f"{root}: found {len(classes)} class folders {classes} but --nb_classes "
                            f"{nb_classes}; pass --nb_classes {len(classes)} or "
                            f"{'add the missing folder' if len(classes) < nb_classes else 'remove the extra folder'}")
        train_folder = _split_folder(data_path, 'train')
        if split != 'train' and train_folder is not None and self.task == 'single_label':
            train_root = os.path.join(data_path, train_folder)
            train_classes = _class_folders(train_root)
            if classes != train_classes:
                only_here = sorted(set(classes) - set(train_classes))
                only_train = sorted(set(train_classes) - set(classes))
                raise UserError(f"{root}: class folders differ from {train_root} (only in {split}: "
                                f"{only_here}, only in train: {only_train}) (the same class folders in "
                                f"every split); rename or add folders so the splits match")
        samples: list[str] = []
        targets: list[float] = []
        for idx, name in enumerate(classes):
            files = self._images_in(os.path.join(root, name))
            if not files:
                raise UserError(f"{os.path.join(root, name)}: class folder has no images (at least one "
                                f"{'/'.join(e[1:] for e in IMG_EXTENSIONS)} file); add images or remove "
                                f"the folder")
            samples += files
            targets += [grades[idx] if self.task == 'regression' else idx] * len(files)
        self.root = root
        self.samples = samples
        if self.task == 'regression':
            self.class_names = [str(g) for g in range(nb_classes or max(grades) + 1)]
            self.targets = np.asarray(targets, dtype=np.float32)
        else:
            self.class_names = classes
            self.targets = np.asarray(targets, dtype=np.int64)

    @staticmethod
    def _grades(root: str, classes: list[str], nb_classes: int | None) -> list[int]:
        bad = [c for c in classes if not c.isdigit()]
        if bad:
            raise UserError(f"{root}: class folders {bad} are not integer grades (folders named 0, 1, 2, ... for "
                            f"--task_type regression); rename them or drop --task_type regression")
        grades = [int(c) for c in classes]
        if nb_classes is not None and max(grades) >= nb_classes:
            raise UserError(f"{root}: grade folder {max(grades)} is not below --nb_classes {nb_classes} (grades "
                            f"0..{nb_classes - 1}); pass --nb_classes {max(grades) + 1}")
        return grades

    @staticmethod
    def _images_in(folder: str) -> list[str]:
        return scan_images(folder)

    def load_image(self, index: int) -> Image.Image:
        return self.read(self.samples[index])

    def sample_id(self, index: int) -> str:
        return os.path.relpath(self.samples[index], self.root).replace(os.sep, '/')


@register_dataset_format('npz')
class NpzDataset(RetinaDataset):
    """A ``.npz`` with ``{split}_images`` (N,H,W,3) or (N,H,W) uint8 and ``{split}_labels`` (N,) or (N,1)
    integers (MedMNIST). Class names are '0'..'K-1', K = ``nb_classes`` or the largest label + 1 (a split
    whose largest label is below another split's is then an error asking for ``--nb_classes``);
    ``options.task_type == 'regression'`` reads the labels as grades (float32 targets)."""

    @staticmethod
    def detect(data_path: str, options: DataOptions | None = None) -> bool:
        return os.path.isfile(data_path) and data_path.lower().endswith('.npz')

    def __init__(self, split: str, data_path: str, transform: Callable | None, nb_classes: int | None = None,
                 options: DataOptions | None = None):
        super().__init__(split, data_path, transform)
        options = options or DataOptions()
        self.task = resolve_task(data_path, 'npz', 'single_label', ('single_label', 'regression'),
                                 options.task_type)
        try:
            with np.load(data_path, allow_pickle=False) as z:
                present = sorted(z.files)
                keys = (f'{split}_images', f'{split}_labels')
                missing = [k for k in keys if k not in present]
                if missing:
                    raise UserError(f"{data_path}: arrays {missing} missing (found {present}; expected "
                                    f"{keys[0]} and {keys[1]}); use a file with the {split} split or another "
                                    f"--data_path")
                images, labels = z[keys[0]], z[keys[1]]
                # the largest label of each other split: with no --nb_classes, K comes from the labels
                others = {}
                if nb_classes is None:
                    for other in SPLITS:
                        lab = z[f'{other}_labels'] if other != split and f'{other}_labels' in present else None
                        if lab is not None and lab.size and np.issubdtype(lab.dtype, np.integer):
                            others[other] = int(lab.max())
        except (OSError, ValueError) as err:
            raise UserError(f"{data_path}: cannot read the .npz file ({err}) (a numpy .npz archive); "
                            f"check the file") from None
        where = f"{data_path}[{split}_images]"
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
            raise UserError(f"{where}: shape {images.shape} dtype {images.dtype} (uint8 (N,H,W,3) or "
                            f"(N,H,W)); convert the images to uint8 RGB or grayscale")
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{data_path}[{split}_labels]: shape {labels.shape} dtype {labels.dtype} "
                            f"(integers of shape ({images.shape[0]},) or ({images.shape[0]}, 1), one per "
                            f"image); store one integer class index per image")
        if labels.size == 0:
            raise UserError(f"{where}: the {split} split is empty (at least one image); add images")
        labels = labels.astype(np.int64)
        k = nb_classes if nb_classes is not None else int(labels.max()) + 1
        bad = (labels < 0) | (labels >= k)
        if bad.any():
            raise UserError(f"{data_path}[{split}_labels]: {int(bad.sum())} labels outside [0, {k}) "
                            f"(values {sorted(set(labels[bad].tolist()))[:10]}) (class indices 0..{k - 1}"
                            f"{' for --nb_classes %d' % k if nb_classes is not None else ''}); "
                            f"pass --nb_classes {int(labels.max()) + 1} or fix the labels")
        k_all = max([k - 1, *others.values()]) + 1
        if k_all > k:
            # this split lacks the top classes: inferred on its own, it would have fewer classes than the others
            lacking = sorted(set(range(k_all)) - set(labels.tolist()))
            fuller = [s for s, top in others.items() if top + 1 == k_all]
            raise UserError(f"{data_path}[{split}_labels]: the {split} split lacks classes {lacking} (its labels "
                            f"go up to {k - 1}, but the {'/'.join(fuller)} split{'s' if len(fuller) > 1 else ''} "
                            f"{'have' if len(fuller) > 1 else 'has'} labels up to {k_all - 1}, so {k_all} classes; "
                            f"without --nb_classes the class count is each split's largest label + 1, and the "
                            f"splits would disagree); pass --nb_classes {k_all}")
        self.images = images
        self.targets = labels.astype(np.float32) if self.task == 'regression' else labels
        self.class_names = [str(i) for i in range(k)]

    def load_image(self, index: int) -> Image.Image:
        return self.prepare(Image.fromarray(self.images[index]).convert('RGB'))


# The table formats register themselves on import. The chain util.datasets -> util.datasets_csv ->
# util.datasets_odir (each importing the one before it at its top) keeps any import order working.
import util.datasets_csv  # noqa: E402,F401  (registers csv_multilabel, csv_grading, and through it odir)
