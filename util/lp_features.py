"""``--adaptation lp --lp_cached_features``: the linear probe trained on features computed once per image.

A linear probe only trains the head, so the frozen backbone's output for an image is the same at every epoch
as long as the image is. Here every train and val image goes through the backbone once
(``model.forward_features`` in eval mode, under ``no_grad``, with the *eval* transform: resize + centre crop,
no augmentation), the features are kept in memory, and the head is trained on them with the run's own loss,
optimizer, LR schedule, batch size and epochs (``util.training.fit`` with ``model.head`` as the network and
these loaders); an epoch then costs a few matrix products instead of a pass of the backbone, so hundreds of
epochs take seconds. The test then runs the best checkpoint (the full model) on the test images as any run's
test does, so the backbone sees every image once in all.

This is a different protocol from ``--adaptation lp`` (the reference's): there the training images are
augmented afresh every epoch and the frozen backbone runs in train mode (stochastic depth); here the
features are fixed, as in the frozen-feature linear probe of RETFound-Green's evaluation (Engelmann and
Bernabeu, 2025) and MAE's/DINOv2's feature-based probes. Results of the two are not interchangeable, and a
run's config.yaml says which one it was (``lp_cached_features``).

The outputs are those of any run: ``checkpoint-best.pdparams`` is the full model with the trained head (the
backbone's weights as loaded), so ``--eval``, ``predict.py`` and ``export.py`` take it as they take any
checkpoint; metrics, thresholds, calibration and the report come from the same code. The head's checkpoints
are written once at the end (``FitOptions.lp_cached_features``) rather than every epoch: only the head
changes, and writing a ViT-L per epoch would cost more than the training. The features are extracted in one
process (``UserError`` under ``paddle.distributed.launch``: the head takes seconds, nothing to distribute).

References: RETFound-Green (Engelmann and Bernabeu, "Training a high-performance retinal foundation model
with half-the-data and 400 times less compute", Nature Communications 2025): linear probing on frozen
features; rmaphoh/RETFound ``main_finetune.py`` (``--adaptation lp``, the recipe reused here).
"""
from __future__ import annotations

import time

import numpy as np
import paddle

from util import distributed as D
from util.datasets.loader import BatchLoader, build_loaders
from util.errors import UserError
from util.progress import Progress, format_duration


class FeatureSet(paddle.io.Dataset):
    """Fixed features of a dataset's samples with their labels; ``task_type``/``targets``/``class_names`` are
    the dataset's (what the samplers and losses read)."""

    def __init__(self, features: np.ndarray, source):
        super().__init__()
        self.features = features
        self.source = source
        self.task_type, self.targets, self.class_names = source.task_type, source.targets, source.class_names
        self.data_path, self.split = source.data_path, source.split

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int):
        return self.features[index], self.source.label(index)


@paddle.no_grad()
def extract_features(model, dataset, transform, batch_size: int, workers: int, amp, header: str) -> np.ndarray:
    """``model.forward_features`` of every sample of ``dataset`` through ``transform``, in dataset order,
    as float32 ``[N, num_features]``; the model is in eval mode meanwhile and the dataset's transform restored."""
    saved, dataset.transform = dataset.transform, transform
    was_training = model.training
    model.eval()
    sampler = paddle.io.BatchSampler(dataset, batch_size=batch_size, shuffle=False, drop_last=False)
    loader = BatchLoader(dataset, sampler, num_workers=workers, name=f"{dataset.split} split")
    parts = []
    try:
        with Progress(len(loader), header, None, enabled=True, interval=30.0, unit="batch") as progress:
            for step, (samples, _) in enumerate(loader):
                with amp.autocast():
                    feats = model.forward_features(samples)
                parts.append(feats.astype("float32").numpy())
                progress.update(step, images=len(samples))
    finally:
        dataset.transform = saved
        if was_training:
            model.train()
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, int(model.num_features)), np.float32)


def feature_loaders(model, datasets: dict, transform, batch_size: int, workers: int, seed: int, amp,
                    balanced: bool, say) -> tuple[object, dict, dict]:
    """Extract the features of every split (``extract_features`` through ``transform``, the eval transform) and
    return ``(model.head, loaders, seeders)``: the network to train and evaluate on them and loaders over the
    features, built as the image loaders are (``build_loaders``: the train split shuffled or ``balanced``, the
    last partial batch dropped)."""
    if D.get_world_size() > 1:
        raise UserError("--lp_cached_features: runs in one process (the features are computed once, then the head "
                        "trains in seconds); start main_finetune.py without paddle.distributed.launch")
    t0 = time.time()
    features = {}
    for split, ds in datasets.items():
        features[split] = FeatureSet(extract_features(model, ds, transform, batch_size, workers, amp,
                                                      f"Features {split}"), ds)
    dims = {s: f.features.shape for s, f in features.items()}
    say(f"--lp_cached_features: frozen features of {', '.join(f'{s} {d[0]}' for s, d in dims.items())} images "
        f"({next(iter(dims.values()))[1]}-d, eval transform, no augmentation) in {format_duration(time.time() - t0)}; "
        "training the head on them")
    loaders, seeders = build_loaders(features, batch_size, 0, seed, 0, 1, balanced=balanced)
    return model.head, loaders, seeders
