"""Find the weights file ``--finetune`` names, with advice that fits its family when it is missing.

``find_weights(name, weights_dir)`` only looks at the file system (``os.path.isfile``): it imports neither
Paddle nor the models, so ``main_finetune.py`` can call it first and a missing file fails in a second, not
after Paddle is imported, the data scanned and the model built. ``models.pretrained`` uses it for every load.

Two families of pretrained weights are known by name, and nothing is ever downloaded:

* RETFound (``RETFound_mae_meh``, ``RETFound_mae_natureCFP``, ...): PyTorch checkpoints the RETFound authors
  publish on the Hugging Face hub; read directly or converted once with ``python -m models.convert``.
* PaddleClas ImageNet checkpoints (``EfficientNetB4_pretrained.pdparams``, ``ResNet50_pretrained.pdparams``,
  ...), named ``<Model>_pretrained.pdparams`` as in PaddleClas's model zoo; Paddle layout, read as they are.

References: rmaphoh/RETFound_MAE (README: weights on the Hugging Face hub); PaddlePaddle/PaddleClas
(``MODEL_URLS`` of ``ppcls/arch/backbone/legendary_models/resnet.py`` and ``model_zoo/efficientnet.py``,
``efficientnet_v2.py``, ``convnext.py``: file names and download addresses).
"""
from __future__ import annotations

import os

from util.errors import UserError, close_matches

WEIGHT_EXTENSIONS = (".pth", ".pdparams", ".safetensors")       # tried, in this order, after a bare name
KNOWN_EXTENSIONS = (".pth", ".pt", ".bin", ".pdparams", ".safetensors")
RETFOUND_URL = "https://github.com/rmaphoh/RETFound_MAE"
PADDLECLAS_URL = "https://github.com/PaddlePaddle/PaddleClas"
_PADDLECLAS_HOST = "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/"

# PaddleClas ImageNet checkpoint -> (the toolkit models whose backbone it fits, PaddleClas's download address)
PADDLECLAS_WEIGHTS: dict[str, tuple[tuple[str, ...], str]] = {
    "ResNet18_pretrained.pdparams": (("resnet18",), _PADDLECLAS_HOST + "legendary_models/ResNet18_pretrained.pdparams"),
    "ResNet50_pretrained.pdparams": (("resnet50", "dual_resnet50"),
                                     _PADDLECLAS_HOST + "legendary_models/ResNet50_pretrained.pdparams"),
    "EfficientNetB0_pretrained.pdparams": (("efficientnet_b0",), _PADDLECLAS_HOST + "EfficientNetB0_pretrained.pdparams"),
    "EfficientNetB1_pretrained.pdparams": (("efficientnet_b1",), _PADDLECLAS_HOST + "EfficientNetB1_pretrained.pdparams"),
    "EfficientNetB2_pretrained.pdparams": (("efficientnet_b2",), _PADDLECLAS_HOST + "EfficientNetB2_pretrained.pdparams"),
    "EfficientNetB3_pretrained.pdparams": (("efficientnet_b3",), _PADDLECLAS_HOST + "EfficientNetB3_pretrained.pdparams"),
    "EfficientNetB4_pretrained.pdparams": (("efficientnet_b4",), _PADDLECLAS_HOST + "EfficientNetB4_pretrained.pdparams"),
    "EfficientNetV2_M_pretrained.pdparams": (("efficientnet_v2_m",),
                                             _PADDLECLAS_HOST + "EfficientNetV2_M_pretrained.pdparams"),
    "ConvNeXt_tiny_pretrained.pdparams": (("convnext_tiny",), _PADDLECLAS_HOST + "ConvNeXt_tiny_pretrained.pdparams"),
    "ConvNeXt_small_pretrained.pdparams": (("convnext_small", "dual_convnext_small"),
                                           _PADDLECLAS_HOST + "ConvNeXt_small_pretrained.pdparams"),
}


def _has_directory(name: str) -> bool:
    return os.sep in name or "/" in name or bool(os.altsep and os.altsep in name)


def _stem(name: str) -> str:
    """The file name without a directory part and without a known weights extension."""
    base = os.path.basename(name)
    root, ext = os.path.splitext(base)
    return root if ext.lower() in KNOWN_EXTENSIONS else base


def weights_candidates(name: str, weights_dir: str = "./weights") -> list[str]:
    """The paths ``find_weights`` tries for ``name``, in order (see there)."""
    ext = os.path.splitext(name)[1].lower()
    if _has_directory(name):
        candidates = [name] if ext in KNOWN_EXTENSIONS else [name] + [name + e for e in WEIGHT_EXTENSIONS]
    elif ext in KNOWN_EXTENSIONS:   # the current folder first: where such a name was read from before
        candidates = [name, os.path.join(weights_dir, name)]
    else:
        candidates = [os.path.join(weights_dir, name + e) for e in WEIGHT_EXTENSIONS]
    unique: list[str] = []
    for c in candidates:   # --weights_dir . would list the current-folder path twice
        if os.path.normpath(c) not in {os.path.normpath(u) for u in unique}:
            unique.append(c)
    return unique


def weights_family(name: str) -> str:
    """``'retfound'``, ``'paddleclas'`` or ``''`` (unknown), from the file name alone."""
    stem = _stem(name).lower()
    if stem.startswith("retfound"):
        return "retfound"
    known = {os.path.splitext(f)[0].lower() for f in PADDLECLAS_WEIGHTS}
    if stem.endswith("_pretrained") or stem in known or stem + "_pretrained" in known:
        return "paddleclas"
    return ""


def find_weights(name: str, weights_dir: str = "./weights") -> str:
    """Path of the weights file ``name`` refers to; raises ``UserError`` with advice when there is none.

    The lookup, first existing file wins:

    * a path with a directory part (``weights/x.pth``, ``/data/x``) is taken as given, relative to the current
      folder; without a known extension, ``.pth``, ``.pdparams`` and ``.safetensors`` are also tried after it;
    * a bare file name with a known extension (``EfficientNetB4_pretrained.pdparams``, ``RETFound_mae_meh.pth``)
      is looked for in the current folder first (so a file found there before still wins, and a ``--resume``
      path already checked to exist is the one loaded), then in ``weights_dir``;
    * a bare name without one (``RETFound_mae_meh``) is ``<weights_dir>/<name>`` + ``.pth``, ``.pdparams``,
      ``.safetensors``, in that order.

    Only ``os.path.isfile`` is called: nothing is read, imported or downloaded. The error names every path
    tried and, for a RETFound or PaddleClas name, where that family's weights are published and what to do.
    """
    name = os.fspath(name)
    candidates = weights_candidates(name, weights_dir)
    for c in candidates:
        if os.path.isfile(c):
            return c
    family = weights_family(name)
    advice = {"retfound": _retfound_advice, "paddleclas": _paddleclas_advice}.get(family, _generic_advice)
    not_there = f"; a path with a folder part is not looked up in {weights_dir}/" if _has_directory(name) else ""
    raise UserError(f"pretrained weights {name!r}: no file found (looked at: {', '.join(candidates)}{not_there}); "
                    + advice(name, weights_dir))


def _put_it(weights_dir: str) -> str:
    return f"{weights_dir}/ (--weights_dir; run.sh passes WEIGHTS_DIR, default ./weights)"


def _retfound_advice(name: str, weights_dir: str) -> str:
    stem = _stem(name) or "RETFound_mae_meh"
    target = os.path.join(weights_dir, stem)
    return (f"RETFound weights are published on the Hugging Face hub (e.g. YukunZhou/RETFound_mae_meh, "
            f"YukunZhou/RETFound_mae_natureCFP, YukunZhou/RETFound_mae_natureOCT; list at {RETFOUND_URL}; the "
            f"licence and access terms are on each model page) and cannot be downloaded from here: fetch "
            f"{stem}.pth on a machine with internet access, copy it into {_put_it(weights_dir)} and convert it "
            f"once with `python -m models.convert {stem}.pth {target}.pdparams` (a .pth placed at {target}.pth is "
            f"also read directly), or pass the file's path")


def _paddleclas_advice(name: str, weights_dir: str) -> str:
    base = _stem(name) + ".pdparams"
    where = f"the PaddleClas model zoo ({PADDLECLAS_URL}, Apache-2.0)"
    if base in PADDLECLAS_WEIGHTS:
        models, url = PADDLECLAS_WEIGHTS[base]
        what = (f"{base} is PaddleClas's ImageNet checkpoint for {', '.join(models)}, published in {where} at "
                f"{url}")
    else:
        # match on the model part: every file shares the _pretrained.pdparams tail
        by_model = {f[: -len("_pretrained.pdparams")]: f for f in PADDLECLAS_WEIGHTS}
        near = close_matches(_stem(name).removesuffix("_pretrained"), by_model, n=1)
        if near:
            f = by_model[near[0]]
            which = f"the closest one this toolkit's models take is {f} ({', '.join(PADDLECLAS_WEIGHTS[f][0])})"
        else:
            which = "the ones this toolkit's CNN models take are " + ", ".join(
                f"{f} ({', '.join(m)})" for f, (m, _) in PADDLECLAS_WEIGHTS.items())
        what = (f"PaddleClas ImageNet checkpoints are published in {where} as <Model>_pretrained.pdparams "
                f"(download addresses in the MODEL_URLS of each model's file under ppcls/arch/backbone); {which}")
    return (f"{what}; nothing is downloaded from here: fetch the file on a machine with internet access and copy "
            f"it into {_put_it(weights_dir)}, or pass the file's path; it is read as it is (no conversion)")


def _generic_advice(name: str, weights_dir: str) -> str:
    return (f"pass the path of an existing weights file, or copy the file into {_put_it(weights_dir)} and pass "
            f"its bare file name; the "
            f"pretrained weights this toolkit knows by name are RETFound's for the ViT models (RETFound_mae_meh, "
            f"...; see {RETFOUND_URL}) and PaddleClas's ImageNet <Model>_pretrained.pdparams for the CNN models "
            f"(e.g. {', '.join(list(PADDLECLAS_WEIGHTS)[:2])}; see {PADDLECLAS_URL})")
