"""The ``folder`` format: ``<root>/<split>/<class>/*.png`` (torchvision ImageFolder layout and class order,
as the RETFound reference reads it); ``training/`` and ``validation/`` are accepted for train and val.

References: torchvision ``datasets/folder.py`` (ImageFolder class discovery and ordering).
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
from PIL import Image

from util.datasets.base import (
    SPLITS,
    DataOptions,
    RetinaDataset,
    has_table_layout,
    register_dataset_format,
    resolve_task,
)
from util.datasets.folds import take_folder_fold
from util.errors import UserError
from util.image_io import IMG_EXTENSIONS, is_visible, scan_images


def _class_folders(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and is_visible(e.name))


# split folder names accepted, first match wins
SPLIT_FOLDERS = {'train': ('train', 'training'), 'val': ('val', 'validation'), 'test': ('test',)}


def _split_folder(data_path: str, split: str) -> str | None:
    for name in SPLIT_FOLDERS[split]:
        if os.path.isdir(os.path.join(data_path, name)):
            return name
    return None



@register_dataset_format('folder')
class ImageFolderDataset(RetinaDataset):
    """``<data_path>/<split>/<class>/**/*.{jpg,jpeg,png,bmp,tif,tiff}``; classes are the sorted folder
    names (torchvision ImageFolder order); hidden files and folders are ignored.

    Split folders: ``train/`` or ``training/``, ``val/`` or ``validation/``, ``test/``. A tree in the
    ``training/`` + ``validation/`` layout (the external-eye seed) has no test split by design: its test
    split is the validation folder, said in ``notes``. A ``train/`` + ``val/`` tree without ``test/`` is
    an error (that layout promises a test split, so a missing one is more likely a wrong path).

    ``options.task_type == 'regression'``: the class folders are integer grades ``0..G-1`` (G =
    ``num_classes`` or the largest grade + 1, missing grades allowed) and targets are float32 grades.
    """

    @staticmethod
    def detect(data_path: str, options: DataOptions | None = None) -> bool:
        return os.path.isdir(data_path) and not has_table_layout(data_path)

    def __init__(self, split: str, data_path: str, transform: Callable | None, num_classes: int | None = None,
                 options: DataOptions | None = None):
        super().__init__(split, data_path, transform)
        options = options or DataOptions()
        self.task_type = resolve_task(data_path, 'folder', 'single_label', ('single_label', 'regression'),
                                 options.task_type)
        if options.kfold:  # every split folder pooled, then re-split by fold (util/datasets/folds.py)
            take_folder_fold(self, data_path, split, num_classes, options)
            return
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
        if self.task_type == 'regression':
            grades = self._grades(root, classes, num_classes)
        elif num_classes is not None and len(classes) != num_classes:
            raise UserError(f"{root}: found {len(classes)} class folders {classes} but --nb_classes "
                            f"{num_classes}; pass --nb_classes {len(classes)} or "
                            f"{'add the missing folder' if len(classes) < num_classes else 'remove the extra folder'}")
        train_folder = _split_folder(data_path, 'train')
        if split != 'train' and train_folder is not None and self.task_type == 'single_label':
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
            targets += [grades[idx] if self.task_type == 'regression' else idx] * len(files)
        self.root = root
        self.samples = samples
        if self.task_type == 'regression':
            self.class_names = [str(g) for g in range(num_classes or max(grades) + 1)]
            self.targets = np.asarray(targets, dtype=np.float32)
        else:
            self.class_names = classes
            self.targets = np.asarray(targets, dtype=np.int64)

    @staticmethod
    def _grades(root: str, classes: list[str], num_classes: int | None) -> list[int]:
        bad = [c for c in classes if not c.isdigit()]
        if bad:
            raise UserError(f"{root}: class folders {bad} are not integer grades (folders named 0, 1, 2, ... for "
                            f"--task_type regression); rename them or drop --task_type regression")
        grades = [int(c) for c in classes]
        if num_classes is not None and max(grades) >= num_classes:
            raise UserError(f"{root}: grade folder {max(grades)} is not below --nb_classes {num_classes} (grades "
                            f"0..{num_classes - 1}); pass --nb_classes {max(grades) + 1}")
        return grades

    @staticmethod
    def _images_in(folder: str) -> list[str]:
        return scan_images(folder)

    def load_image(self, index: int) -> Image.Image:
        return self.read(self.samples[index])

    def sample_id(self, index: int) -> str:
        return os.path.relpath(self.samples[index], self.root).replace(os.sep, '/')
