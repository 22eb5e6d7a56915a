"""Datasets: image classification data in the formats the toolkit reads, validated when built.

Formats are registered by name (``@register_dataset_format('folder')``) and picked from ``data_path``
by ``build_dataset``: a directory is a class-folder tree ``<root>/<split>/<class>/*.png`` (torchvision
ImageFolder layout and class order, as the RETFound reference uses), a ``.npz`` file holds
``{split}_images`` / ``{split}_labels`` arrays (MedMNIST layout). Each dataset describes itself through
``task``, ``class_names``, ``num_views`` and ``targets``; ``__getitem__`` returns
``(float32 [3, H, W], int64 label)``.

Nothing here skips a bad sample: an unreadable or truncated image raises ``UserError`` with its path.

References: torchvision ``datasets/folder.py`` (ImageFolder class discovery and ordering);
MedMNIST v2 npz layout (Yang et al., Scientific Data 2023).
"""
from __future__ import annotations

import abc
import os
from typing import Callable

import numpy as np
import paddle
from PIL import Image, ImageFile

from util.errors import UserError, unknown_name_error

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')
SPLITS = ('train', 'val', 'test')

_FORMATS: dict[str, type] = {}


def register_dataset_format(name: str) -> Callable[[type], type]:
    """Class decorator registering a dataset format under ``name``.

    The class is constructed as ``cls(split, data_path, transform, nb_classes)`` and provides a
    ``detect(data_path) -> bool`` staticmethod used by ``build_dataset`` to pick the format.
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


def build_dataset(split: str, data_path: str, transform: Callable | None,
                  nb_classes: int | None = None, fmt: str | None = None) -> 'ClassificationDataset':
    """Build the ``split`` of the dataset at ``data_path``.

    Args:
        split: 'train', 'val' or 'test'.
        data_path: class-folder root or ``.npz`` file (or whatever a registered format detects).
        transform: ``callable(PIL.Image RGB) -> float32 [3, H, W]``; ``None`` gives the image as
            float32 in [0, 1] without resizing.
        nb_classes: expected number of classes (``--nb_classes``); ``None`` infers it.
        fmt: a registered format name; ``None`` picks the format from ``data_path``.
    """
    if split not in SPLITS:
        raise UserError(f"split {split!r}: unknown split (one of {', '.join(SPLITS)}); use one of those")
    if nb_classes is not None and (int(nb_classes) != nb_classes or nb_classes < 1):
        raise UserError(f"--nb_classes {nb_classes}: not a positive integer; pass the number of classes")
    if not data_path or not os.path.exists(data_path):
        raise UserError(f"{data_path}: data path does not exist (a class-folder root with "
                        f"{'/'.join(SPLITS)} subfolders or a .npz file); check --data_path")
    if fmt is None:
        found = [name for name, cls in _FORMATS.items() if cls.detect(data_path)]
        if not found:
            raise UserError(f"{data_path}: no dataset format recognises this path (registered: "
                            f"{', '.join(list_dataset_formats())}: a directory of class folders or a .npz "
                            f"file); point --data_path at one of those")
        fmt = found[0]
    elif fmt not in _FORMATS:
        raise unknown_name_error('dataset format', fmt, _FORMATS)
    return _FORMATS[fmt](split, data_path, transform, None if nb_classes is None else int(nb_classes))


def load_image(path: str) -> Image.Image:
    """Open ``path`` fully (truncated files fail here, not later) and convert it to RGB."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise UserError(f"{path}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (False, so truncated images "
                        f"are reported); do not set it, fix or remove broken images instead")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert('RGB')
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"{path}: cannot read image ({type(err).__name__}: {err}) (a complete "
                        f"JPEG/PNG/BMP/TIFF file); replace or delete the file") from None


def _to_unit_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)


class ClassificationDataset(paddle.io.Dataset, abc.ABC):
    """Single-label image classification; subclasses fill ``class_names``, ``targets`` and
    implement ``load_image(i)``."""

    task = 'single_label'
    num_views = 1
    format_name = ''

    def __init__(self, split: str, data_path: str, transform: Callable | None):
        super().__init__()
        self.split = split
        self.data_path = data_path
        self.transform = transform
        self.class_names: list[str] = []
        self.targets = np.zeros(0, dtype=np.int64)

    @staticmethod
    def detect(data_path: str) -> bool:
        return False

    @abc.abstractmethod
    def load_image(self, index: int) -> Image.Image:
        """The image of sample ``index`` as RGB (raise ``UserError`` naming the file when unreadable)."""

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.int64]:
        img = self.load_image(index)
        x = self.transform(img) if self.transform is not None else _to_unit_array(img)
        return x, np.int64(self.targets[index])

    @property
    def nb_classes(self) -> int:
        return len(self.class_names)

    def check_images(self) -> int:
        """Decode every image once; raise one ``UserError`` listing all unreadable files.

        Worth calling before training on a new folder: Paddle 3.3's DataLoader does not surface an
        exception raised in ``__getitem__`` well (with ``num_workers=0`` its reader thread dies and the
        loop blocks; with workers the main process gets a generic SystemError and the path only on
        stderr). Returns the number of images checked.
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
        return np.bincount(self.targets, minlength=len(self.class_names))

    def sample_id(self, index: int) -> str:
        """How a user finds sample ``index`` (a file path relative to the split, or an array index)."""
        return f'{self.split}[{index}]'

    def describe(self) -> str:
        """One line for the log: source, size and images per class."""
        counts = ', '.join(f'{n}: {c}' for n, c in zip(self.class_names, self.class_counts()))
        return (f'{self.format_name} {self.split} ({self.data_path}): {len(self)} images, '
                f'{len(self.class_names)} classes ({counts})')

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.describe()})'


def _visible(name: str) -> bool:
    return not name.startswith('.')


def _class_folders(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and _visible(e.name))


@register_dataset_format('folder')
class ImageFolderDataset(ClassificationDataset):
    """``<data_path>/<split>/<class>/**/*.{jpg,jpeg,png,bmp,tif,tiff}``; classes are the sorted folder
    names (torchvision ImageFolder order); hidden files and folders are ignored."""

    @staticmethod
    def detect(data_path: str) -> bool:
        return os.path.isdir(data_path)

    def __init__(self, split: str, data_path: str, transform: Callable | None, nb_classes: int | None = None):
        super().__init__(split, data_path, transform)
        root = os.path.join(data_path, split)
        if not os.path.isdir(root):
            present = _class_folders(data_path)
            raise UserError(f"{root}: split folder missing (folders {', '.join(SPLITS)} under {data_path}, "
                            f"found {present}); create {split}/ with one subfolder per class")
        classes = _class_folders(root)
        if not classes:
            raise UserError(f"{root}: no class folders (one subfolder per class holding its images); "
                            f"arrange the images as {split}/<class>/<image>")
        if nb_classes is not None and len(classes) != nb_classes:
            raise UserError(f"{root}: found {len(classes)} class folders {classes} but --nb_classes "
                            f"{nb_classes}; pass --nb_classes {len(classes)} or "
                            f"{'add the missing folder' if len(classes) < nb_classes else 'remove the extra folder'}")
        train_root = os.path.join(data_path, 'train')
        if split != 'train' and os.path.isdir(train_root):
            train_classes = _class_folders(train_root)
            if classes != train_classes:
                only_here = sorted(set(classes) - set(train_classes))
                only_train = sorted(set(train_classes) - set(classes))
                raise UserError(f"{root}: class folders differ from {train_root} (only in {split}: "
                                f"{only_here}, only in train: {only_train}) (the same class folders in "
                                f"every split); rename or add folders so the splits match")
        self.class_names = classes
        samples: list[str] = []
        targets: list[int] = []
        for idx, name in enumerate(classes):
            files = self._images_in(os.path.join(root, name))
            if not files:
                raise UserError(f"{os.path.join(root, name)}: class folder has no images (at least one "
                                f"{'/'.join(e[1:] for e in IMG_EXTENSIONS)} file); add images or remove "
                                f"the folder")
            samples += files
            targets += [idx] * len(files)
        self.samples = samples
        self.targets = np.asarray(targets, dtype=np.int64)

    @staticmethod
    def _images_in(folder: str) -> list[str]:
        found = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if _visible(d))
            found += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if _visible(f) and f.lower().endswith(IMG_EXTENSIONS)]
        return found

    def load_image(self, index: int) -> Image.Image:
        return load_image(self.samples[index])

    def sample_id(self, index: int) -> str:
        return os.path.relpath(self.samples[index], os.path.join(self.data_path, self.split)).replace(os.sep, '/')


@register_dataset_format('npz')
class NpzDataset(ClassificationDataset):
    """A ``.npz`` with ``{split}_images`` (N,H,W,3) or (N,H,W) uint8 and ``{split}_labels`` (N,) or (N,1)
    integers (MedMNIST). Class names are '0'..'K-1', K = ``nb_classes`` or the largest label + 1."""

    @staticmethod
    def detect(data_path: str) -> bool:
        return os.path.isfile(data_path) and data_path.lower().endswith('.npz')

    def __init__(self, split: str, data_path: str, transform: Callable | None, nb_classes: int | None = None):
        super().__init__(split, data_path, transform)
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
        self.images = images
        self.targets = labels
        self.class_names = [str(i) for i in range(k)]

    def load_image(self, index: int) -> Image.Image:
        arr = self.images[index]
        return Image.fromarray(arr).convert('RGB')
