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

import numpy as np

from util.blas import select_mkl
from util.errors import UserError
from util.predict_inputs import Item, Labels, image_items, table_items, table_labels
from util.threads import available_cores, math_threads

MATH_THREADS = math_threads()  # before Paddle's import, handed to it after (util/threads.py)
select_mkl()  # before Paddle's import: its matrix products on the current MKL (util/blas.py)
warnings.filterwarnings("ignore", message="No ccache found")

DECODE_THREADS = 4  # at most: images are decoded and transformed by this many threads while the model runs


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
    from util.deploy import add_backend_flags

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
    add_backend_flags(p, MATH_THREADS)
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
