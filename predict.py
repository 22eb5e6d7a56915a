"""Apply a fine-tuned checkpoint to new images and write one row per image to a CSV.

    python predict.py --resume output_dir/dr_regression_effv2m/checkpoint-best.pdparams \
        --input new_images/ --output result.csv
    python predict.py --resume RUN/checkpoint-best.pdparams --input pairs.csv --output result.csv   # dual-eye

Everything the model needs comes from the checkpoint this toolkit wrote: the model name and size, the task,
the class names, the preprocessing (fundus crop, resize) and the eval transform, and the decision thresholds
tuned on validation (``--fixed_thresholds`` uses the default cuts instead). Single-view models read every
image under a folder (recursively) or one image; dual-eye models read a paired table (.csv/.xlsx) with
the left/right image columns the ``odir`` format recognises (``left``/``right``, ``left_image``/``right_image``,
``Left-Fundus``/``Right-Fundus``), paths resolved as that format resolves them.

The output has ``file`` and ``prediction`` (class name / grade; for multi-label the ';'-joined positive
labels) then the task's outputs (probabilities per class or label; the continuous grade for regression).
The DR seed's ``result.csv`` (image name, predicted grade) is the first two columns.

``--explain rollout|gradcam`` also writes, per image, a heat map of what the model looked at
(``util/explain.py``: attention rollout for ViT models, Grad-CAM for every model): ``<name>.png`` (the map
over the preprocessed input) and ``<name>.npy`` (the raw map in [0, 1]) in ``--explain_dir`` (default
``<output stem>_explain/`` next to ``--output``), and an ``explanation`` column with the PNG's path.

References: the DR-grading seed system's predict step (README.md, Seed systems).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import warnings

import numpy as np

from util.errors import UserError
from util.threads import math_threads

MATH_THREADS = math_threads()  # before Paddle's import, handed to it after (util/threads.py)
warnings.filterwarnings("ignore", message="No ccache found")


def find_images(path: str) -> list[str]:
    """The image at ``path``, or every image under the folder ``path`` as the class-folder dataset finds
    them (``util.image_io.scan_images``: sorted, hidden entries left out, linked folders followed, each real
    folder read once so a link cycle does not repeat images)."""
    from util.image_io import IMG_EXTENSIONS, scan_images

    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"--input {path}: no such file or folder; pass a folder of images or an image file")
    found = scan_images(path)
    if not found:
        raise UserError(f"--input {path}: no images found (expected {', '.join(IMG_EXTENSIONS)} files); "
                        "check the folder")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", required=True, help="checkpoint-best.pdparams written by main_finetune.py")
    p.add_argument("--input", required=True, help="image folder or file (dual-eye: a table with left and right image columns)")
    p.add_argument("--output", default="result.csv", help="CSV to write")
    p.add_argument("--batch_size", default=16, type=int)
    p.add_argument("--fixed_thresholds", action="store_true",
                   help="use the default cuts (0.5 / grade midpoints) instead of the thresholds tuned on val")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
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

    paddle.base.core.set_num_threads(MATH_THREADS)

    import engine_finetune as engine
    from models import create_model
    from models.pretrained import load_state_dict_strict
    from util.datasets.odir import read_image_pairs
    from util.fileio import atomic_path, display_path
    from util.inference import RunIdentity, select_device
    from util.metrics.calibration import calibrate_outputs
    from util.outputs.checkpoint import read_toolkit_checkpoint
    from util.progress import Progress
    from util.transforms.assemble import eval_inputs

    state = read_toolkit_checkpoint(a.resume)
    if state is None or "inference" not in state["meta"]:
        raise UserError(f"--resume {a.resume}: not a checkpoint written by this toolkit's training (it has no "
                        "model description); pass <run folder>/checkpoint-best.pdparams")
    if a.batch_size < 1:
        raise UserError(f"--batch_size {a.batch_size}: expected 1 or more; pass a positive batch size")
    identity = RunIdentity.from_meta(state["meta"])
    select_device(a.device)
    task = engine.get_task(identity.task_type)
    num_classes, class_names = identity.num_classes, list(identity.class_names)
    model = create_model(identity.model, num_classes=task.num_outputs(num_classes), global_pool=identity.global_pool,
                         input_size=identity.input_size)
    load_state_dict_strict(model, state["model"], a.resume)
    model.eval()
    thresholds = None if a.fixed_thresholds else state.get("thresholds")
    explainer, target = None, None
    if a.explain:
        from util.explain import ExplanationWriter, check_method, resolve_target

        check_method(a.explain, model)
        target = resolve_target(a.explain_class, class_names, model.num_outputs, a.explain)
        explain_dir = a.explain_dir or os.path.splitext(a.output)[0] + "_explain"
        explainer = ExplanationWriter(explain_dir, a.explain, identity.mean, identity.std, class_names)
    elif a.explain_class is not None or a.explain_dir is not None:
        raise UserError("--explain_class / --explain_dir: given without --explain (they set what the heat maps "
                        "show and where they go); add --explain gradcam or --explain rollout")
    # the same reader and eval transform as the run's own evaluation
    reader, transform = eval_inputs(model.num_views, identity.data_cfg(), identity.preprocessing())
    if model.num_views == 2:
        items = read_image_pairs(a.input)

        def load(item):
            return transform([reader(item[0]), reader(item[1])])

        names = [display_path(f"{os.path.basename(left)}|{os.path.basename(right)}") for left, right in items]
    else:
        items = find_images(a.input)

        def load(item):
            return transform(reader(item))

        base = a.input if os.path.isdir(a.input) else os.path.dirname(a.input)
        names = [display_path(os.path.relpath(f, base).replace(os.sep, "/")) for f in items]

    outputs, pngs = [], []
    starts = range(0, len(items), a.batch_size)
    # on stderr, so that stdout keeps the result line; a bar on a terminal, else a line every 30 s
    with paddle.no_grad(), Progress(len(starts), "Predict", stream=sys.stderr, leave=True) as progress:
        for step, start in enumerate(starts):
            batch = np.stack([load(it) for it in items[start:start + a.batch_size]])
            logits = model(paddle.to_tensor(batch)).astype("float32")
            outputs.append(task.activation(logits).numpy().astype(np.float64))
            if explainer is not None:   # Grad-CAM turns gradients back on for its own forward
                written = explainer.write(model, batch, names[start:start + len(batch)], target)
                pngs += [display_path(png) for _, png in written]
            progress.update(step, images=len(batch))
    outputs = np.concatenate(outputs)
    # the temperature --calibrate fitted on val: calibrated probabilities, thresholds moved with them
    outputs, thresholds = calibrate_outputs(outputs, thresholds, state.get("temperature"), task.name)
    preds = task.predict(outputs, num_classes, thresholds)
    with atomic_path(a.output, suffix=".csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf8") as f:
            w = csv.writer(f)
            w.writerow(["file"] + task.result_columns(class_names) + (["explanation"] if explainer is not None else []))
            for i, (n, pr, out) in enumerate(zip(names, preds, outputs)):
                w.writerow([n] + task.result_row(class_names, pr, out) + ([pngs[i]] if explainer is not None else []))
    print(f"wrote {len(items)} predictions to {a.output}"
          + (" (thresholds tuned on val)" if thresholds is not None else ""))
    if explainer is not None:
        print(f"wrote {len(pngs)} {a.explain} heat maps (.png, .npy) to {display_path(explainer.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
