"""What ``predict.py`` reads: the items of its ``--input`` (a folder or an image, a table listing images, a
paired/ODIR table for dual-eye models), each with the file(s) to read or why it cannot be, and the labels of a
labelled table, read by the toolkit's own dataset formats so that the scores are those ``--eval`` gives.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from util.errors import UserError


@dataclass
class Item:
    """One row of the output: what the ``file`` column shows, the file(s) to read (one, or left and right),
    why it cannot be predicted (``''``: it can), and where its label is in the table's labels."""
    name: str
    paths: tuple = ()
    error: str = ""
    label_at: tuple | None = None  # (table row,) or (table row, eye)


@dataclass
class Labels:
    """Ground truth for the items of a labelled table, as ``--eval`` would score it."""
    source: str  # how they were read, for the console and the metrics file
    targets: np.ndarray  # per table row (per eye for a paired table read per eye: [rows, 2, ...])
    class_names: list  # the names the metrics report
    index: list | None = None  # the data's classes among the model's (``match_eval_classes``), None: the same
    notes: list = field(default_factory=list)


def find_images(path: str) -> list[str]:
    """The image at ``path``, or every image under the folder ``path`` as the class-folder dataset finds
    them (``util.image_io.scan_images``: sorted, hidden entries left out, linked folders followed, each real
    folder read once so a link cycle does not repeat images)."""
    from util.image_io import IMG_EXTENSIONS, scan_images

    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"--input {path}: no such file or folder; pass a folder of images, an image file or a "
                        "table (.csv/.xlsx) listing images")
    found = scan_images(path)
    if not found:
        raise UserError(f"--input {path}: no images found (expected {', '.join(IMG_EXTENSIONS)} files); "
                        "check the folder")
    return found


def image_items(path: str) -> list[Item]:
    from util.fileio import display_path

    files = find_images(path)
    base = path if os.path.isdir(path) else os.path.dirname(path)
    return [Item(display_path(os.path.relpath(f, base).replace(os.sep, "/")), (f,)) for f in files]


def table_items(path: str, num_views: int, options) -> tuple[list[Item], object, tuple]:
    """The items of a table (one per row; per listed eye for a single-view model given a paired table), the
    ``TableSource`` and the image columns. Missing files and paths leaving the table's folder are items with
    an error; blank image cells, and a table where none of the first listed images exists (its paths are
    relative to another folder), are a ``UserError``."""
    from util.datasets.csv_formats import TableDataset
    from util.datasets.image_paths import ImageResolver, clean_path, is_inside
    from util.datasets.odir import PairedEyeDataset
    from util.datasets.tables import TableSource, find_split_col, guess_image_col, paired_columns, require_column
    from util.fileio import display_path

    src = TableSource(path, options.sheet)
    df = src.frame
    left, right = paired_columns(df)
    left = require_column(df, path, options.left_col, "--left_col") if options.left_col else left
    right = require_column(df, path, options.right_col, "--right_col") if options.right_col else right
    paired = left is not None and right is not None and not options.image_col
    if num_views == 2 and not paired:
        raise UserError(f"{path}: a dual-eye model needs a left and a right image column (one row per patient; "
                        f"e.g. 'left' and 'right', 'left_image' and 'right_image', or ODIR's 'Left-Fundus' and "
                        f"'Right-Fundus'; columns found: {', '.join(df.columns)}); rename the columns or pass "
                        "--left_col and --right_col")
    if paired:
        cols, subfolders = (left, right), PairedEyeDataset.image_subfolders
    else:
        image_col = options.image_col and require_column(df, path, options.image_col, "--image_col")
        cols = (image_col or guess_image_col(df, path, {find_split_col(df, path, options)} - {None}),)
        subfolders = TableDataset.image_subfolders
    cells = list(zip(*(df[c].str.strip().to_numpy() for c in cols)))
    if not (num_views == 1 and paired):  # (read per eye, a blank eye cell is an eye not taken)
        blank = [i for i, row in enumerate(cells) if not all(row)]
        if blank:
            raise UserError(f"{path}: {len(blank)} row{'s' if len(blank) > 1 else ''} without "
                            f"{'both eye images' if paired else 'an image path'} "
                            f"({src.rows_text(blank)}; header = row 1) (a path in every {' and '.join(map(repr, cols))} "
                            "cell); fill the cells or delete those rows")
    resolver = ImageResolver(path, [p for row in cells for p in row if p], options.image_root, src.table_dir,
                             subfolders)
    base = options.image_root or src.table_dir
    sides = ("left", "right")

    def where(listed: str) -> tuple[str | None, str]:
        found = resolver.resolve(listed)
        target = found or resolver.target(listed)
        if not options.allow_outside_paths and not is_inside(target, base):
            return None, (f"the path leads outside {os.path.realpath(base)} (the folder the table's paths are "
                          "relative to); pass --image_root, or --allow_outside_paths if the table is trusted")
        return found, "" if found else f"file not found: {display_path(target)}"

    items = []
    for i, row in enumerate(cells):
        if num_views == 1 and paired:  # every eye image on its own
            for eye, listed in enumerate(row):
                if listed:
                    found, error = where(listed)
                    items.append(Item(display_path(clean_path(listed)), (found,), error, (i, eye)))
            continue
        name = display_path("|".join(clean_path(p) for p in row))
        files, errors = [], []
        for k, listed in enumerate(row):
            found, error = where(listed)
            files.append(found)
            if error:
                errors.append(f"{sides[k]}: {error}" if len(row) == 2 else error)
        items.append(Item(name, tuple(files), "; ".join(errors), (i,)))
    return items, src, cols


def table_labels(path: str, src, cols: tuple, num_views: int, identity, options, model: str) -> Labels | None:
    """The table's labels read by the dataset format that fits the model's task (``odir`` for a paired table,
    ``csv_multilabel`` for a multi-label model, ``csv_grading`` otherwise), with the checkpoint's classes
    matched by name as ``--eval`` matches them. ``None``: the table has no label columns, or its labels do
    not fit the model (said in a warning)."""
    from util.datasets.csv_formats import GradingCsvDataset, MultiLabelCsvDataset
    from util.datasets.odir import ODIR_CLASSES, PairedEyeDataset, per_eye_label_columns
    from util.datasets.tables import find_split_col, numeric_columns
    from util.outputs.checkpoint import match_eval_classes

    df, task, model_classes = src.frame, identity.task_type, list(identity.class_names)
    paired = len(cols) == 2
    exclude = set(cols) | ({find_split_col(df, path, options)} - {None})
    candidates = numeric_columns(df, exclude) + list(per_eye_label_columns(df, exclude) if paired else [])
    if not (options.label_cols or options.grade_col or candidates):
        return None  # a plain list of images
    label_cols = options.label_cols
    if label_cols is None and task == "multi_label":  # the model's label columns, when the table has them
        label_cols = [c for c in model_classes if c in df.columns] or None
        if paired and label_cols and set(label_cols) <= set(ODIR_CLASSES):
            label_cols = None  # an ODIR table: its own label columns and keywords
    if paired:
        cls, mode = PairedEyeDataset, "dual" if num_views == 2 else "per_eye"
    else:
        cls, mode = (MultiLabelCsvDataset if task == "multi_label" else GradingCsvDataset), "dual"
    opts = type(options)(**{**vars(options), "label_cols": label_cols, "eye_mode": mode,
                            "image_col": None if paired else cols[0], "left_col": cols[0] if paired else None,
                            "right_col": cols[1] if paired else None,
                            "task_type": task if cls is GradingCsvDataset else None})
    try:
        # the format's own parsing and validation of every row, without its splits and image checks
        ds = cls.read_rows(path, src, opts.validate(), identity.num_classes if cls is GradingCsvDataset else None)
        if ds.task_type != task:
            raise UserError(f"{path}: the labels are {ds.task_type} but the model is {task}")
        index = match_eval_classes({"class_names": model_classes}, list(ds.class_names), task, path, model)
    except UserError as err:
        print(f"warning: no metrics: the table's labels do not fit the model ({err}); the predictions are "
              "written all the same", flush=True)
        return None
    targets = ds._eye_targets if mode == "per_eye" else ds._row_targets
    what = {"multi_label": "labels", "regression": "grades"}.get(task, "classes")
    column = getattr(ds, "grade_col", None)
    source = (f"grade column {column!r}" if column else f"{what} {', '.join(map(str, ds.class_names))}")
    names = model_classes if index is not None and task == "single_label" else list(ds.class_names)
    # the format's notes about splitting do not apply here: every row is scored
    return Labels(source + (" per eye" if mode == "per_eye" else ""), np.asarray(targets), names, index,
                  [n for n in ds.notes if "split" not in n])
