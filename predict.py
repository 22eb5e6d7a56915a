"""Apply a fine-tuned model to new images and write one row per image to a CSV.

    python predict.py --resume output_dir/dr_regression_effv2m/checkpoint-best.pdparams \
        --input new_images/ --output result.csv
    python predict.py --resume RUN/checkpoint-best.pdparams --input images.csv --output result.csv
    python predict.py --resume RUN/checkpoint-best.pdparams --input pairs.csv --output result.csv   # dual-eye

``--resume`` is a checkpoint written by ``main_finetune.py`` or a folder written by ``export.py``; the model
goes through ``util.deploy.load_predictor`` (``--backend``, ``--precision``, ``--threads``), the one path
``serve.py`` takes too, so an image gets the same row from either. Everything the model needs comes from
what it was saved with: the model, the task, the class names, the preprocessing and eval transform, the
decision thresholds tuned on validation (``--fixed_thresholds``: the default cuts) and the ``--calibrate``
temperature.

``--input`` is one of:

- a folder: every image under it (recursively, as the class-folder dataset finds them);
- one image file;
- a table (.csv/.xlsx/.xls) listing images in a column named like image/file/path/filename/Image_File
  (``--image_col`` names it), paths relative to the table's folder or the image folder beside it, as the
  table dataset formats resolve them (``--image_root`` to point elsewhere);
- for a dual-eye model, a paired table: a left and a right image column per patient (``left``/``right``,
  ``left_image``/``right_image``, ODIR's ``Left-Fundus``/``Right-Fundus``); a single-view model given such a
  table predicts every eye image listed in it.

The output has ``file`` (the path relative to the folder, or as the table lists it; ``left|right`` for a
pair), ``prediction`` (class name / grade; multi-label: the ';'-joined positive labels), ``confidence``
(the top-class probability; empty for regression), the task's outputs (the probability of every class or
label; the continuous grade for regression) and ``error``. The DR seed's ``result.csv`` (image name,
predicted grade) is the first two columns. A file that cannot be used (missing, empty, truncated, not an
image, a path leading outside the table's folder) is a row with its reason in ``error`` and empty outputs,
and the run goes on (``--strict``: stop at the first, exit status 2). The CSV is written atomically.

A table that also carries labels in a format the dataset readers understand (a grading table for a
regression or grade-classification model, 0/1 label columns for a multi-label one, an ODIR table) is
scored as ``main_finetune.py --eval`` scores its test split: the labels read by the same readers, the same
calibration, ``task.metrics`` with the checkpoint's thresholds, over the rows that could be read; the
metrics go to ``<output stem>_metrics.json`` and the headline numbers are printed (``--no_metrics``: skip).
Labels that do not fit the model (another task, classes it does not know) give a warning, not an error:
the predictions are still written.

``--explain rollout|gradcam`` also writes, per image, a heat map of what the model looked at
(``util/explain.py``: attention rollout for ViT models, Grad-CAM for every model): ``<name>.png`` (the map
over the preprocessed input) and ``<name>.npy`` (the raw map in [0, 1]) in ``--explain_dir`` (default
``<output stem>_explain/`` next to ``--output``), and an ``explanation`` column with the PNG's path. It
needs the model's layers: a checkpoint, not an exported folder.

References: the DR-grading seed system's predict step (README.md, Seed systems).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from util.errors import UserError
from util.threads import available_cores, math_threads

MATH_THREADS = math_threads()  # before Paddle's import, handed to it after (util/threads.py)
warnings.filterwarnings("ignore", message="No ccache found")

DECODE_THREADS = 4  # at most: images are decoded and transformed by this many threads while the model runs


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


# ----------------------------------------------------------------------------- inputs

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


# ----------------------------------------------------------------------------- running

def reason_of(paths: tuple, err: Exception) -> str:
    """Why an input could not be read: ``check_image``'s diagnosis of the first file it finds at fault
    (empty, not an image, truncated, ...), else the error's own text."""
    from util.image_check import check_image

    for k, path in enumerate(paths):
        why = check_image(path)
        if why is not None:
            return f"{('left', 'right')[k]}: {why}" if len(paths) == 2 else why
    text = str(err)
    for path in paths:
        text = text.removeprefix(f"{path}: ")
    return text


def load_one(predictor, item: Item):
    """(model input, '') or (None, reason): one bad file stays one bad row."""
    if item.error:
        return None, item.error
    try:
        return predictor.load(item.paths[0] if len(item.paths) == 1 else item.paths), ""
    except (UserError, OSError, ValueError) as err:
        return None, reason_of(item.paths, err)


def run(predictor, items: list[Item], batch_size: int, strict: bool, explainer=None, target=None):
    """Outputs (float64 [N, outputs], NaN rows for the items that could not be read), the reason per item and
    the heat map per item (``explainer``). Items are decoded by a few threads, one batch ahead of the model."""
    from util.fileio import display_path
    from util.progress import Progress

    n_out = predictor.task.num_outputs(predictor.identity.num_classes)
    outputs = np.full((len(items), n_out), np.nan)
    errors, pngs = [""] * len(items), [""] * len(items)
    starts = list(range(0, len(items), batch_size))
    workers = max(1, min(DECODE_THREADS, available_cores(), batch_size))
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            Progress(len(starts), "Predict", stream=sys.stderr, leave=True) as progress:
        def submit(start):
            return [pool.submit(load_one, predictor, it) for it in items[start:start + batch_size]]

        pending = submit(starts[0]) if starts else []
        for step, start in enumerate(starts):
            current = pending
            pending = submit(starts[step + 1]) if step + 1 < len(starts) else []
            good, arrays = [], []
            for k, future in enumerate(current):
                x, why = future.result()
                if x is None:
                    if strict:
                        for f in pending:
                            f.cancel()
                        raise UserError(f"{items[start + k].name}: {why} (--strict: every input readable); "
                                        "replace or remove it, or drop --strict to write it as a row with the "
                                        "reason in the error column")
                    errors[start + k] = why
                else:
                    good.append(start + k)
                    arrays.append(x)
            if arrays:
                batch = np.stack(arrays)
                outputs[good] = predictor.outputs(batch)
                if explainer is not None:  # Grad-CAM turns gradients back on for its own forward
                    written = explainer.write(predictor.model, batch, [items[i].name for i in good], target)
                    for i, (_, png) in zip(good, written):
                        pngs[i] = display_path(png)
            progress.update(step, images=len(arrays))
    return outputs, errors, pngs


# ----------------------------------------------------------------------------- metrics

def _plain(value):
    """``value`` as JSON: numpy to Python, NaN/inf to null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def score(predictor, items: list[Item], outputs: np.ndarray, read: list[int], labels: Labels,
          fixed_thresholds: bool) -> dict:
    """The task's metrics over the items that were read, as ``engine_finetune.evaluate`` computes them for
    ``--eval``: calibrated outputs, the thresholds moved with them, ``task.metrics``; for data with a subset
    of the model's classes the same matching (single-label: relabelled, macro averages over the classes
    present; multi-label: the labels present)."""
    task = predictor.task
    good = [i for i in read if items[i].label_at is not None]
    y = np.stack([labels.targets[items[i].label_at] for i in good]).astype(np.float64)
    y = task.decode_labels(y.reshape(len(good), -1))
    calibrated, _, thresholds = predictor.decide(outputs[good], fixed_thresholds)
    num_classes, extra = predictor.identity.num_classes, {}
    if labels.index is not None and task.name == "multi_label":
        calibrated = calibrated[:, labels.index]
        thresholds = None if thresholds is None else np.asarray(thresholds)[labels.index]
        num_classes = len(labels.index)
    elif labels.index is not None:  # single-label: the data's class indices among the model's
        y = np.asarray(labels.index, dtype=np.int64)[y]
        extra = {"classes": sorted(labels.index)}
    metrics = task.metrics(y, calibrated, num_classes, labels.class_names, thresholds, **extra)
    return {"metrics": {c: metrics[c] for c in task.columns if c in metrics},
            "images": len(good), "labels": labels.source,
            "thresholds": None if thresholds is None else [float(t) for t in thresholds],
            "temperature": predictor.temperature,
            "details": {k: v for k, v in metrics.items() if k not in task.columns}}


# ----------------------------------------------------------------------------- the command

def main(argv: list[str] | None = None) -> int:
    from util.deploy import BACKENDS, PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", required=True,
                   help="checkpoint-best.pdparams written by main_finetune.py, or a folder written by export.py")
    p.add_argument("--input", required=True,
                   help="image folder, image file, or table (.csv/.xlsx) listing images (dual-eye: left and right "
                        "image columns)")
    p.add_argument("--output", default="result.csv", help="CSV to write")
    p.add_argument("--batch_size", default=16, type=int)
    p.add_argument("--fixed_thresholds", action="store_true",
                   help="use the default cuts (0.5 / grade midpoints) instead of the thresholds tuned on val")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first input that cannot be read (exit status 2) instead of writing it as a "
                        "row with the reason in the error column")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto: dygraph for a checkpoint, Paddle Inference for an exported folder")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="exported models: bf16 on CPUs with it")
    p.add_argument("--threads", default=None, type=int,
                   help=f"CPU math threads (default {MATH_THREADS}: OMP_NUM_THREADS, else this process's cores, "
                        "at most 8)")
    t = p.add_argument_group("tables", "how a table given as --input is read (as the dataset formats' flags)")
    t.add_argument("--image_col", default=None, help="the column of image paths (default: found by name)")
    t.add_argument("--left_col", default=None, help="paired tables: the left eye's image column")
    t.add_argument("--right_col", default=None, help="paired tables: the right eye's image column")
    t.add_argument("--image_root", default=None,
                   help="the folder the table's image paths are relative to (default: the table's folder or the "
                        "image folder beside it)")
    t.add_argument("--allow_outside_paths", action="store_true",
                   help="let the table's paths lead outside --image_root / the table's folder")
    t.add_argument("--sheet", default=None, help=".xlsx: the sheet holding the table (default: the first)")
    t.add_argument("--label_cols", default=None, help="multi-label: the label columns to score against")
    t.add_argument("--grade_col", default=None, help="grading: the grade column to score against")
    t.add_argument("--no_metrics", action="store_true", help="do not score the table's labels")
    p.add_argument("--explain", default=None, choices=["rollout", "gradcam"],
                   help="also write a heat map per image: attention rollout (ViT models) or Grad-CAM (any model)")
    p.add_argument("--explain_class", default=None, metavar="NAME_OR_INDEX",
                   help="the class Grad-CAM explains (default: the predicted class; multi-label: the most "
                        "probable label)")
    p.add_argument("--explain_dir", default=None,
                   help="folder for the heat maps (default: <output stem>_explain next to --output)")
    a = p.parse_args(argv)
    try:
        return predict(a)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


def predict(a) -> int:
    import paddle

    from util.datasets.base import DataOptions
    from util.datasets.tables import is_table_file
    from util.deploy import load_predictor
    from util.fileio import atomic_path, display_path

    if a.batch_size < 1:
        raise UserError(f"--batch_size {a.batch_size}: expected 1 or more; pass a positive batch size")
    if a.threads is not None and a.threads < 1:
        raise UserError(f"--threads {a.threads}: expected 1 or more; pass a positive thread count")
    if os.path.exists(a.input) and os.path.realpath(a.output) == os.path.realpath(a.input):
        raise UserError(f"--output {a.output}: the same file as --input (it would be overwritten); pass another "
                        "--output")
    paddle.base.core.set_num_threads(a.threads or MATH_THREADS)
    predictor = load_predictor(a.resume, a.backend, a.precision, a.threads, a.device)
    identity, task = predictor.identity, predictor.task
    explainer, target = None, None
    if a.explain:
        from util.explain import ExplanationWriter, check_method, resolve_target

        if predictor.model is None:
            raise UserError(f"--explain {a.explain}: needs the model's layers (Grad-CAM and attention rollout run "
                            f"it with gradients), but --resume {a.resume} is an exported model ({predictor.backend}); "
                            "pass the checkpoint it was exported from (checkpoint-best.pdparams) with --explain")
        check_method(a.explain, predictor.model)
        target = resolve_target(a.explain_class, predictor.class_names, predictor.model.num_outputs, a.explain)
        explain_dir = a.explain_dir or os.path.splitext(a.output)[0] + "_explain"
        explainer = ExplanationWriter(explain_dir, a.explain, identity.mean, identity.std, predictor.class_names)
    elif a.explain_class is not None or a.explain_dir is not None:
        raise UserError("--explain_class / --explain_dir: given without --explain (they set what the heat maps "
                        "show and where they go); add --explain gradcam or --explain rollout")

    labels = None
    if is_table_file(a.input):
        options = DataOptions(image_col=a.image_col, left_col=a.left_col, right_col=a.right_col,
                              image_root=a.image_root, allow_outside_paths=a.allow_outside_paths, sheet=a.sheet,
                              label_cols=a.label_cols, grade_col=a.grade_col).validate()
        items, src, cols = table_items(a.input, predictor.num_views, options)
        if not a.no_metrics:
            labels = table_labels(a.input, src, cols, predictor.num_views, identity, options, a.resume)
    elif predictor.num_views == 2:
        raise UserError(f"--input {a.input}: a dual-eye model needs a table (.csv/.xlsx) with a left and a right "
                        "image column (one row per patient); pass such a table")
    else:
        items = image_items(a.input)

    outputs, errors, pngs = run(predictor, items, a.batch_size, a.strict, explainer, target)
    good = [i for i, e in enumerate(errors) if not e]
    rows = predictor.results(outputs[good], a.fixed_thresholds) if good else []
    result = dict(zip(good, rows))
    columns = ["prediction", "confidence"] + [c for c in predictor.columns() if c != "prediction"]
    with atomic_path(a.output, suffix=".csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf8") as f:
            w = csv.writer(f)
            w.writerow(["file"] + columns + ["error"] + (["explanation"] if explainer is not None else []))
            for i, item in enumerate(items):
                cells = [result[i][c] for c in columns] if i in result else [""] * len(columns)
                w.writerow([item.name] + cells + [errors[i]] + ([pngs[i]] if explainer is not None else []))
    tuned = predictor.thresholds is not None and not a.fixed_thresholds
    print(f"wrote {len(items)} rows to {display_path(a.output)}" + (" (thresholds tuned on val)" if tuned else ""))
    if explainer is not None:
        print(f"wrote {len(good)} {a.explain} heat maps (.png, .npy) to {display_path(explainer.out_dir)}")

    metrics_path = os.path.splitext(a.output)[0] + "_metrics.json"
    scored = labels is not None and any(items[i].label_at is not None for i in good)
    if scored:
        report = {"input": a.input, "model": a.resume, "task": task.name, "not_read": len(items) - len(good),
                  **score(predictor, items, outputs, good, labels, a.fixed_thresholds)}
        with atomic_path(metrics_path, suffix=".json") as tmp:
            with open(tmp, "w", encoding="utf8") as f:
                json.dump(_plain(report), f, indent=2)
        for note in labels.notes:
            print(f"note: {note}")
        m = report["metrics"]
        head = ", ".join(f"{k} {m[k]:.4f}" for k in task.headline if k in m)
        print(f"metrics on {report['images']} labelled images ({labels.source}): {head}; all in "
              f"{display_path(metrics_path)}")
    elif os.path.isfile(metrics_path):  # an older run's metrics beside this run's predictions would mislead
        os.remove(metrics_path)
        print(f"note: removed {display_path(metrics_path)} (an earlier run's metrics; this input has no labels)")
    bad = len(items) - len(good)
    print(f"{len(good)} predicted, {bad} could not be read (see the error column)" if bad else
          f"{len(good)} predicted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
