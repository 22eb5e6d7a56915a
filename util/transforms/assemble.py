"""Transforms for a model's data: the image reader (fundus preprocessing, optional cache), the eval transform
from the model's data config, and the train/eval transforms of every split of a run.

``eval_inputs`` is the one way an evaluation, ``predict.py`` and everything applying a checkpoint turn an
image file into the model's input.
"""
from __future__ import annotations

from typing import Callable

from util.image_io import load_image
from util.transforms.dual import build_dual_transform
from util.transforms.fundus import FundusReader, build_preprocess
from util.transforms.pipelines import build_transform


def build_reader(fundus_crop: str = "none", fov_threshold: int = 10, preprocess_size: int = 0,
                 cache_dir: str | None = None) -> FundusReader | None:
    """The fundus preprocessing as an image reader (``None``: plain ``load_image``)."""
    preprocess = build_preprocess(fundus_crop, threshold=fov_threshold, size=preprocess_size)
    return FundusReader(preprocess, cache_dir=cache_dir or None) if (preprocess or cache_dir) else None


def _common(data_cfg: dict) -> dict:
    return dict(mean=data_cfg["mean"], std=data_cfg["std"], interpolation=data_cfg.get("interpolation", "bicubic"),
                crop_pct=data_cfg.get("crop_pct"))


def build_eval_transform(num_views: int, data_cfg: dict) -> Callable:
    """Resize + center crop + normalise (the reference's eval transform), or the pair version for two views."""
    if num_views == 2:
        return build_dual_transform(False, data_cfg["input_size"], **_common(data_cfg))
    return build_transform(False, data_cfg["input_size"], **_common(data_cfg))


def eval_inputs(num_views: int, data_cfg: dict, preprocessing: dict) -> tuple[Callable, Callable]:
    """(read, transform) for applying a model: ``read(path)`` gives the preprocessed RGB image."""
    reader = build_reader(**preprocessing)
    return (reader if reader is not None else load_image), build_eval_transform(num_views, data_cfg)


def attach_transforms(datasets: dict, data_cfg: dict, reader, augment: dict, say) -> None:
    """The reader on every split; the train augmentation on the train split (``augment``: the CLI's aa,
    reprob, remode, recount, color_jitter, hflip, vflip, rotation, train_aug), the eval transform elsewhere;
    dual-eye data gets the consistent pair transform (flips, rotation, colour jitter and crops only)."""
    size = data_cfg["input_size"]
    for split, ds in datasets.items():
        ds.reader = reader
        train = split == "train"
        if not train:
            ds.transform = build_eval_transform(ds.num_views, data_cfg)
        elif ds.num_views == 2:
            pair = {k: augment[k] for k in ("hflip", "vflip", "rotation", "color_jitter")}
            ds.transform = build_dual_transform(True, size, **_common(data_cfg), **pair)
            say("note: dual-eye training uses the pair transform (flips, rotation, colour jitter, crops); --aa, "
                "--reprob, --remode, --recount and --train_aug do not apply to it")
        else:
            ds.transform = build_transform(True, size, aa=augment["aa"], reprob=augment["reprob"],
                                           remode=augment["remode"], recount=augment["recount"],
                                           color_jitter=augment["color_jitter"], hflip=augment["hflip"],
                                           policy=augment["train_aug"], rotation=augment["rotation"],
                                           vflip=augment["vflip"], **_common(data_cfg))
