"""Find the weights file ``--finetune`` names, with advice that fits its source when it is missing; the table
of the pretrained sources this toolkit knows (where each is published, its licence, whether access is gated).

``find_weights(name, weights_dir)`` only looks at the file system (``os.path.isfile``): it imports neither
Paddle nor the models, so ``main_finetune.py`` can call it first and a missing file fails in a second, not
after Paddle is imported, the data scanned and the model built. ``models.pretrained`` uses it for every load.
``model_for_arch`` (the reference's ``--model Dinov2 --model_arch dinov2_vitl14`` spelling) lives here for the
same reason: ``util.config`` checks it before anything heavy is imported.

Nothing is ever downloaded. Known by name:

* ``PRETRAINED_SOURCES``: the retinal foundation models and DINOv2 -- RETFound MAE and RETFound-DINOv2
  (PyTorch checkpoints the RETFound authors publish on the Hugging Face hub, access-gated, CC BY-NC 4.0),
  Meta's DINOv2 ViT-S/B/L/14 (Apache-2.0), RETFound-Green (its author's non-commercial licence) and VisionFM's
  fundus encoder (CC BY-NC 4.0); each with the models it fits and its checkpoint layout. They are read
  directly or converted once with ``python -m models.convert``.
* PaddleClas ImageNet checkpoints (``EfficientNetB4_pretrained.pdparams``, ``ResNet50_pretrained.pdparams``,
  ...), named ``<Model>_pretrained.pdparams`` as in PaddleClas's model zoo; Paddle layout, read as they are.

References: rmaphoh/RETFound README and ``main_finetune.py`` (the weights on the Hugging Face hub,
``--model_arch``); facebookresearch/dinov2 README (download addresses, licence); justinengelmann/RETFound_Green
README and LICENSE; ABILab-CUHK/VisionFM README and LICENSE; PaddlePaddle/PaddleClas (``MODEL_URLS`` of
``ppcls/arch/backbone/legendary_models/resnet.py`` and ``model_zoo/efficientnet.py``, ``efficientnet_v2.py``,
``convnext.py``: file names and download addresses).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

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


# ----------------------------------------------------------------------------------------------- known sources
# checkpoint layouts of the sources below, as models.convert / models.pretrained read them
LAYOUTS: dict[str, str] = {
    "mae": "MAE pretraining checkpoint {'model': encoder + decoder_* + mask_token}",
    "dinov2_teacher": "DINOv2 teacher {'teacher': backbone.* + dino_head.* + ibot_head.*}",
    "dinov2_meta": "Meta's DINOv2 release: a bare state dict (+ mask_token)",
    "timm": "timm state dict (vit_small_patch14_reg4_dinov2, no head)",
    "ibot_teacher": "iBOT teacher {'teacher': [module.]backbone.* + head.*, 'student', ...}",
    "paddleclas": "PaddleClas state dict (Paddle layout, 1000-class head)",
}
HF_RETFOUND = "https://huggingface.co/YukunZhou/"
HF_GATED = "yes: log in to Hugging Face and accept the access conditions on the model page"
RETFOUND_LICENCE = "CC BY-NC 4.0"
GREEN_URL = "https://github.com/justinengelmann/RETFound_Green"
GREEN_LICENCE = ("RETFound-Green's own non-commercial research licence (CNCRL: research only; commercial "
                 "entities and industry-involved projects need the author's written permission)")
VISIONFM_URL = "https://github.com/ABILab-CUHK/VisionFM"
DINOV2_URL = "https://github.com/facebookresearch/dinov2"


@dataclass(frozen=True)
class PretrainedSource:
    """One published pretrained checkpoint: ``name`` is its publisher's file name without the extension."""

    name: str
    models: tuple[str, ...]     # the toolkit models it fits (--model)
    layout: str                 # a key of LAYOUTS
    published: str              # where it is published
    licence: str
    gated: str                  # "no", or how access is granted
    file: str                   # the publisher's file name
    checked: str                # how this toolkit's reading of the layout is checked

    def describe(self) -> str:
        return (f"published at {self.published}; licence: {self.licence}; access gated: {self.gated}; "
                f"fits --model {', '.join(self.models)}; layout: {LAYOUTS[self.layout]}")


def _fixture(test: str) -> str:
    return f"timm reference fixture of the layout (tests/unit/{test})"


def _retfound(name: str, models: tuple[str, ...], layout: str) -> PretrainedSource:
    test = "test_pretrained.py" if layout == "mae" else "test_dinov2.py"
    return PretrainedSource(name, models, layout, f"the Hugging Face hub, YukunZhou/{name} ({HF_RETFOUND}{name}; "
                            f"list at {RETFOUND_URL})", RETFOUND_LICENCE, HF_GATED, name + ".pth", _fixture(test))



def _dinov2(size: str) -> PretrainedSource:
    stem = f"dinov2_vit{size}14_pretrain"
    return PretrainedSource(stem, (f"dinov2_vit{size}14",), "dinov2_meta",
                            f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/{stem}.pth (Meta, {DINOV2_URL})",
                            "Apache-2.0", "no", stem + ".pth", _fixture("test_dinov2.py"))


PRETRAINED_SOURCES: dict[str, PretrainedSource] = {s.name: s for s in [
    *(_retfound(f"RETFound_mae_{d}", ("retfound_mae", "dual_retfound"), "mae")
      for d in ("natureCFP", "natureOCT", "meh", "shanghai")),
    *(_retfound(f"RETFound_dinov2_{d}", ("retfound_dinov2",), "dinov2_teacher") for d in ("meh", "shanghai")),
    *(_dinov2(size) for size in "sbl"),
    PretrainedSource("retfoundgreen_statedict", ("retfound_green",), "timm",
                     f"{GREEN_URL}/releases/download/v0.1/retfoundgreen_statedict.pth (release v0.1 of {GREEN_URL})",
                     GREEN_LICENCE, "no", "retfoundgreen_statedict.pth", _fixture("test_dinov2.py")),
    PretrainedSource("VFM_Fundus_weights", ("visionfm",), "ibot_teacher",
                     "https://drive.google.com/file/d/13uWm0a02dCWyARUcrCdHZIcEgRfBmVA4/view (Google Drive, "
                     f"linked from {VISIONFM_URL}; the fundus encoder)", "CC BY-NC 4.0", "no",
                     "VFM_Fundus_weights.pth", _fixture("test_dinov2.py")),
]}


def find_source(name: str) -> PretrainedSource | None:
    """The known source ``name`` (a bare name, file name or path) refers to, by its file stem, any case."""
    stem = _stem(os.fspath(name)).lower()
    return next((s for s in PRETRAINED_SOURCES.values() if s.name.lower() == stem), None)


def source_rows() -> list[dict[str, str]]:
    """Every known pretrained source (PaddleClas's too) as table rows, for ``python -m models.list``."""
    rows = [{"weights": s.file, "models": ", ".join(s.models), "layout": s.layout, "published": s.published,
             "licence": s.licence, "gated": s.gated, "checked": s.checked} for s in PRETRAINED_SOURCES.values()]
    rows += [{"weights": f, "models": ", ".join(m), "layout": "paddleclas", "published": url,
              "licence": "Apache-2.0", "gated": "no",
              "checked": "PaddleClas-built networks (tests/unit/test_cnn_pretrained.py)"}
             for f, (m, url) in PADDLECLAS_WEIGHTS.items()]
    return rows


# ----------------------------------------------------------------------------------------------- --model_arch
# The reference selects some models by (--model, --model_arch): its Dinov2 entry needs the arch, the others
# only repeat the model. Keys of MODEL_ARCHS: the reference's --model spelling (compared ignoring case) ->
# {--model_arch: toolkit model}. Any other --model with a --model_arch must name the same model.
MODEL_ARCHS: dict[str, dict[str, str]] = {
    "dinov2": {"dinov2_vits14": "dinov2_vits14", "dinov2_vitb14": "dinov2_vitb14", "dinov2_vitl14": "dinov2_vitl14"},
    "retfound_dinov2": {"retfound_dinov2": "retfound_dinov2"},
    "retfound_mae": {"retfound_mae": "retfound_mae"},
}
# --model spellings (lower case) of each arch's model, besides the model's own name
_ARCH_MODEL_SPELLINGS = {"retfound_mae": {"vit_large_patch16"}}
_UNSUPPORTED_ARCHS = {
    "dinov2_vitg14": "DINOv2 ViT-g/14 (SwiGLU MLP, 1.1B parameters) is not ported; use dinov2_vitl14",
}


def model_for_arch(model: str, model_arch: str | None) -> str:
    """The ``--model`` to build for ``--model`` + ``--model_arch``; raises ``UserError`` on a pair that does not fit.

    ``--model Dinov2`` needs an arch (``dinov2_vits14``, ``dinov2_vitb14``, ``dinov2_vitl14``) and becomes it;
    with any other model the arch, if given, must name that model (``--model RETFound_dinov2 --model_arch
    retfound_dinov2``) and the model is returned unchanged (aliases are resolved by ``models.registry``).
    """
    arch = (model_arch or "").strip()
    archs = {a: m for table in MODEL_ARCHS.values() for a, m in table.items()}
    known = ", ".join(sorted(archs))
    if arch.lower() in _UNSUPPORTED_ARCHS:
        raise UserError(f"--model_arch {arch}: {_UNSUPPORTED_ARCHS[arch.lower()]} (supported: {known})")
    if arch.lower().startswith("dinov3"):
        raise UserError(f"--model_arch {arch}: DINOv3 is not ported to this toolkit (supported: {known}); use a "
                        f"DINOv2 arch or --model retfound_dinov2")
    family = MODEL_ARCHS.get(model.lower())
    if family is not None and len(family) > 1:       # Dinov2: the arch picks the model
        if not arch:
            raise UserError(f"--model {model}: needs --model_arch (one of {', '.join(family)}), as in the "
                            f"reference; or pass the model directly, e.g. --model dinov2_vitl14")
        if arch not in family:
            near = close_matches(arch, list(family), n=2)
            raise UserError(f"--model_arch {arch}: not an arch of --model {model} (expected one of "
                            f"{', '.join(family)}){'; did you mean ' + ', '.join(near) + '?' if near else ''}")
        return family[arch]
    if not arch:
        return model
    if arch not in archs:
        near = close_matches(arch, list(archs), n=2)
        raise UserError(f"--model_arch {arch}: unknown (expected one of {known}, the reference's spellings)"
                        f"{'; did you mean ' + ', '.join(near) + '?' if near else ''}; or leave --model_arch out")
    target = archs[arch]
    if model.lower() != target and model.lower() not in _ARCH_MODEL_SPELLINGS.get(target, set()):
        raise UserError(f"--model {model} --model_arch {arch}: the arch names model {target}, not {model} "
                        f"(expected the same model twice, as the reference's scripts pass it); pass --model "
                        f"{target}, or leave --model_arch out")
    return model


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
    source = find_source(name)
    if source is not None:
        def advice(n: str, d: str) -> str:
            return _source_advice(source, n, d)
    else:
        family = weights_family(name)
        advice = {"retfound": _retfound_advice, "paddleclas": _paddleclas_advice}.get(family, _generic_advice)
    not_there = f"; a path with a folder part is not looked up in {weights_dir}/" if _has_directory(name) else ""
    raise UserError(f"pretrained weights {name!r}: no file found (looked at: {', '.join(candidates)}{not_there}); "
                    + advice(name, weights_dir))


def _put_it(weights_dir: str) -> str:
    return f"{weights_dir}/ (--weights_dir; run.sh passes WEIGHTS_DIR, default ./weights)"


def _source_advice(source: PretrainedSource, name: str, weights_dir: str) -> str:
    target = os.path.join(weights_dir, source.name)
    return (f"{source.file} is {source.describe()}; nothing is downloaded from here: fetch it on a machine with "
            f"internet access (respecting its licence), copy it into {_put_it(weights_dir)} and convert it once "
            f"with `python -m models.convert {source.file} {target}.pdparams` (a .pth placed at {target}.pth is "
            f"also read directly), or pass the file's path; `python -m models.list` shows every known source")


def _retfound_advice(name: str, weights_dir: str) -> str:
    stem = _stem(name) or "RETFound_mae_meh"
    target = os.path.join(weights_dir, stem)
    return (f"RETFound weights are published on the Hugging Face hub (e.g. YukunZhou/RETFound_mae_meh, "
            f"YukunZhou/RETFound_mae_natureCFP, YukunZhou/RETFound_mae_natureOCT; list at {RETFOUND_URL}; the "
            f"licence and access terms are on each model page) and cannot be downloaded from here: fetch "
            f"{stem}.pth on a machine with internet access, copy it into {_put_it(weights_dir)} and convert it "
            f"once with `python -m models.convert {stem}.pth {target}.pdparams` (a .pth placed at {target}.pth is "
            f"also read directly), or pass the file's path; the names known here: "
            f"{', '.join(n for n in PRETRAINED_SOURCES if n.lower().startswith('retfound'))} "
            f"(`python -m models.list`)")


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
            f"...; see {RETFOUND_URL}), DINOv2's, RETFound-Green's and VisionFM's (`python -m models.list` lists "
            f"them with their licences) and PaddleClas's ImageNet <Model>_pretrained.pdparams for the CNN models "
            f"(e.g. {', '.join(list(PADDLECLAS_WEIGHTS)[:2])}; see {PADDLECLAS_URL})")
