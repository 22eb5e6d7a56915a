"""One way to apply a fine-tuned model, whatever it was saved as: ``load_predictor(path)`` takes a checkpoint
written by ``main_finetune.py`` (run in Paddle's dygraph) or a folder written by ``export.py`` and gives a
``Predictor`` that reads images, runs the model and turns its outputs into decisions and result rows.
``predict.py`` and ``serve.py`` both go through it, so an image gets the same row from either, and the same
probabilities as ``--eval`` on the same checkpoint.

Everything comes from what the model was saved with (``RunIdentity``: model, classes, input size, pooling,
fundus preprocessing, normalisation; the thresholds tuned on validation; the ``--calibrate`` temperature).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from util.errors import UserError
from util.exported import EXPORT_LAYOUT, EXPORT_LAYOUT_VERSION, EXPORT_METADATA, paddle_runner

BACKENDS = ("auto", "dygraph", "paddle", "onnxruntime")
PRECISIONS = ("fp32", "bf16")


def add_backend_flags(parser, threads: int) -> None:
    """``--backend``, ``--precision`` and ``--threads``, as predict.py and serve.py take them (``threads``: the
    default the help names)."""
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="auto: dygraph for a checkpoint, Paddle Inference for an exported folder")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="exported models: bf16 on CPUs with it in hardware (avx512_bf16 / amx_bf16)")
    parser.add_argument("--threads", default=None, type=int,
                        help=f"CPU math threads (default {threads}: OMP_NUM_THREADS, else this process's cores, "
                             "at most 8)")


@dataclass
class Predictor:
    """A model ready to apply. ``run(batch)`` maps a float32 batch [N, 3, H, W] (dual-eye [N, 2, 3, H, W]) of
    preprocessed inputs to float32 logits [N, outputs]; everything else is shared by every backend."""

    identity: object  # util.inference.RunIdentity
    thresholds: np.ndarray | None
    temperature: float | None
    num_views: int
    run: Callable[[np.ndarray], np.ndarray]
    backend: str = "dygraph"
    precision: str = "fp32"
    source: str = ""
    model: object = None  # the dygraph Layer (``--explain`` needs it); None for exported backends
    _inputs: tuple = field(default=None, repr=False)

    @property
    def task(self):
        import engine_finetune as engine

        return engine.get_task(self.identity.task_type)

    @property
    def class_names(self) -> list:
        return list(self.identity.class_names)

    def _reader(self):
        if self._inputs is None:
            from util.transforms.assemble import eval_inputs

            self._inputs = eval_inputs(self.num_views, self.identity.data_cfg(), self.identity.preprocessing())
        return self._inputs

    def load(self, item) -> np.ndarray:
        """The model's input for one item: an image path, or a (left, right) pair of paths for dual-eye
        models (or already opened PIL images in place of paths), preprocessed as in the run's evaluation."""
        reader, transform = self._reader()
        if self.num_views == 2:
            left, right = item
            return transform([_read(reader, left), _read(reader, right)])
        return transform(_read(reader, item))

    def outputs(self, batch: np.ndarray) -> np.ndarray:
        """The task's outputs (probabilities / continuous grade) as float64 [N, outputs], uncalibrated."""
        import paddle

        logits = self.run(np.ascontiguousarray(batch, dtype=np.float32))
        return self.task.activation(paddle.to_tensor(np.asarray(logits, np.float32))).numpy().astype(np.float64)

    def decide(self, outputs: np.ndarray, fixed_thresholds: bool = False):
        """(calibrated outputs, decisions, thresholds used): the ``--calibrate`` temperature applied and the
        tuned thresholds moved with it (``fixed_thresholds``: the default cuts instead of the tuned ones)."""
        from util.metrics.calibration import calibrate_outputs

        thresholds = None if fixed_thresholds else self.thresholds
        outputs, thresholds = calibrate_outputs(outputs, thresholds, self.temperature, self.task.name)
        return outputs, self.task.predict(outputs, self.identity.num_classes, thresholds), thresholds

    def columns(self) -> list:
        """The result columns after the file name(s): the decision, then the outputs."""
        return self.task.result_columns(self.class_names)

    def row(self, decision, outputs_i) -> list:
        return self.task.result_row(self.class_names, decision, outputs_i)

    def confidence(self, outputs_i) -> str:
        """The top-class probability (single-label), the most probable label's (multi-label); empty for
        regression, whose output is a grade, not a probability."""
        if self.task.name == "regression":
            return ""
        return f"{float(np.max(outputs_i)):.6f}"

    def results(self, outputs: np.ndarray, fixed_thresholds: bool = False) -> list[dict]:
        """One result row per input as a dict: ``prediction``, ``confidence``, then the outputs (the columns
        of ``columns()`` with ``confidence`` after the decision); what predict.py writes and serve.py returns."""
        outputs, decisions, _ = self.decide(outputs, fixed_thresholds)
        names = self.columns()
        rows = []
        for decision, out in zip(decisions, outputs):
            cells = dict(zip(names, self.row(decision, out)))
            rows.append({"prediction": cells.pop("prediction"), "confidence": self.confidence(out), **cells})
        return rows


def _read(reader, item):
    if isinstance(item, (str, os.PathLike)):
        return reader(os.fspath(item))
    from util.image_io import to_rgb

    process = getattr(reader, "process", None)  # FundusReader: the run's fundus preprocessing (no cache)
    return process(item) if process is not None else to_rgb(item)


def load_predictor(path: str, backend: str = "auto", precision: str = "fp32", threads: int | None = None,
                   device: str = "cpu") -> Predictor:
    """A ``Predictor`` for ``path``: a checkpoint (``.pdparams``) or a folder written by ``export.py``.
    ``backend``: ``dygraph`` (checkpoints), ``paddle`` (Paddle Inference) or ``onnxruntime`` (exported
    folders); ``auto`` picks dygraph for a checkpoint and Paddle Inference for a folder."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if os.path.isdir(path):
        return _load_exported(path, backend, precision, threads)
    if backend not in ("auto", "dygraph"):
        raise UserError(f"--backend {backend}: runs an exported model; export the checkpoint first "
                        f"(python export.py --resume {path} --output DIR) and pass --resume DIR")
    if precision != "fp32":
        raise UserError(f"--precision {precision}: runs an exported model through Paddle Inference; export the "
                        f"checkpoint first (python export.py --resume {path} --output DIR) and pass --resume DIR")
    return _load_checkpoint(path, device)


def _load_checkpoint(path: str, device: str) -> Predictor:
    import paddle

    import engine_finetune as engine
    from models import create_model
    from models.pretrained import load_state_dict_strict
    from util.inference import RunIdentity, select_device
    from util.outputs.checkpoint import read_toolkit_checkpoint

    state = read_toolkit_checkpoint(path)
    if state is None or "inference" not in state["meta"]:
        raise UserError(f"--resume {path}: not a checkpoint written by this toolkit's training (it has no "
                        "model description); pass <run folder>/checkpoint-best.pdparams")
    identity = RunIdentity.from_meta(state["meta"])
    select_device(device)
    task = engine.get_task(identity.task_type)
    model = create_model(identity.model, num_classes=task.num_outputs(identity.num_classes),
                         global_pool=identity.global_pool, input_size=identity.input_size)
    load_state_dict_strict(model, state["model"], path)
    model.eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with paddle.no_grad():
            return model(paddle.to_tensor(batch)).astype("float32").numpy()

    thresholds = state.get("thresholds")
    return Predictor(identity=identity, thresholds=None if thresholds is None else np.asarray(thresholds),
                     temperature=state.get("temperature"), num_views=model.num_views, run=run,
                     backend="dygraph", source=path, model=model)


def _load_exported(path: str, backend: str, precision: str, threads: int | None) -> Predictor:
    """A folder written by ``export.py``: its ``model.json`` says what the model is, ``inference.json`` +
    ``inference.pdiparams`` (Paddle Inference) or ``model.onnx`` (ONNX Runtime) run it."""
    import json

    from util.inference import RunIdentity

    export_hint = "export the checkpoint with python export.py --resume CHECKPOINT --output DIR and pass --resume DIR"
    meta_path = os.path.join(path, EXPORT_METADATA)
    if not os.path.isfile(meta_path):
        found = sorted(os.listdir(path))[:5]
        raise UserError(f"--resume {path}: a folder without model.json, so not a model exported by export.py "
                        f"(it holds {found or 'nothing'}); pass a checkpoint (.pdparams) or {export_hint}")
    try:
        with open(meta_path, encoding="utf8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{meta_path}: could not be read ({type(exc).__name__}: {exc}); {export_hint} again") from exc
    if not isinstance(info, dict) or info.get("layout") != EXPORT_LAYOUT or "meta" not in info:
        raise UserError(f"{meta_path}: not the model.json export.py writes (expected layout {EXPORT_LAYOUT!r}, "
                        f"found {info.get('layout') if isinstance(info, dict) else type(info).__name__!r}); "
                        f"{export_hint}")
    if int(info.get("layout_version", 0)) > EXPORT_LAYOUT_VERSION:
        raise UserError(f"{meta_path}: written by a newer toolkit (export layout version {info['layout_version']}, "
                        f"this one reads up to {EXPORT_LAYOUT_VERSION}); update the toolkit or export again with it")
    try:
        identity = RunIdentity.from_meta(info["meta"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{meta_path}: its model description is incomplete ({type(exc).__name__}: {exc}); "
                        f"{export_hint} again") from exc
    if backend == "dygraph":
        raise UserError(f"--backend dygraph: runs a checkpoint, and {path} is an exported model; pass the "
                        f"checkpoint it was exported from ({info.get('source_checkpoint', {}).get('file', '?')}) "
                        "or --backend paddle / onnxruntime")
    if backend == "onnxruntime":
        if precision != "fp32":
            raise UserError(f"--precision {precision}: runs through Paddle Inference (oneDNN); pass --backend paddle "
                            "or --precision fp32")
        if not info.get("onnx") or not os.path.isfile(os.path.join(path, info["onnx"])):
            raise UserError(f"--backend onnxruntime: {path} has no ONNX model; export with --onnx (python export.py "
                            f"--resume CHECKPOINT --output {path} --onnx --overwrite) or pass --backend paddle")
        from util.onnx_backend import onnx_runner

        run, backend = onnx_runner(path, threads), "onnxruntime"
    else:
        prefix = os.path.join(path, os.path.splitext(info.get("program", "inference.json"))[0])
        run, backend = paddle_runner(prefix, precision=precision, threads=threads), "paddle"
    thresholds, temperature = info.get("thresholds"), info.get("temperature")
    return Predictor(identity=identity, thresholds=None if thresholds is None else np.asarray(thresholds),
                     temperature=temperature, num_views=int(info.get("num_views", 1)), run=run, backend=backend,
                     precision=precision, source=path, model=None)
