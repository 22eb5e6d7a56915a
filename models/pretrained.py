"""Load pretrained (MAE / RETFound) or fine-tuned weights into a registered model, with a strict key check.

``load_pretrained`` is ``--finetune``: the checkpoint is read (``models.checkpoint_io``), converted to the
Paddle layout (``models.convert``: a DINOv2 / iBOT ``teacher`` unwrapped to its backbone, RETFound's MLP
renames), adapted by the model's own ``prepare_pretrained`` (MAE decoder and mask tokens dropped, mismatched
head dropped, ``pos_embed`` resized to the input size), then checked: the
keys missing from it must be exactly the ones the model allows (global pool + MAE checkpoint: ``head.*`` and
``fc_norm.*``), nothing may be left over and every shape must match; anything else is a ``UserError``
listing the keys and shapes (Paddle's ``set_state_dict`` has no strict mode and would skip them silently).
When the head did not come from the checkpoint it is re-initialised with ``reset_head(2e-5)``.

``load_finetuned`` is ``--eval``/``--resume`` from a RETFound fine-tuned checkpoint: every key must match,
head included, and nothing is re-initialised.

Weights are located by ``util.weights_files.find_weights`` (re-exported here as ``resolve_weights``): a bare name
(``RETFound_mae_meh``) is ``<weights_dir>/<name>.pth|.pdparams|.safetensors``, a bare file name
(``EfficientNetB4_pretrained.pdparams``) is looked for in the current folder, then in ``weights_dir``, a path
with a directory part is taken as given; nothing is ever downloaded.

References: rmaphoh/RETFound_MAE and facebookresearch/mae ``main_finetune.py`` (drop a mismatched head,
``interpolate_pos_embed``, ``load_state_dict(strict=False)`` with the missing-keys assertion,
``trunc_normal_(model.head.weight, std=2e-5)``).
"""
from __future__ import annotations

import re
import sys
from typing import Any

import numpy as np
import paddle

from util.errors import UserError
from util.weights_files import find_weights

# ----------------------------------------------------------------------------------------------- locating
# the former name, kept for its callers; the one lookup is util.weights_files.find_weights
resolve_weights = find_weights


def read_paddle_state_dict(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """Read a checkpoint file and return its model state dict in the Paddle layout, plus the convert report.

    ``.pdparams`` files are taken as Paddle layout; ``.pth``/``.pt``/``.bin``/``.safetensors`` as PyTorch layout
    (Linear weights transposed by ``models.convert``). Arrays may be read-only views into the file.
    """
    from models.checkpoint_io import read_checkpoint
    from models.convert import STATE_DICT_KEYS, source_format_for, to_paddle_state_dict

    obj = read_checkpoint(path, keys=STATE_DICT_KEYS)   # optimizer state is never read
    # transposed views, not copies: _assign makes each array contiguous one at a time (peak ~ one tensor)
    return to_paddle_state_dict(obj, source_format_for(path), copy=False)


# ----------------------------------------------------------------------------------------------- checking
def _natural_key(name: str) -> list:
    """Sort ``blocks.2`` before ``blocks.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _fmt_keys(keys: list[str], shapes: dict[str, tuple] | None = None, limit: int = 12) -> str:
    keys = sorted(keys, key=_natural_key)
    shown = [f"{k} {list(shapes[k])}" if shapes and k in shapes else k for k in keys[:limit]]
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return "[" + ", ".join(shown) + more + "]"


def _pool_flag(model: paddle.nn.Layer) -> bool | None:
    """The model's ``global_pool`` when --global_pool chooses it, else None (no advice about that flag)."""
    return getattr(model, "global_pool", None) if getattr(model, "pool_from_flag", True) else None


def _family_hint(own: dict[str, tuple], unexpected: list[str], bad_missing: list[str]) -> str:
    """Advice when the checkpoint is of another ViT family than the model (LayerScale, register tokens)."""
    def has_ls(keys) -> bool:
        return any(re.search(r"\.ls[12]\.gamma$", k) for k in keys)

    if "reg_token" in unexpected or "register_tokens" in unexpected:
        return ("the checkpoint has register tokens (RETFound-Green / DINOv2 with registers): use --model "
                "retfound_green")
    if has_ls(unexpected):
        return ("the checkpoint has LayerScale (blocks.N.ls1.gamma: the DINOv2 family): use --model "
                "retfound_dinov2, dinov2_vits14, dinov2_vitb14, dinov2_vitl14 or retfound_green")
    if has_ls(bad_missing):
        return ("the model has LayerScale (DINOv2 family) but the checkpoint has none: use the model the "
                "checkpoint was trained as (retfound_mae for RETFound MAE weights, visionfm for VisionFM's)")
    return ""


def _check_keys(where: str, own: dict[str, tuple], sd: dict[str, np.ndarray], allowed_missing: set[str],
                global_pool: bool | None) -> list[str]:
    """Raise ``UserError`` unless ``sd`` fits ``own`` up to ``allowed_missing``; return the missing keys."""
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    bad_missing = [k for k in missing if k not in allowed_missing]
    mismatched = sorted(k for k in sd if k in own and tuple(sd[k].shape) != own[k])
    if not (bad_missing or unexpected or mismatched):
        return missing
    parts = []
    if bad_missing:
        parts.append(f"missing from the checkpoint {_fmt_keys(bad_missing, own)}")
    if unexpected:
        parts.append(f"not in the model {_fmt_keys(unexpected, {k: tuple(sd[k].shape) for k in unexpected})}")
    if mismatched:
        shown = [f"{k}: checkpoint {list(sd[k].shape)} vs model {list(own[k])}" for k in mismatched[:12]]
        parts.append("shape mismatch [" + "; ".join(shown) + (", ..." if len(mismatched) > 12 else "") + "]")
    hint = (_family_hint(own, unexpected, bad_missing)
            or "use a checkpoint of the same architecture (--model) and the matching --input_size / --nb_classes")
    if global_pool is False and any(k.startswith("fc_norm.") for k in unexpected):
        hint = "the checkpoint was trained with global pooling: pass --global_pool"
    elif global_pool is True and any(k.startswith("fc_norm.") for k in bad_missing):
        hint = ("the checkpoint has a head but no fc_norm, so it was trained with cls-token pooling: pass "
                "--no-global_pool (or drop its head.* keys to fine-tune it as a backbone)")
    raise UserError(f"{where}: checkpoint does not fit the model ({'; '.join(parts)}; "
                    f"expected the model's parameter names and shapes; shapes in Paddle layout, where a Linear "
                    f"weight is [in, out], the transpose of PyTorch's); {hint}")


def _assign(model: paddle.nn.Layer, sd: dict[str, np.ndarray]) -> None:
    """Copy arrays into the model's parameters/buffers by name (cast to each tensor's dtype)."""
    own = model.state_dict()
    with paddle.no_grad():
        for k, v in sd.items():
            t = own[k]
            arr = np.ascontiguousarray(v)
            dtype = _np_dtype(t)
            t.set_value(arr if arr.dtype == dtype else arr.astype(dtype))


def _np_dtype(t: paddle.Tensor) -> np.dtype:
    return {paddle.float32: np.float32, paddle.float16: np.float16, paddle.float64: np.float64,
            paddle.int64: np.int64, paddle.int32: np.int32, paddle.bool: np.bool_}.get(t.dtype, np.float32)


# ----------------------------------------------------------------------------------------------- public API
def load_pretrained(model: paddle.nn.Layer, source: str, weights_dir: str = "./weights",
                    reinit_head: bool | None = None, verbose: bool = True) -> dict[str, Any]:
    """Load pretrained weights for fine-tuning (``--finetune``).

    Args:
        model: a registered model (implements ``prepare_pretrained`` and ``reset_head``).
        source: a weights file (.pth MAE pretraining checkpoint, fine-tuned RETFound checkpoint or bare state
            dict; .pdparams; .safetensors) or a bare name looked up in ``weights_dir``.
        weights_dir: where bare names are looked up.
        reinit_head: ``None`` (default) re-initialises the head (trunc normal std 2e-5, bias 0) only when it did
            not come from the checkpoint; ``True`` always, as RETFound's ``main_finetune.py`` does for the
            head weight; ``False`` never.
        verbose: print a short summary.

    Returns:
        A report: ``path``, ``format``, ``loaded`` / ``dropped`` / ``missing`` key lists, ``head_reset``,
        ``pos_embed_resized`` (``(old_grid, new_grid)`` or ``None``) and ``convert`` (the converter's report).
    """
    path = find_weights(source, weights_dir)
    sd, convert_report = read_paddle_state_dict(path)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    new_sd, allowed_missing = model.prepare_pretrained(sd)
    # a key counts as used when it survives, or its array does under a new name (CNN/dual models add a prefix)
    used_arrays = {id(v) for v in new_sd.values()}
    dropped = sorted(k for k, v in sd.items() if k not in new_sd and id(v) not in used_arrays)
    dropped += sorted(convert_report.get("dropped_heads", []))   # a teacher's DINO / iBOT heads
    missing = _check_keys(path, own, new_sd, set(allowed_missing), _pool_flag(model))
    _assign(model, new_sd)

    head_keys = _head_keys(model, own)
    head_loaded = bool(head_keys) and all(k in new_sd for k in head_keys)
    head_reset = (not head_loaded) if reinit_head is None else bool(reinit_head)
    if head_reset and hasattr(model, "reset_head"):
        # the reference re-draws only the head weight; a bias that came from the checkpoint stays
        kept_bias = model.head.bias.numpy().copy() if head_loaded else None
        model.reset_head(2e-5)
        if kept_bias is not None:
            model.head.bias.set_value(kept_bias)

    resized = None
    if "pos_embed" in sd and "pos_embed" in new_sd and sd["pos_embed"].shape != new_sd["pos_embed"].shape:
        prefix = getattr(model, "pos_embed_prefix", 1)   # entries of the cls / register tokens, kept as they are
        old_n, new_n = sd["pos_embed"].shape[1] - prefix, new_sd["pos_embed"].shape[1] - prefix
        resized = (int(round(old_n ** 0.5)), int(round(new_n ** 0.5)))
    report = {"path": path, "format": "paddle" if path.lower().endswith(".pdparams") else "torch",
              "loaded": sorted(new_sd), "dropped": dropped, "missing": missing, "head_reset": head_reset,
              "pos_embed_resized": resized, "convert": convert_report}
    if verbose:
        print(summarize(report))
    return report


def _head_keys(model: paddle.nn.Layer, own: dict) -> list[str]:
    """State-dict keys of ``model.head`` (``head.*`` for the ViT, ``backbone.fc.*`` for a PaddleClas ResNet...)."""
    head = getattr(model, "head", None)
    if head is None:
        return [k for k in own if k.startswith("head.")]
    for name, layer in model.named_sublayers():
        if layer is head:
            return [k for k in own if k.startswith(name + ".")]
    return []


def load_finetuned(model: paddle.nn.Layer, source: str, weights_dir: str = "./weights",
                   verbose: bool = True) -> dict[str, Any]:
    """Load a fine-tuned checkpoint for evaluation or resuming: every key and shape must match, head included."""
    path = find_weights(source, weights_dir)
    sd, convert_report = read_paddle_state_dict(path)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_keys(path, own, sd, set(), _pool_flag(model))
    _assign(model, sd)
    report = {"path": path, "format": "paddle" if path.lower().endswith(".pdparams") else "torch",
              "loaded": sorted(sd), "dropped": [], "missing": [], "head_reset": False, "pos_embed_resized": None,
              "convert": convert_report}
    if verbose:
        print(summarize(report))
    return report


def load_state_dict_strict(model: paddle.nn.Layer, state_dict: dict, where: str) -> None:
    """Load an in-memory Paddle-layout state dict (e.g. the ``model`` entry of a toolkit checkpoint) with the
    same strict key and shape check as the file loaders; ``where`` names the source in errors."""
    sd = {k: (v.numpy() if isinstance(v, paddle.Tensor) else np.asarray(v)) for k, v in state_dict.items()}
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_keys(where, own, sd, set(), _pool_flag(model))
    _assign(model, sd)


def summarize(report: dict[str, Any]) -> str:
    """One-paragraph human summary of a load report."""
    lines = [f"Loaded {len(report['loaded'])} tensors from {report['path']} ({report['format']} layout)"]
    if report["dropped"]:
        groups: dict[str, int] = {}
        for k in report["dropped"]:
            g = k.split(".")[0]
            g = "decoder_*" if g.startswith("decoder_") else g + ".*" if "." in k else g
            groups[g] = groups.get(g, 0) + 1
        lines.append("  dropped (unused by this model): " + ", ".join(f"{g} ({n})" for g, n in sorted(groups.items())))
    if report["missing"]:
        lines.append("  not in checkpoint (kept at init): " + ", ".join(report["missing"]))
    if report["pos_embed_resized"]:
        o, n = report["pos_embed_resized"]
        lines.append(f"  pos_embed resized bicubic {o}x{o} -> {n}x{n} patch grid (prefix-token entries kept)")
    if report["head_reset"]:
        lines.append("  head re-initialised: trunc_normal(std=2e-5), bias 0")
    return "\n".join(lines)


def load_weights(model: paddle.nn.Layer, identity: dict, *, resume: str = "", finetune: str = "",
                 eval_only: bool = False, weights_dir: str = "./weights", verbose: bool = True) -> dict | None:
    """Apply ``--resume`` / ``--finetune`` to ``model`` (``identity``: the run's ``RunIdentity.meta()``); returns
    the toolkit checkpoint being resumed or evaluated, if any."""
    from util.outputs.checkpoint import check_resume_compatible, read_toolkit_checkpoint

    if resume:
        state = read_toolkit_checkpoint(resume)
        if state is not None:
            if not eval_only:
                check_resume_compatible(state["meta"], identity, resume)
            # --eval: the data's classes were matched to the checkpoint's before the model was built
            # (util.run_config.eval_classes -> util.outputs.checkpoint.match_eval_classes)
            load_state_dict_strict(model, state["model"], resume)
            if verbose:
                print(f"Resumed from {resume} (epoch {state['epoch']})", flush=True)
            return state
        if not eval_only:
            raise UserError(f"{resume}: not a checkpoint of this toolkit, so it cannot be resumed "
                            "(it has no optimizer state or run identity); evaluate it with --eval, or pass it "
                            "to --finetune to start a new run from its weights")
        load_finetuned(model, resume, verbose=verbose)  # e.g. a RETFound PyTorch checkpoint-best.pth
    elif eval_only:
        raise UserError("--eval: no checkpoint to evaluate (--resume is empty); pass --resume CKPT")
    elif finetune:
        # as the reference: the head weight is always re-drawn (trunc normal, std 2e-5) after loading
        load_pretrained(model, finetune, weights_dir=weights_dir, reinit_head=True, verbose=verbose)
    elif verbose:
        print(f"warning: no pretrained weights given (--finetune): {identity['model']} starts from random "
              "initialisation; pass --finetune NAME|PATH to start from pretrained weights (e.g. "
              "RETFound_mae_meh in --weights_dir for retfound_mae)", file=sys.stderr, flush=True)
    return None
