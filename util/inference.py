"""What applying a model needs, shared by training, ``--eval`` and ``predict.py``: the device (and whether AMP
can run on it) and the run's identity, the typed record of what a checkpoint is (model, classes, input size,
pooling, preprocessing, normalisation) stored in every checkpoint as ``meta``.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass

import paddle

from util.distributed import get_world_size
from util.errors import UserError


@dataclass
class AmpConfig:
    enabled: bool = False
    dtype: str = "float16"

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=True, dtype=self.dtype, level="O1")


def select_device(requested: str = "auto", amp: bool = False, amp_dtype: str = "float16",
                  say=print) -> tuple[str, AmpConfig]:
    """Pick the device (``auto`` prefers a visible GPU), set it, and say whether AMP can run on it."""
    has_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if requested == "gpu" and not has_gpu:
        raise UserError("--device gpu: no CUDA device is visible (a GPU was requested); install "
                        "paddlepaddle-gpu and check the driver, or pass --device cpu")
    device = "gpu" if (requested == "gpu" or (requested == "auto" and has_gpu)) else "cpu"
    if device == "gpu":
        multi = get_world_size() > 1
        paddle.set_device(f"gpu:{paddle.distributed.ParallelEnv().dev_id}" if multi else "gpu")
    else:
        paddle.set_device("cpu")
    config = AmpConfig(enabled=bool(amp) and device == "gpu", dtype=amp_dtype)
    if amp and not config.enabled:
        say("AMP: off (requested with --amp, but mixed precision runs on GPU only; training in float32 on CPU)")
    return device, config


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint is. ``meta()`` is the dict stored in the checkpoint (the fields a resume must agree
    on at the top level, the rest under ``inference``: what applying the model to new images needs)."""
    model: str
    num_classes: int
    class_names: tuple
    input_size: int
    global_pool: bool
    data_path: str
    task_type: str
    mean: tuple
    std: tuple
    interpolation: str = "bicubic"
    crop_pct: float | None = None
    fundus_crop: str = "none"
    fov_threshold: int = 10
    preprocess_size: int = 0

    INFERENCE = ("mean", "std", "interpolation", "crop_pct", "fundus_crop", "fov_threshold", "preprocess_size")

    def meta(self) -> dict:
        d = asdict(self)
        d["nb_classes"] = d.pop("num_classes")  # the key of the checkpoints' meta (the CLI's name)
        inference = {k: d.pop(k) for k in self.INFERENCE}
        inference["mean"], inference["std"] = list(inference["mean"]), list(inference["std"])
        return {**d, "class_names": list(self.class_names), "data_path": os.path.abspath(self.data_path),
                "inference": inference}

    @classmethod
    def from_meta(cls, meta: dict) -> RunIdentity:
        inf = meta["inference"]
        return cls(model=meta["model"], num_classes=int(meta["nb_classes"]), class_names=tuple(meta["class_names"]),
                   input_size=int(meta["input_size"]), global_pool=meta["global_pool"], data_path=meta["data_path"],
                   task_type=meta["task_type"], mean=tuple(inf["mean"]), std=tuple(inf["std"]),
                   interpolation=inf["interpolation"], crop_pct=inf["crop_pct"], fundus_crop=inf["fundus_crop"],
                   fov_threshold=inf["fov_threshold"], preprocess_size=inf["preprocess_size"])

    def data_cfg(self) -> dict:
        return {"input_size": self.input_size, "mean": self.mean, "std": self.std,
                "interpolation": self.interpolation, "crop_pct": self.crop_pct}

    def preprocessing(self) -> dict:
        return {"fundus_crop": self.fundus_crop, "fov_threshold": self.fov_threshold,
                "preprocess_size": self.preprocess_size}


class SelectOutputs(paddle.nn.Layer):
    """``model`` with only the output columns ``columns`` (multi-label external validation on data that
    labels a subset of the model's labels: the others have no ground truth to score)."""

    def __init__(self, model: paddle.nn.Layer, columns):
        super().__init__()
        self.model = model
        self.columns = [int(c) for c in columns]
        self.num_views = getattr(model, "num_views", 1)

    def forward(self, x):
        return paddle.index_select(self.model(x), paddle.to_tensor(self.columns, dtype="int64"), axis=1)
