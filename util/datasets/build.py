"""The datasets of a run: every split built by its format, checked against each other, and the train split
subsampled for ``--dataratio`` (``subsample.py``)."""
from __future__ import annotations

from util.datasets.base import DataOptions, build_dataset
from util.datasets.subsample import subsample_split
from util.errors import UserError


def build_splits(data_path: str, splits, num_classes: int | None = None, fmt: str | None = None,
                 options: DataOptions | None = None, say=print) -> dict:
    """``build_dataset`` for each of ``splits``, checked against each other (same classes and task), with each
    split's description, notes and missing-class warnings said once."""
    datasets = {split: build_dataset(split, data_path, None, num_classes=num_classes, fmt=fmt, options=options)
                for split in splits}
    first = datasets[splits[0]]
    class_names = list(first.class_names)
    said = set()
    for split, ds in datasets.items():
        if list(ds.class_names) != class_names or ds.task_type != first.task_type:
            raise UserError(f"{data_path}/{split}: classes {list(ds.class_names)} ({ds.task_type}) differ from "
                            f"{splits[0]}'s {class_names} ({first.task_type}); use the same classes in every split")
        say(ds.describe())
        for note in getattr(ds, "notes", []):
            if note not in said:  # the splits of one table share their notes
                said.add(note)
                say(note if note.startswith("warning: ") else f"note: {note}")
        missing = [c for c, n in zip(ds.class_names, ds.class_counts()) if n == 0]
        if missing and split != "train":
            say(f"warning: {split} split has no {'positive ' if ds.task_type == 'multi_label' else ''}images of "
                f"class(es) {missing}: their AUROC is undefined (NaN) on it")
    if "train" in datasets and options is not None:  # --dataratio: a seeded subset of the training split
        datasets["train"] = subsample_split(datasets["train"], options.dataratio, options.stratified, options.seed, say)
    return datasets
