"""Model registry: every model is a factory registered by name (timm's ``@register_model`` habit).

Old reference spellings resolve through the explicit alias table ``MODEL_ALIASES``; the reference's
``--model Dinov2 --model_arch dinov2_vitl14`` pair through ``util.weights_files.model_for_arch``.
"""
from __future__ import annotations

import inspect
from typing import Callable

from util.errors import UserError, unknown_name_error
from util.weights_files import model_for_arch

_MODELS: dict[str, Callable] = {}

# Reference spellings users paste from the RETFound README -> our names.
MODEL_ALIASES: dict[str, str] = {
    "RETFound_mae": "retfound_mae",
    "vit_large_patch16": "retfound_mae",
    "RETFound_dinov2": "retfound_dinov2",
    "RETFound_Green": "retfound_green",
    "RETFound-Green": "retfound_green",
    "VisionFM": "visionfm",
}


def register_model(fn: Callable) -> Callable:
    """Register ``fn`` under its function name. The factory signature is
    ``fn(num_classes: int, drop_path_rate: float = 0., global_pool: bool = True, input_size: int = <default>)``,
    the default ``input_size`` being the input size the model is meant for (EfficientNet-B4: 380).
    """
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def resolve_model_name(name: str, model_arch: str | None = None) -> str:
    """Canonical registered name for ``name`` (alias-aware; with the reference's ``--model_arch`` when given,
    which ``--model Dinov2`` needs); unknown names raise with close matches."""
    name = model_for_arch(name, model_arch)
    name = MODEL_ALIASES.get(name, name)
    if name not in _MODELS:
        raise unknown_name_error("model", name, list(_MODELS) + list(MODEL_ALIASES) + ["Dinov2"])
    return name


def default_input_size(name: str) -> int:
    """The input size model ``name`` is built for when no ``input_size`` is given (its factory's default)."""
    return int(inspect.signature(_MODELS[resolve_model_name(name)]).parameters["input_size"].default)


def create_model(name: str, num_classes: int, drop_path_rate: float = 0.0, global_pool: bool = True,
                 input_size: int | None = None):
    """Build a registered model by name; ``input_size=None`` uses the model's default (``default_input_size``)."""
    fn = _MODELS[resolve_model_name(name)]
    kwargs = {} if input_size is None else {"input_size": int(input_size)}
    return fn(num_classes=num_classes, drop_path_rate=drop_path_rate, global_pool=global_pool, **kwargs)


def check_views(model, model_name: str, num_views: int, data_path: str) -> None:
    """A dual-eye model needs a left and a right image per sample, a single-view model one."""
    if getattr(model, "num_views", 1) != num_views:
        raise UserError(f"--model {model_name} takes {model.num_views} image(s) per sample but the dataset "
                        f"at {data_path} gives {num_views}; pick a matching model (dual_* models take "
                        f"a left and a right eye; --eye_mode per_eye turns a dual-eye table into single images)")
