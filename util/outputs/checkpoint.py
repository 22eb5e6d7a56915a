"""Run checkpoints: atomic writes (in the caller's thread or in the background), resume with a compatibility
check, RNG state.

Every checkpoint is read through the restricted reader of ``models.checkpoint_io`` (never ``paddle.load``,
which is plain ``pickle.load``): a file that names anything but arrays, plain containers, numbers and
strings is refused before any of it runs. So the RNG state is stored as plain values too (Paddle's
``GeneratorState`` objects are converted to and from tuples here).

``checkpoint-last.pdparams`` (model, optimizer, AMP scaler, epoch, best score, RNG state, and the run's
identity in ``meta``) is written after every epoch, or every ``--save_last_every`` epochs;
``checkpoint-best.pdparams`` (the model, no optimizer state) whenever the validation score improves. A file
is written to a temporary name in the same folder and moved into place with ``os.replace``, so a crash
while writing leaves the previous checkpoint intact.

Files are written in ``paddle.save``'s format (pickle protocol 4, a tensor as the pair (name, array)), so
``paddle.load`` and the restricted reader read them as before, but streamed (``pickle_checkpoint``): one
tensor's copy in memory at a time, where ``paddle.save``'s pickler keeps them all until the end.

``CheckpointWriter`` writes them: by default in the caller's thread (``atomic_save``). ``background=True``
(``--async_save``) does what ``torch.distributed.checkpoint``'s ``async_save`` does: the training thread copies
the state to host memory (``snapshot``: numpy copies as large as checkpoint-last, kept between saves so that
the next copy fills warm memory), so training may change it at once, and one writer thread writes the copy to the temporary name, fsyncs it and renames it into place. The
next write, and the end of training, wait for it first, and a write that failed raises its error there, in
the training thread. (Paddle's own ``paddle.async_save`` is not used: on CPU it pickles the live tensors,
which the next optimizer step changes under it, straight to the final name.)

References: ``torch.distributed.checkpoint.async_save`` and its recipe (stage the state in CPU memory, write it
in the background); PyTorch Lightning ``ModelCheckpoint`` (``every_n_epochs``, ``save_last``), mmcv
``CheckpointHook`` (``interval``, ``save_optimizer``).
"""
from __future__ import annotations

import contextlib
import copy
import os
import pickle
import random
import threading
import time

import numpy as np
import paddle

from util.errors import UserError
from util.fileio import atomic_path

# Fields of ``meta`` that must agree for a resume to make sense.
RESUME_KEYS = ("model", "nb_classes", "class_names", "input_size", "global_pool", "data_path", "task_type")


# pickle protocol of paddle.save (its default, 4)
PICKLE_PROTOCOL = 4


class _CheckpointPickler(pickle.Pickler):
    """Pickles a tensor as ``paddle.save`` does, as the pair (name, array) (``paddle.load`` turns it back into a
    tensor, the restricted reader into the array), and keeps no memo (``fast``): a plain pickler holds every
    object it wrote until the end, so ``paddle.save`` needs the whole state again in memory, and more: 5.7 to
    6.5 GB more for ViT-L with AdamW (benchmarks/checkpoint_cost.py). Here one tensor's copy exists at a time.
    A checkpoint has no cycles; an object met twice is written twice."""

    def __init__(self, f):
        super().__init__(f, PICKLE_PROTOCOL)
        self.fast = True

    def reducer_override(self, obj):
        if isinstance(obj, paddle.Tensor):
            return tuple, ((obj.name, host_array(obj)),)
        return NotImplemented


def host_array(t) -> np.ndarray:
    """The values of tensor ``t`` as a numpy array: a view of a CPU tensor's memory (DLPack, no copy) where
    numpy can hold its dtype, else ``t.numpy()`` (a copy; GPU tensors, bfloat16). A view changes with the
    tensor: read it before training goes on."""
    try:
        if t.place.is_cpu_place():
            return np.from_dlpack(t)
    except (AttributeError, BufferError, RuntimeError, TypeError, ValueError):
        pass
    return t.numpy()


def pickle_checkpoint(obj, path: str) -> None:
    """Write ``obj`` to ``path`` in ``paddle.save``'s format, streamed (``_CheckpointPickler``)."""
    with open(path, "wb") as f:
        _CheckpointPickler(f).dump(obj)


def atomic_save(obj, path: str, fsync: bool = False) -> None:
    """``obj`` to ``path`` as ``paddle.save`` writes it (``pickle_checkpoint``), through a temporary file, so
    ``path`` is never half-written (``fsync``: on the disk before the rename, ``util.fileio.atomic_path``)."""
    with atomic_path(path, suffix=".pdparams", fsync=fsync) as tmp:
        pickle_checkpoint(obj, tmp)


_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, np.generic)


def _stage(t, reuse: dict) -> np.ndarray:
    """A copy of tensor ``t``'s values in host memory: into the buffer ``reuse`` holds for it (the previous
    save's) when its shape and dtype still fit, else into a new one."""
    src = host_array(t)
    hit = reuse.get(id(t))
    buf = hit[1][1] if hit is not None and hit[0] is t else None
    if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
        return src if src.flags.owndata else src.copy()  # numpy() gave a private copy already; a view is copied
    np.copyto(buf, src)
    return buf


def snapshot(obj, memo: dict | None = None, reuse: dict | None = None):
    """A copy of a checkpoint's object tree that training can no longer change, with no Paddle object left.

    A tensor becomes the pair ``(name, numpy copy)`` that ``paddle.save`` pickles for it (so the file reads
    back the same through ``paddle.load`` and the restricted reader), a numpy array a copy, a container a new
    one of the same type; numbers and strings are kept. ``memo`` (id -> (object, copy)) copies an object met
    twice once: the model's tensors in checkpoint-best and checkpoint-last of the same epoch. ``reuse``: the
    ``memo`` of the previous snapshot, whose tensor copies are overwritten in place (no new memory to fault in:
    on a VM, filling fresh pages is ten times slower than copying into warm ones); the caller must be done
    with them.
    """
    memo = {} if memo is None else memo
    if isinstance(obj, _IMMUTABLE):
        return obj
    hit = memo.get(id(obj))
    if hit is not None:
        return hit[1]
    if isinstance(obj, paddle.Tensor):
        out = (obj.name, _stage(obj, reuse or {}))
    elif isinstance(obj, np.ndarray):
        out = obj.copy()
    elif isinstance(obj, dict):
        out = copy.copy(obj)  # the same dict type (OrderedDict), then every value copied
        for key, value in obj.items():
            out[key] = snapshot(value, memo, reuse)
    elif isinstance(obj, list):
        out = [snapshot(v, memo, reuse) for v in obj]
    elif type(obj) is tuple:
        out = tuple(snapshot(v, memo, reuse) for v in obj)
    else:
        out = copy.deepcopy(obj)
    memo[id(obj)] = (obj, out)  # the object is kept so that its id is not reused meanwhile
    return out


def snapshot_nbytes(obj) -> int:
    """The bytes of the numpy arrays in a ``snapshot`` (each counted once): the host memory it holds."""
    seen, total, todo = set(), 0, [obj]
    while todo:
        o = todo.pop()
        if isinstance(o, np.ndarray):
            if id(o) not in seen:
                seen.add(id(o))
                total += o.nbytes
        elif isinstance(o, dict):
            todo.extend(o.values())
        elif isinstance(o, (list, tuple)):
            todo.extend(o)
    return total


class CheckpointWriter:
    """Writes checkpoints, in the caller's thread (default) or in one background thread (module docstring).

    ``group()`` holds the files of one save (checkpoint-best and checkpoint-last of an epoch): in the
    background it first waits for the previous group (raising its error), then copies each ``submit``-ted
    state (tensors shared between the files copied once, into the previous group's buffers: the copy stays
    allocated between saves, as with ``cache_staged_state_dict`` of torch's ``BlockingAsyncStager``) and, when
    the block ends, starts one thread that writes them in order. ``wait()`` waits for the writes in flight
    and raises the first error of any of them; ``close()`` also frees the copy. ``abandon(exc)`` is for an
    exception on its way out: it waits too, and adds a failed write to the exception's notes instead of
    replacing it. A ``submit`` outside a group is a group of its own.

    ``last`` (seconds the caller was held: ``snapshot_s``, ``wait_s``; ``snapshot_bytes``) describes the
    latest group, for the logs and ``benchmarks/checkpoint_cost.py``.
    """

    def __init__(self, background: bool = False, fsync: bool | None = None):
        self.background = bool(background)
        self.fsync = self.background if fsync is None else bool(fsync)  # the background writer always fsyncs
        if self.background and not self.fsync:
            raise ValueError("CheckpointWriter: the background writer always fsyncs (fsync=False is not supported)")
        self._thread: threading.Thread | None = None
        self._errors: list[BaseException] = []
        self._files: list | None = None  # (path, snapshot) of the open group
        self._memo: dict | None = None
        self._staged: dict = {}  # the tensors' host copies of the last group, reused by the next (``snapshot``)
        self.last: dict = {}

    @contextlib.contextmanager
    def group(self):
        if not self.background or self._files is not None:  # nested: part of the open group
            yield self
            return
        t0 = time.perf_counter()
        self.wait()
        self.last = {"wait_s": time.perf_counter() - t0, "snapshot_s": 0.0, "snapshot_bytes": 0}
        self._files, self._memo = [], {}
        try:
            yield self
            files = self._files
        finally:  # an exception in the block: nothing of the group is written
            self._staged = {k: v for k, v in self._memo.items() if isinstance(v[0], paddle.Tensor)}
            self._files, self._memo = None, None
        if files:
            self.last["snapshot_bytes"] = snapshot_nbytes([s for _, s in files])
            self._thread = threading.Thread(target=self._write_all, args=(files,), name="checkpoint-writer",
                                            daemon=False)  # not a daemon: the interpreter waits for a write
            del files
            self._thread.start()

    def submit(self, path: str, state) -> None:
        """Write ``state`` to ``path``: now, or (background) a copy of it once the group ends."""
        if not self.background:
            atomic_save(state, path, fsync=self.fsync)
            return
        if self._files is None:
            with self.group():
                self.submit(path, state)
            return
        t0 = time.perf_counter()
        self._files.append((path, snapshot(state, self._memo, self._staged)))
        self.last["snapshot_s"] += time.perf_counter() - t0

    def _write_all(self, files: list) -> None:
        while files:
            path, state = files.pop(0)  # dropped as soon as it is written: its copy is freed
            try:
                atomic_save(state, path, fsync=True)
            except BaseException as exc:  # kept for the training thread; the other files are still tried
                self._errors.append(exc)
            del state

    @property
    def pending(self) -> bool:
        """A background write is still running."""
        return self._thread is not None and self._thread.is_alive()

    def _join(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        while thread.is_alive():  # a Ctrl-C while waiting does not abandon the write: it finishes first
            try:
                thread.join()
            except KeyboardInterrupt:
                continue

    def wait(self) -> None:
        """Wait for the background writes; raise the first one's error (the others as its notes)."""
        self._join()
        if self._errors:
            errors, self._errors = self._errors, []
            for other in errors[1:]:
                _add_note(errors[0], f"another checkpoint write failed too: {type(other).__name__}: {other}")
            raise errors[0]

    def close(self) -> None:
        """``wait()``, then free the host copies kept for the next save."""
        try:
            self.wait()
        finally:
            self._staged = {}

    def abandon(self, exc: BaseException) -> None:
        """For an exception leaving the training loop: wait for the writes in flight and add a failed write to
        ``exc``'s notes (``exc`` stays the one raised)."""
        self._join()
        self._staged = {}
        errors, self._errors = self._errors, []
        for error in errors:
            _add_note(exc, f"a background checkpoint write failed as well: {type(error).__name__}: {error}")


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(note)


def _generator_to_plain(g) -> list:
    # GeneratorState pickles as (device, seed, offset, [bytes of the Mersenne Twister state as text]);
    # keep the same fields as plain values
    device, seed, offset, text, *rest = g.__getstate__()
    return [int(device), int(seed), int(offset), np.asarray(text, dtype=np.uint8), *rest]


def _generator_from_plain(fields):
    cls = type(paddle.get_rng_state()[0])
    device, seed, offset, text, *rest = fields
    g = cls.__new__(cls)
    g.__setstate__((int(device), int(seed), int(offset), [int(b) for b in np.asarray(text).reshape(-1)], *rest))
    return g


def seed_everything(seed: int) -> int:
    """Seed python's, numpy's and Paddle's generators with ``seed``; returns it."""
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)
    return seed


def rng_state() -> dict:
    """The python, numpy and paddle RNG states as plain values (tuples, lists, ints, numpy arrays)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "paddle": [_generator_to_plain(g) for g in paddle.get_rng_state()]}


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))  # pickled tuples may come back as lists
    np.random.set_state(tuple(state["numpy"]))
    paddle.set_rng_state([_generator_from_plain(f) for f in state["paddle"]])


def _param_names(model) -> dict[str, str]:
    """Paddle's generated parameter name (``linear_3.w_0``) -> structured name (``blocks.0.attn.qkv.weight``)."""
    return {p.name: n for n, p in model.named_parameters()}


def optimizer_state_by_name(optimizer, model) -> dict:
    """The optimizer's state dict keyed by structured parameter names.

    Paddle keys accumulators by generated names (``linear_3.w_0_moment1_0``) that depend on how many layers
    the process created before; structured names make a checkpoint resumable in any process.
    """
    generated = _param_names(model)
    out = {}
    for key, value in optimizer.state_dict().items():
        owner = max((g for g in generated if key.startswith(g + "_")), key=len, default=None)
        out[f"{generated[owner]}::{key[len(owner) + 1:]}" if owner else key] = value
    return out


def load_optimizer_state_by_name(optimizer, model, state: dict) -> None:
    """Inverse of ``optimizer_state_by_name`` for the parameters of ``model`` in this process."""
    structured = {n: p.name for n, p in model.named_parameters()}
    renamed = {}
    for key, value in state.items():
        name, sep, suffix = key.partition("::")
        if sep and name in structured:
            key = f"{structured[name]}_{suffix}"
            if hasattr(value, "name"):
                value.name = key
        renamed[key] = value
    optimizer.set_state_dict(renamed)


def save_checkpoint(path: str, *, model, optimizer=None, scaler=None, epoch: int, best_score: float,
                    meta: dict, extra: dict | None = None, model_state: dict | None = None,
                    writer: CheckpointWriter | None = None) -> None:
    """Write a resumable checkpoint atomically (through ``writer``, else now). ``model_state``: the weights to
    store instead of ``model.state_dict()`` (a LoRA model's merged weights)."""
    state = {
        "model": model.state_dict() if model_state is None else model_state,
        "epoch": epoch,
        "best_score": best_score,
        "meta": meta,
        "rng": rng_state(),
    }
    if optimizer is not None:
        state["optimizer"] = optimizer_state_by_name(optimizer, model)
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if extra:
        state.update(extra)
    if writer is None:
        atomic_save(state, path)
    else:
        writer.submit(path, state)


def _read(path: str):
    """The checkpoint's object tree (numpy arrays for tensors) through the restricted reader; a missing,
    unreadable or code-carrying file raises ``UserError`` (nothing from it runs)."""
    from models.checkpoint_io import read_checkpoint

    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint not found; pass an existing file to --resume")
    try:
        return read_checkpoint(path, mmap=False)
    except UserError:
        raise
    except Exception as exc:  # corrupt or foreign file
        raise UserError(f"{path}: could not read the checkpoint ({type(exc).__name__}: {exc}); "
                        "pass a checkpoint written by this toolkit, a converted .pdparams or a RETFound .pth") from exc


def load_checkpoint(path: str) -> dict:
    """Load one of our checkpoints; a missing or unreadable file raises ``UserError``."""
    state = _read(path)
    if not isinstance(state, dict) or "model" not in state:
        keys = list(state)[:10] if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path}: not a checkpoint of this toolkit (top-level keys {keys}, expected 'model')")
    return state


def is_toolkit_checkpoint(state) -> bool:
    return isinstance(state, dict) and "meta" in state and "model" in state


def read_toolkit_checkpoint(path: str) -> dict | None:
    """The checkpoint at ``path`` if this toolkit wrote it (``.pdparams`` with ``meta``), else ``None``
    (a RETFound ``.pth``, a converted state dict, ...); a missing file raises ``UserError``."""
    if path.lower().endswith(".pdparams"):
        state = _read(path)
        return state if is_toolkit_checkpoint(state) else None
    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint not found; pass an existing file to --resume")
    return None


def check_resume_compatible(saved_meta: dict, meta: dict, path: str) -> None:
    """Raise ``UserError`` listing every identity field that differs between a checkpoint and this run."""
    diffs = []
    for key in RESUME_KEYS:
        if key in saved_meta and key in meta and saved_meta[key] != meta[key]:
            diffs.append(f"{key}: checkpoint {saved_meta[key]!r} vs now {meta[key]!r}")
    if diffs:
        raise UserError(f"{path}: cannot resume, the run differs from the checkpoint's ("
                        + "; ".join(diffs) + "); resume with the original settings or start a new run "
                        "(use --finetune to start from its weights)")


def match_eval_classes(saved_meta: dict | None, class_names, task_type: str, data_path: str,
                       path: str) -> list[int] | None:
    """External validation on data that holds some of a checkpoint's classes: for each class of the data,
    its index among the checkpoint's classes (matched by name); ``None`` when the names are the same, in the
    same order, or the checkpoint has none. Classes the checkpoint does not know, or a regression grade
    scale that differs, raise ``UserError``."""
    saved = (saved_meta or {}).get("class_names")
    if saved is None or list(saved) == list(class_names):
        return None
    unknown = [c for c in class_names if c not in saved]
    if unknown or task_type == "regression" or len(set(class_names)) != len(list(class_names)):
        what = (f"has classes {unknown} the checkpoint does not know" if unknown else
                "grades a different scale" if task_type == "regression" else "repeats class names")
        raise UserError(f"{path}: the checkpoint was trained on classes {list(saved)} but the data at {data_path} "
                        f"{what} (its classes: {list(class_names)}); rename the class folders / label columns to "
                        "the checkpoint's names (a subset of them may be evaluated)")
    return [list(saved).index(c) for c in class_names]
