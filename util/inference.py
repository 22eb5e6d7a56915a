"""What applying a model needs, shared by training, ``--eval`` and ``predict.py``: the device (and whether AMP
can run on it, in which precision) and the run's identity, the typed record of what a checkpoint is (model,
classes, input size, pooling, preprocessing, normalisation) stored in every checkpoint as ``meta``.

bfloat16 on the CPU (``--amp --amp_dtype bfloat16`` on a CPU with ``avx512_bf16`` or ``amx_bf16``). Paddle 3.3's
dygraph AMP is GPU/XPU-only: ``paddle.amp.auto_cast`` on a CPU place warns and changes nothing, and the CPU
kernels of the eager mode have no bfloat16 ``matmul``, ``conv2d`` or ``add`` (``FLAGS_use_mkldnn`` does not
route eager ops to oneDNN). Paddle's static graph does: in a program traced by ``paddle.jit.to_static`` the kernel
selection falls back to oneDNN's bfloat16 kernels (``onednn_op.matmul``, ``onednn_op.conv2d``, their gradients,
and the element-wise ops between them). So ``AmpConfig.forward`` runs the model's forward (and, in training,
its backward) as a static program traced under ``auto_cast(dtype='bfloat16', level='O1')``: matrix products and
convolutions in bfloat16, Paddle's bf16 black list (norms, softmax, reductions, losses) in float32, the logits
returned in float32. Parameters, gradients, the optimizer and checkpoints stay float32 (O1); bfloat16 needs no
loss scaling (float32's exponent range). O2 is not offered: ``paddle.amp.decorate`` leaves CPU parameters in
float32, AdamW's CPU kernel is float32-only, and an O2 program crashed in oneDNN's bf16 ``matmul_grad``. One
process only: ``paddle.DataParallel``'s forward cannot be traced (it reads the eager tracer).

While the program is traced, three of Paddle 3.3's CPU gaps are worked around per layer (``_Bf16Trace``):

* ``einsum`` (the ViT's attention) is on the bf16 white list but has no bf16 CPU kernel: black-listed
  (float32); so is the inplace ``batch_norm_`` the BatchNorm layers call, which AMP does not cast: their input
  is cast to float32 (no CPU kernel of batch norm takes bfloat16).
* oneDNN's bf16 ``matmul_grad`` writes both gradients unconditionally (``paddle/phi/kernels/onednn/
  matmul_grad_kernel.cc``): a product whose input or weight needs no gradient (a head on frozen features, a
  trainable block after frozen ones) crashes the process (segmentation fault). A ``Linear`` with an operand
  that needs no gradient runs in float32.
* the same kernel broadcasts a 2-D weight over the batch of a 3-D input and sums the copies of its gradient
  (3x slower than float32 for a ViT-B/16 ``fc1``): a ``Linear`` flattens its input to 2-D rows first.

References: Paddle ``python/paddle/amp/auto_cast.py`` and ``amp_lists.py`` (the device check, the bf16 lists),
``paddle/fluid/pir/dialect/operator/utils/amp_utils.cc`` (how a traced op's dtype is chosen).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import asdict, dataclass, field

import paddle

from util.distributed import get_world_size
from util.errors import UserError

# ops of Paddle's bf16 white list with no bfloat16 CPU kernel (forward or backward): they stay float32
CPU_BF16_BLACK_LIST = frozenset({"einsum", "batch_norm", "batch_norm_"})


@dataclass
class AmpConfig:
    """Whether and how the model runs in mixed precision. ``device='gpu'``: Paddle's AMP (``autocast``);
    ``device='cpu'`` (bfloat16 only): the static bf16 program of ``forward`` (module docstring)."""
    enabled: bool = False
    dtype: str = "float16"
    device: str = "gpu"
    _programs: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def cpu_bf16(self) -> bool:
        return self.enabled and self.device == "cpu"

    def autocast(self):
        """Paddle's AMP context on a GPU; a no-op otherwise (on the CPU, ``forward`` does the casting)."""
        if not self.enabled or self.cpu_bf16:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=True, dtype=self.dtype, level="O1")

    def forward(self, model: paddle.nn.Layer, x: paddle.Tensor) -> paddle.Tensor:
        """``model(x)`` in this precision: as is (inside ``autocast`` on a GPU), or on the CPU in bfloat16 through
        the static program for the model's mode (train/eval, with or without gradients), traced at its first
        call; the logits in float32. Call it inside ``autocast()``."""
        if not self.cpu_bf16:
            return model(x)
        key = (id(model), bool(model.training), paddle.is_grad_enabled(), tuple(x.shape[1:]))
        entry = self._programs.get(key)
        if entry is None or entry[0] is not model:  # a new model (or one whose id was reused)
            entry = self._programs[key] = (model, _bf16_program(model, list(x.shape), grad=key[2]))
        with _Bf16Trace.active(grad=key[2]), warnings.catch_warnings():
            # the tracer's notes on the models' Python (branch types, .place in a graph) are not the user's
            warnings.filterwarnings("ignore", category=UserWarning, module=r"paddle\.")
            return entry[1](x)


class _Bf16Trace:
    """The per-layer workarounds of the module docstring, in effect only while a bf16 program is traced."""

    on = False
    grad = False  # the program being traced has a backward

    @classmethod
    @contextlib.contextmanager
    def active(cls, grad: bool):
        cls.on, cls.grad = True, grad
        try:
            yield
        finally:
            cls.on = cls.grad = False

    @classmethod
    def prepare(cls, model: paddle.nn.Layer) -> None:
        """Give ``model``'s Linear and BatchNorm layers the traced-bf16 forwards (once; inert outside tracing)."""
        norms = (paddle.nn.layer.norm._BatchNormBase, paddle.nn.BatchNorm)
        for layer in [model, *model.sublayers()]:
            if "_fp32_forward" in layer.__dict__:
                continue
            if isinstance(layer, paddle.nn.Linear):
                patched = _bf16_linear_forward
            elif isinstance(layer, norms):
                patched = _fp32_norm_forward
            else:
                continue
            layer._fp32_forward = layer.forward
            layer.forward = patched.__get__(layer)


# not converted by dy2static, run as written while tracing: converted, the auto_cast(enable=False) below was
# lost and the product stayed in bf16
@paddle.jit.not_to_static
def _bf16_linear_forward(self, x, residual=None):
    out = _bf16_linear(self, x)
    return out if residual is None else residual + out


def _bf16_linear(self, x):
    if not _Bf16Trace.on:
        return self._fp32_forward(x)
    if _Bf16Trace.grad and x.stop_gradient != self.weight.stop_gradient:
        # oneDNN's bf16 matmul_grad writes both gradients: with one of them not wanted it crashes
        with paddle.amp.auto_cast(enable=False):
            return self._fp32_forward(x.astype("float32"))
    lead = list(x.shape[:-1])
    if len(lead) <= 1 or sum(d < 0 for d in lead) > 1:  # 2-D already, or rows of unknown shape
        return self._fp32_forward(x)
    # as rows: oneDNN's backward would broadcast the 2-D weight over the batch and sum the copies
    out = self._fp32_forward(x.reshape([-1, x.shape[-1]]))
    return out.reshape(lead + [out.shape[-1]])


@paddle.jit.not_to_static
def _fp32_norm_forward(self, x):
    if _Bf16Trace.on and x.dtype != paddle.float32:
        x = x.astype("float32")
    return self._fp32_forward(x)


def _bf16_program(model: paddle.nn.Layer, shape: list, grad: bool):
    """The static bf16 forward of ``model`` for inputs ``[N, *shape[1:]]`` (any batch size)."""
    _Bf16Trace.prepare(model)
    black = set(CPU_BF16_BLACK_LIST)

    def bf16_forward(x):
        with paddle.amp.auto_cast(enable=True, dtype="bfloat16", level="O1", custom_black_list=black):
            out = model(x)
        return out.astype("float32")

    spec = paddle.static.InputSpec([None, *shape[1:]], "float32", "x")
    program = paddle.jit.to_static(bf16_forward, input_spec=[spec], full_graph=True)
    if not grad:
        program.eval()  # no backward program
    return program


def _bf16_support() -> str | None:
    """``util.exported.bf16_support()``, imported when asked: that module reads the thread count at its import."""
    from util.exported import bf16_support

    return bf16_support()


def select_device(requested: str = "auto", amp: bool = False, amp_dtype: str = "float16",
                  say=print) -> tuple[str, AmpConfig]:
    """Pick the device (``auto`` prefers a visible GPU), set it, and say whether AMP can run on it.

    On the CPU, AMP means bfloat16 on a CPU with bf16 instructions (``util.exported.bf16_support``); there,
    ``--amp_dtype bfloat16`` on a CPU without them is an error (emulated bf16 is slower than float32), and
    float16 AMP is off with one line saying so (training in float32, as before)."""
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
    if not amp:
        return device, AmpConfig(enabled=False, dtype=amp_dtype, device=device)
    if device == "gpu":
        return device, AmpConfig(enabled=True, dtype=amp_dtype, device=device)
    no_bf16 = _bf16_support()
    if amp_dtype == "bfloat16":
        if no_bf16 is not None:
            raise UserError(f"--amp --amp_dtype bfloat16 on the CPU: {no_bf16} (bfloat16 training needs "
                            "avx512_bf16 or amx_bf16; emulated it would be slower than float32); drop --amp to "
                            "train in float32, or train on a GPU")
        if get_world_size() > 1:  # DataParallel's forward cannot be traced into a static program
            raise UserError(f"--amp --amp_dtype bfloat16 on the CPU: {get_world_size()} processes were launched "
                            "(bfloat16 training on the CPU runs in one process); run a single process, or drop "
                            "--amp")
        say("AMP: bfloat16 on the CPU (oneDNN bf16 matrix products and convolutions in a static graph of the "
            "model; parameters, optimizer and checkpoints in float32)")
        return device, AmpConfig(enabled=True, dtype="bfloat16", device=device)
    hint = "; this CPU has bf16 instructions: --amp --amp_dtype bfloat16 trains in bfloat16" if no_bf16 is None else ""
    say(f"AMP: off (requested with --amp, but float16 mixed precision runs on GPU only; training in float32 on "
        f"CPU{hint})")
    return device, AmpConfig(enabled=False, dtype=amp_dtype, device=device)


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
