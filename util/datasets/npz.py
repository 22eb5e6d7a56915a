"""The ``npz`` format: ``{split}_images`` / ``{split}_labels`` arrays in one ``.npz`` file (MedMNIST layout).

References: MedMNIST v2 npz layout (Yang et al., Scientific Data 2023).
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
from PIL import Image

from util.datasets.base import SPLITS, DataOptions, RetinaDataset, register_dataset_format, resolve_task
from util.errors import UserError


@register_dataset_format('npz')
class NpzDataset(RetinaDataset):
    """A ``.npz`` with ``{split}_images`` (N,H,W,3) or (N,H,W) uint8 and ``{split}_labels`` (N,) or (N,1)
    integers (MedMNIST). Class names are '0'..'K-1', K = ``num_classes`` or the largest label + 1 (a split
    whose largest label is below another split's is then an error asking for ``--nb_classes``);
    ``options.task_type == 'regression'`` reads the labels as grades (float32 targets)."""

    @staticmethod
    def detect(data_path: str, options: DataOptions | None = None) -> bool:
        return os.path.isfile(data_path) and data_path.lower().endswith('.npz')

    def __init__(self, split: str, data_path: str, transform: Callable | None, num_classes: int | None = None,
                 options: DataOptions | None = None):
        super().__init__(split, data_path, transform)
        options = options or DataOptions()
        self.task_type = resolve_task(data_path, 'npz', 'single_label', ('single_label', 'regression'),
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
                if num_classes is None:
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
        k = num_classes if num_classes is not None else int(labels.max()) + 1
        bad = (labels < 0) | (labels >= k)
        if bad.any():
            raise UserError(f"{data_path}[{split}_labels]: {int(bad.sum())} labels outside [0, {k}) "
                            f"(values {sorted(set(labels[bad].tolist()))[:10]}) (class indices 0..{k - 1}"
                            f"{' for --nb_classes %d' % k if num_classes is not None else ''}); "
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
        self.targets = labels.astype(np.float32) if self.task_type == 'regression' else labels
        self.class_names = [str(i) for i in range(k)]

    def load_image(self, index: int) -> Image.Image:
        return self.prepare(Image.fromarray(self.images[index]).convert('RGB'))


# The table formats register themselves on import. The chain util.datasets -> util.datasets.csv_formats ->
# util.datasets.odir (each importing the one before it at its top) keeps any import order working.
