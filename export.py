"""Export a fine-tuned checkpoint for deployment: a static program that Paddle Inference (and, with --onnx,
ONNX Runtime) runs without the training code's dygraph model.

    python export.py --resume output_dir/RUN/checkpoint-best.pdparams --output deploy/RUN
    python predict.py --resume deploy/RUN --input new_images/ --output result.csv

The folder holds ``inference.json`` + ``inference.pdiparams`` (the program and its weights, Paddle's PIR
format), with ``--onnx`` also ``model.onnx``, and ``model.json``: everything applying the model needs (the
run's identity as the checkpoint stores it, the task, class names, tuned thresholds, ``--calibrate``
temperature, input size and shape, normalisation, pooling, fundus preprocessing), plus where it came from
(the checkpoint's file name and SHA-256, the toolkit's commit, Paddle's version, the time).

Before the folder is put in place the export checks itself: a few fixed inputs go through the dygraph model
and through the exported program in Paddle Inference (as ``predict.py`` will run it), and the export fails,
leaving no folder, when the logits differ by more than 1e-5 (relative to the logits' scale when it is above
1). The folder is built beside ``--output`` and renamed into place at the end, so an interrupted export
never leaves a folder that looks complete. An existing export is replaced only with ``--overwrite``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

from util.blas import select_mkl
from util.errors import UserError
from util.exported import EXPORT_LAYOUT as LAYOUT
from util.exported import EXPORT_LAYOUT_VERSION as LAYOUT_VERSION
from util.exported import EXPORT_METADATA as METADATA
from util.threads import math_threads

MATH_THREADS = math_threads()  # before Paddle's import, handed to it after (util/threads.py)
select_mkl()  # before Paddle's import: its matrix products on the current MKL (util/blas.py)
warnings.filterwarnings("ignore", message="No ccache found")

PREFIX = "inference"          # inference.json + inference.pdiparams
ONNX_FILE = "model.onnx"
PARITY_TOLERANCE = 1e-5
PARITY_INPUTS = 2


def _jsonable(value):
    """numpy scalars and arrays (as the checkpoint reader may return them) as plain JSON values."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_output(out_dir: str, checkpoint: str, overwrite: bool) -> bool:
    """Whether ``out_dir`` exists (empty, or an export ``--overwrite`` may replace); otherwise raise."""
    if not os.path.lexists(out_dir):
        return False
    if not os.path.isdir(out_dir):
        raise UserError(f"--output {out_dir}: exists and is not a folder; pass a new folder name")
    entries = os.listdir(out_dir)
    if not entries:
        return True
    if not overwrite:
        raise UserError(f"--output {out_dir}: the folder is not empty ({len(entries)} entries); pass --overwrite to "
                        "replace an earlier export there, or choose a new folder")
    if not os.path.isfile(os.path.join(out_dir, METADATA)):
        raise UserError(f"--output {out_dir}: not empty and not an export (no {METADATA}); --overwrite only "
                        "replaces a folder export.py wrote, so choose a new or empty folder")
    inside = os.path.commonpath([os.path.realpath(out_dir), os.path.realpath(checkpoint)])
    if inside == os.path.realpath(out_dir):
        raise UserError(f"--output {out_dir}: holds the checkpoint {checkpoint} being exported, which replacing it "
                        "would delete; choose another folder")
    return True


def _parity(model, runner, input_shape: list, say) -> dict:
    """Run ``PARITY_INPUTS`` fixed inputs through the dygraph ``model`` and ``runner``; raise when they differ."""
    import numpy as np
    import paddle

    # standard normal values: the range normalised images have; fixed, so every export checks the same inputs
    x = np.random.default_rng(0).standard_normal([PARITY_INPUTS] + list(input_shape[1:])).astype(np.float32)
    with paddle.no_grad():
        ref = model(paddle.to_tensor(x)).astype("float32").numpy()
    out = runner(x)
    if out.shape != ref.shape:
        raise UserError(f"export check: the exported program returned logits of shape {list(out.shape)}, the model "
                        f"{list(ref.shape)}; report this with the model name")
    diff = float(np.abs(out.astype(np.float64) - ref).max())
    scale = float(np.abs(ref).max())
    tolerance = PARITY_TOLERANCE * max(1.0, scale)
    say(f"  max|logit difference| {diff:.3g} over {PARITY_INPUTS} inputs (logits up to {scale:.3g}; tolerance "
        f"{tolerance:.3g})")
    if not np.isfinite(out).all() or not diff <= tolerance:
        raise UserError(f"export check: the exported program's logits differ from the model's by {diff:.3g} (more "
                        f"than {tolerance:.3g}), so its predictions could not be trusted; no export was written. "
                        "Report this with the model name and Paddle version")
    return {"max_abs_logit_diff": diff, "max_abs_logit": scale, "tolerance": tolerance, "inputs": PARITY_INPUTS}


def export_checkpoint(checkpoint: str, out_dir: str, onnx: bool = False, overwrite: bool = False, *,
                      threads: int | None = None, say=None) -> dict:
    """Export ``checkpoint`` (written by ``main_finetune.py``) to the folder ``out_dir``; returns the metadata
    written to ``out_dir/model.json``. ``threads``: Paddle Inference's math threads for the check (default
    ``util.exported.default_threads()``); ``say(line)`` shows the progress lines (default: printed)."""
    import numpy as np
    import paddle

    import engine_finetune as engine
    from models import create_model
    from models.pretrained import load_state_dict_strict
    from util.exported import input_shape_of, paddle_runner, save_static
    from util.inference import RunIdentity, select_device
    from util.outputs.checkpoint import read_toolkit_checkpoint
    from util.outputs.provenance import code_version, file_sha256
    from util.progress import format_duration

    say = say or _print
    out_dir = os.path.normpath(out_dir)
    replace = _check_output(out_dir, checkpoint, overwrite)
    start = time.time()
    say(f"export: reading {checkpoint} ...")
    state = read_toolkit_checkpoint(checkpoint)
    if state is None or "inference" not in state["meta"]:
        raise UserError(f"--resume {checkpoint}: not a checkpoint written by this toolkit's training (it has no "
                        "model description); pass <run folder>/checkpoint-best.pdparams")
    identity = RunIdentity.from_meta(state["meta"])
    select_device("cpu")
    task = engine.get_task(identity.task_type)
    model = create_model(identity.model, num_classes=task.num_outputs(identity.num_classes),
                         global_pool=identity.global_pool, input_size=identity.input_size)
    load_state_dict_strict(model, state.pop("model"), checkpoint)   # popped: a ViT-L's weights are 1.2 GB
    model.eval()
    input_shape = input_shape_of(model, identity.input_size)
    thresholds, temperature = state.get("thresholds"), state.get("temperature")

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.export-", dir=parent)
    try:
        saving = time.time()
        say(f"export: saving {identity.model} (input {input_shape[1:]}) as a static program ...")
        save_static(model, os.path.join(tmp, PREFIX), input_shape)
        say(f"  saved in {format_duration(time.time() - saving)}")
        say("export: checking the program in Paddle Inference against the model ...")
        checking = time.time()
        parity = {"paddle": _parity(model, paddle_runner(os.path.join(tmp, PREFIX), threads=threads), input_shape,
                                    say)}
        say(f"  checked in {format_duration(time.time() - checking)}")
        meta = {
            "layout": LAYOUT,
            "layout_version": LAYOUT_VERSION,
            "program": PREFIX + ".json",
            "weights": PREFIX + ".pdiparams",
            "onnx": None,
            "meta": _jsonable(state["meta"]),
            "model": identity.model,
            "task": identity.task_type,
            "class_names": list(identity.class_names),
            "num_outputs": int(model.num_outputs),
            "thresholds": None if thresholds is None else [float(t) for t in np.asarray(thresholds).reshape(-1)],
            "temperature": None if temperature is None else float(temperature),
            "input_size": identity.input_size,
            "input_shape": input_shape,
            "input_name": "x",
            "num_views": int(model.num_views),
            "mean": list(identity.mean),
            "std": list(identity.std),
            "interpolation": identity.interpolation,
            "crop_pct": identity.crop_pct,
            "global_pool": identity.global_pool,
            "preprocessing": identity.preprocessing(),
            "source_checkpoint": {"file": os.path.basename(checkpoint), "sha256": file_sha256(checkpoint),
                                  "epoch": _jsonable(state.get("epoch"))},
            "toolkit_version": code_version(),
            "paddle_version": paddle.__version__,
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "parity": parity,
        }
        _write_json(os.path.join(tmp, METADATA), meta)
        if onnx:
            meta.update(_export_onnx(model, tmp, input_shape, threads, parity, say))
            _write_json(os.path.join(tmp, METADATA), meta)
        _move_into_place(tmp, out_dir, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"exported {identity.model} to {out_dir} in {format_duration(time.time() - start)} "
        f"({', '.join(sorted(os.listdir(out_dir)))})")
    return meta


def _print(line: str) -> None:
    print(line, flush=True)


def _export_onnx(model, folder: str, input_shape: list, threads: int | None, parity: dict, say) -> dict:
    try:
        from util.onnx_backend import export_onnx, onnx_runner
    except ImportError as exc:
        raise UserError(f"--onnx: the ONNX export could not be loaded ({exc}); install the packages of "
                        "requirements.txt (paddle2onnx, onnxruntime) or export without --onnx") from exc
    start = time.time()
    say("export: converting the program to ONNX ...")
    path = export_onnx(folder)
    say(f"  converted in {time.time() - start:.1f}s; checking it in ONNX Runtime against the model ...")
    parity["onnxruntime"] = _parity(model, onnx_runner(folder, threads), input_shape, say)
    return {"onnx": os.path.relpath(path, folder).replace(os.sep, "/"), "parity": parity}


def _write_json(path: str, obj: dict) -> None:
    from util.fileio import atomic_path

    with atomic_path(path, suffix=".json") as tmp:
        with open(tmp, "w", encoding="utf8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")


def _move_into_place(tmp: str, out_dir: str, replace: bool) -> None:
    """Rename the finished folder ``tmp`` to ``out_dir``; an existing one (empty, or an export being
    overwritten) is moved aside first and removed once the new one is in place."""
    old = None
    if replace:
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(tmp))
        os.rmdir(old)
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if old is not None:   # put the earlier export back
            os.rename(old, out_dir)
        raise
    os.chmod(out_dir, 0o777 & ~_umask())
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", required=True, help="checkpoint-best.pdparams written by main_finetune.py")
    p.add_argument("--output", required=True, help="folder to write (new or empty; see --overwrite)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (for --backend onnxruntime)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    a = p.parse_args(argv)
    try:
        import paddle

        paddle.base.core.set_num_threads(MATH_THREADS)
        export_checkpoint(a.resume, a.output, onnx=a.onnx, overwrite=a.overwrite, threads=MATH_THREADS)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
