"""Seeded subsampling of the training split (``--dataratio``, ``--stratified``): data-efficiency runs.

What is drawn matches the RETFound reference's ``build_dataset``: only the train split is subsampled (val and
test stay whole), a ratio of 1 keeps everything, and the seed is the run's ``--seed`` (so every process of a
run draws the same subset, and another seed draws another one).

* uniform: ``max(1, int(n * ratio))`` samples (rounded down, as the reference's ``int``);
* ``--stratified``: per class, ``max(1, round(n_c * ratio))`` samples (Python's ``round``, halves to even, as the
  reference), so class proportions are kept and no class disappears. The class is the label (single-label),
  the rounded grade (regression) or, for multi-label data, the label combination, rare combinations pooled by
  their rarest label (``splits._stratum_keys``, the strata of the split carving; the reference has no
  multi-label data).

Difference from the reference, stated: the draw is numpy's (``default_rng(seed).permutation``, per class in
class order for ``--stratified``), not ``torch.randperm``, so the counts are the reference's but the chosen
images are not the same ones; and the kept samples stay in dataset order (the train sampler shuffles them
anyway). One useful property follows from drawing a permutation and keeping a prefix: with the same seed,
the subset of a smaller ratio is contained in that of a larger one (``0.1`` within ``0.3`` within ``1.0``).

``SubsetDataset`` is the subset as a dataset of the same kind: same classes, task and views, its own
``targets``; images are read by the full dataset (its reader), and the transform is the full dataset's (set
through either), so that what the reader decodes is sized for it.

References: rmaphoh/RETFound ``util/datasets.py`` (``build_dataset``, ``_stratified_indices``).
"""
from __future__ import annotations

import math

import numpy as np

from util.adaptation import parse_dataratio
from util.datasets.base import RetinaDataset
from util.datasets.splits import _stratum_keys


def _strata(targets: np.ndarray, task_type: str, ratio: float) -> list:
    if task_type == "multi_label":
        return _stratum_keys(np.asarray(targets, dtype=np.float64).reshape(len(targets), -1),
                             math.ceil(1.0 / ratio))
    return [int(v) for v in np.rint(np.asarray(targets, dtype=np.float64))]


def subsample_indices(targets, task_type: str, ratio: float, stratified: bool, seed: int) -> np.ndarray:
    """Sorted indices of the samples kept at ``ratio`` (see the module docstring); all of them at ratio 1."""
    n = len(targets)
    if ratio >= 1.0 or n == 0:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    if not stratified:
        return np.sort(rng.permutation(n)[:max(1, int(n * ratio))])
    keys = _strata(np.asarray(targets), task_type, ratio)
    members: dict = {}
    for i, k in enumerate(keys):
        members.setdefault(k, []).append(i)
    keep = []
    for k in sorted(members, key=str):
        idx = np.asarray(members[k])
        take = max(1, int(round(len(idx) * ratio)))
        keep.append(idx[rng.permutation(len(idx))[:take]])
    return np.sort(np.concatenate(keep))


class SubsetDataset(RetinaDataset):
    """The samples ``indices`` of ``base`` (a ``RetinaDataset``), as a dataset of the same kind."""

    def __init__(self, base: RetinaDataset, indices: np.ndarray, note: str = ""):
        self.base = base  # first: the reader property below writes through to it
        super().__init__(base.split, base.data_path, base.transform)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.task_type, self.num_views, self.format_name = base.task_type, base.num_views, base.format_name
        self.test_is_val = base.test_is_val
        self.class_names = list(base.class_names)
        self.targets = np.asarray(base.targets)[self.indices]
        self.notes = list(base.notes) + ([note] if note else [])

    @property
    def reader(self):
        return self.base.reader

    @property
    def transform(self):
        """The base's transform: the base reads the images, and its reduced JPEG decode (``--jpeg_draft``) is
        sized by the transform set here after subsampling."""
        return self.base.transform

    @transform.setter
    def transform(self, value) -> None:
        self.base.transform = value

    @property
    def jpeg_draft(self) -> bool:
        return self.base.jpeg_draft

    @jpeg_draft.setter
    def jpeg_draft(self, value: bool) -> None:
        self.base.jpeg_draft = value

    @reader.setter
    def reader(self, value) -> None:
        self.base.reader = value

    @property
    def samples(self) -> list | None:
        """The base's ``samples`` (file paths, for the image check) of the kept indices."""
        own = getattr(self.base, "samples", None)
        return None if own is None else [own[i] for i in self.indices]

    def load_image(self, index: int):
        return self.base.load_image(int(self.indices[index]))

    def sample_id(self, index: int) -> str:
        return self.base.sample_id(int(self.indices[index]))


def subsample_split(dataset: RetinaDataset, ratio: float | str, stratified: bool, seed: int,
                    say=print) -> RetinaDataset:
    """``dataset`` at ``ratio`` of its samples (itself at ratio 1), saying what was kept. ``ratio``: a number
    or the text of one ``--dataratio`` value (a list is several runs: ``util.protocol.ratios.run_ratio_sweep``)."""
    ratios = parse_dataratio(ratio)
    if len(ratios) != 1:
        raise ValueError(f"subsample_split: one ratio per run, got {ratio!r}")
    ratio = ratios[0]
    if ratio >= 1.0:
        return dataset
    keep = subsample_indices(dataset.targets, dataset.task_type, ratio, stratified, seed)
    how = "stratified by class" if stratified else "uniformly"
    note = (f"{dataset.split} split subsampled {how} to {len(keep)} of {len(dataset)} samples (--dataratio "
            f"{ratio:g}{' --stratified' if stratified else ''}, --seed {seed})")
    sub = SubsetDataset(dataset, keep, note)
    say(f"note: {note}: " + ", ".join(f"{c} {k}" for c, k in zip(sub.class_names, sub.class_counts())))
    return sub
