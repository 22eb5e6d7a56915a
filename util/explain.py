"""Heat maps of what a model looked at: attention rollout (ViTs) and Grad-CAM (ViTs and CNNs).

* **Attention rollout** (``'rollout'``, ViT models only): the attention weights of every block (collected
  through ``models.vit.Attention.attn_sink``) are averaged over heads, the identity is added for the residual
  connection and the rows are re-normalised, ``A_l = (mean_h attn_l + I) / 2``, and the layers are multiplied
  through, ``R = A_L ... A_2 A_1``. Row ``i`` of ``R`` says how much each input token flows into output token
  ``i``. The map is the row of the token(s) the classifier reads, over the patch tokens: the cls token's row
  for a ViT that classifies from its cls token (``global_pool=False``), and the mean of the patch-token rows
  when the classifier reads the mean of the patch tokens (``global_pool=True``, the RETFound default, and the
  patch tokens a dual-eye model pools), because in that mode the cls token is not read at all and its row
  says nothing about the prediction. Rollout does not depend on the class.
* **Grad-CAM** (``'gradcam'``): the gradient of the target score (the logit of the target class or label;
  the single output of a regression model) with respect to a feature map ``A`` gives one weight per channel,
  ``w_c = mean over positions of dS/dA_c``, and the map is ``ReLU(sum_c w_c A_c)``. CNNs use their last
  feature map (``forward_feature_map``, the input of the global pooling, see ``models/cnn.py``); ViTs use the
  output tokens of the last block's ``norm1`` (the input of its attention), patch tokens reshaped to the
  patch grid, as RETFound-derived works do with pytorch-grad-cam. On a ViT this sees only what enters the
  last block's attention: evidence that earlier blocks already spread over all tokens can show up nowhere,
  or as negative (removed by the ReLU). On the synthetic lesion task of ``tests/e2e/test_explain_lesion.py``
  it found the deciding lesion for 7 of 8 training seeds of a tiny ViT, rollout for 8 of 8: prefer rollout
  for ViTs.

Maps are computed at the model's grid, upsampled bilinearly to the input size and min-max normalised to
[0, 1] per sample (a map with no variation, e.g. a Grad-CAM that is zero everywhere, stays all zeros).
Dual-eye models (input ``[B, 2, 3, H, W]``) give a map per eye, ``[B, 2, H, W]``, normalised over both eyes
together, so the eye that drove the decision stands out; their rollout covers the shared ViT backbone of each
eye (the cross-eye attention after it is not attention over image patches and is left out).

Nothing here changes a model: the attention sink and the hooks are removed after each call, the model's
train/eval mode is restored, and Grad-CAM takes gradients with ``paddle.grad`` (parameter gradients are not
touched).

References: Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020 (attention rollout);
Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization", ICCV 2017;
jacobgil/pytorch-grad-cam (``vit_example.py``: Grad-CAM on ``blocks[-1].norm1`` reshaped to the patch grid).
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np
import paddle
import paddle.nn.functional as F
from PIL import Image

from models.cpu_kernels import suspended as paddle_kernels_only
from models.vit import VisionTransformer
from util.errors import UserError
from util.fileio import atomic_path

METHODS = ("rollout", "gradcam")


# ----------------------------------------------------------------------------------------------- model parts
def _find(model, test):
    """``model`` or its first sub-layer (in definition order) for which ``test`` holds, else None."""
    for layer in [model] + list(model.sublayers()):
        if test(layer):
            return layer
    return None


def _find_vit(model) -> VisionTransformer | None:
    return _find(model, lambda layer: isinstance(layer, VisionTransformer))


def _find_cnn(model):
    """The CNN whose ``forward_feature_map`` gives the last feature map (the model, or a dual model's backbone)."""
    return _find(model, lambda layer: callable(getattr(type(layer), "forward_feature_map", None)))


def check_method(method: str, model=None) -> str:
    """``method`` if it is a known method that applies to ``model``, else a ``UserError``."""
    if method not in METHODS:
        raise UserError(f"--explain {method!r}: unknown method (one of {', '.join(METHODS)}); pass one of those")
    if method == "rollout" and model is not None and _find_vit(model) is None:
        raise UserError(f"--explain rollout: {type(model).__name__} is not a vision transformer (attention rollout "
                        f"needs the attention weights of a ViT); use --explain gradcam for CNNs")
    return method


def resolve_target(value: str | int | None, class_names: Sequence[str], num_outputs: int,
                   method: str = "gradcam") -> int | None:
    """The output index ``--explain_class`` names (a class name or an index); None stays None (the predicted
    class). A regression model's single output is its only target."""
    if value is None:
        return None
    if method == "rollout":
        raise UserError(f"--explain_class {value}: attention rollout does not depend on the class (it follows the "
                        f"attention only); drop --explain_class or use --explain gradcam")
    names = list(class_names)
    if num_outputs == 1 and len(names) != 1:
        raise UserError(f"--explain_class {value}: a regression model has a single output (the grade), which is "
                        f"always the target; drop --explain_class")
    text = str(value)
    if text in names:
        return names.index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < num_outputs:
        return int(text)
    raise UserError(f"--explain_class {value}: not a class of this model (one of {', '.join(names)}, or an index "
                    f"0..{num_outputs - 1}); pass one of those")


# ----------------------------------------------------------------------------------------------- methods
class _HeadMean(list):
    """An attention sink that keeps the mean over heads [B, T, T] of what it receives (RETFound ViT-L at batch 8:
    24 x 8 x 197^2 values instead of 16 times that)."""

    def append(self, attn: paddle.Tensor) -> None:
        super().append(attn.astype("float64").mean(axis=1))


def _rollout(model, images: paddle.Tensor) -> np.ndarray:
    """Attention rollout per image (per eye): [B * views, g, g] at the ViT's patch grid."""
    vit = _find_vit(model)
    attns = [blk.attn for blk in vit.blocks]
    sinks = [_HeadMean() for _ in attns]
    for layer, sink in zip(attns, sinks):
        layer.attn_sink = sink
    try:
        with paddle.no_grad():
            model(images)
    finally:
        for layer in attns:
            del layer.attn_sink   # back to the class default (None): nothing kept
    rollout = None
    for sink in sinks:
        if len(sink) != 1:
            raise RuntimeError(f"attention rollout: a block ran {len(sink)} times in one forward (expected once)")
        a = sink[0]                                                      # [B', T, T], heads averaged
        a = a + paddle.eye(a.shape[-1], dtype=a.dtype)                   # the residual connection
        a = a / a.sum(axis=-1, keepdim=True)
        rollout = a if rollout is None else paddle.matmul(a, rollout)
    # the classifier's input decides which row: the cls token's (a ViT head on the cls token) or the mean
    # of the patch tokens' (global pooling; the patch tokens a dual-eye model pools)
    p = getattr(vit, "num_prefix_tokens", 1)                             # cls (+ register tokens)
    if vit.num_outputs > 0 and not vit.global_pool:
        row = rollout[:, 0, p:]
    else:
        row = rollout[:, p:, p:].mean(axis=1)
    g = vit.patch_embed.grid_size
    return row.reshape([-1, g, g]).numpy()


def _gradcam(model, images: paddle.Tensor, target) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM per image (per eye) at the feature grid, [B * views, h, w], and the target per image."""
    captured = []
    vit = _find_vit(model)
    x = images.detach()
    x.stop_gradient = False   # a graph even when every parameter is frozen
    # paddle.grad of the features alone: Paddle's kernels (models/cpu_kernels.py ``suspended`` says why)
    with paddle.set_grad_enabled(True), paddle_kernels_only():
        if vit is not None:
            def keep(layer, inputs, output):
                captured.append(output)

            handle = vit.blocks[-1].norm1.register_forward_post_hook(keep)
            try:
                logits = model(x)
            finally:
                handle.remove()
        else:
            cnn = _find_cnn(model)
            if cnn is None:
                raise UserError(f"--explain gradcam: {type(model).__name__} has neither ViT blocks nor a CNN "
                                f"feature map (forward_feature_map); explanations cover the toolkit's models")
            plain = type(cnn).forward_feature_map

            def feature_map(inp):
                out = plain(cnn, inp)
                captured.append(out)
                return out

            cnn.forward_feature_map = feature_map   # an instance attribute: the class's method is untouched
            try:
                logits = model(x)
            finally:
                del cnn.forward_feature_map
        if len(captured) != 1:
            raise RuntimeError(f"Grad-CAM: the feature layer ran {len(captured)} times in one forward (expected once)")
        targets = _targets(logits, target)
        onehot = F.one_hot(paddle.to_tensor(targets, dtype="int64"), logits.shape[1]).astype(logits.dtype)
        score = (logits * onehot).sum()
        feats = captured[0]
        grads = paddle.grad(score, feats)[0]
    feats, grads = feats.detach().astype("float64"), grads.astype("float64")
    if vit is not None:                                   # tokens [B', prefix + N, D] -> patch tokens
        p = getattr(vit, "num_prefix_tokens", 1)
        feats, grads = feats[:, p:], grads[:, p:]
        weights = grads.mean(axis=1, keepdim=True)        # [B', 1, D]
        cam = F.relu((feats * weights).sum(axis=-1))      # [B', N]
        g = vit.patch_embed.grid_size
        cam = cam.reshape([-1, g, g])
    else:                                                 # map [B', C, h, w]
        weights = grads.mean(axis=[2, 3], keepdim=True)
        cam = F.relu((feats * weights).sum(axis=1))
    return cam.numpy(), targets


def _targets(logits: paddle.Tensor, target) -> np.ndarray:
    """Target output per image: given (one index for all, or one per image) or the highest output."""
    n, k = logits.shape
    if target is None:
        return logits.detach().argmax(axis=1).numpy().astype(np.int64).reshape(n)
    t = np.asarray(target, dtype=np.int64).reshape(-1)
    if t.size == 1:
        t = np.full(n, int(t[0]), dtype=np.int64)
    if t.size != n:
        raise UserError(f"explain: {t.size} targets for {n} images (expected one, or one per image); pass one "
                        f"target or one per image")
    if t.min() < 0 or t.max() >= k:
        raise UserError(f"explain: target {int(t.max() if t.max() >= k else t.min())} out of range (the model "
                        f"has outputs 0..{k - 1}); pass a valid class index")
    return t


def _upsample_normalise(maps: np.ndarray, batch: int, views: int, size) -> np.ndarray:
    """[B * views, h, w] -> bilinear to ``size`` -> min-max per sample (over its views) -> [B, (views,) H, W]."""
    grid = maps.astype(np.float64).reshape([batch, -1])
    # a map without variation at its own grid (all-zero Grad-CAM, a 1x1 feature map) is all zeros: stretching
    # what interpolation rounding leaves of it would draw noise
    flat = np.ptp(grid, axis=1) <= 1e-6 * np.abs(grid).max(axis=1)
    up = F.interpolate(paddle.to_tensor(maps.astype(np.float64)[:, None]), size=list(size), mode="bilinear",
                       align_corners=False)
    up = up.numpy().reshape([batch, views] + list(size))
    lo = up.min(axis=(1, 2, 3), keepdims=True)
    span = up.max(axis=(1, 2, 3), keepdims=True) - lo
    out = (up - lo) / np.where(flat.reshape(-1, 1, 1, 1) | (span <= 0), np.inf, span)
    out = out.astype(np.float32)
    return out[:, 0] if views == 1 else out


def explain(model, images, method: str, target=None) -> tuple[np.ndarray, np.ndarray | None]:
    """``explain_batch``'s maps and the target output per image (None for rollout, which has none)."""
    check_method(method, model)
    views = int(getattr(model, "num_views", 1))
    if not isinstance(images, paddle.Tensor):
        images = paddle.to_tensor(np.asarray(images, dtype=np.float32))
    want = 4 if views == 1 else 5
    if images.ndim != want or images.shape[-3] != 3 or (views == 2 and images.shape[1] != 2):
        expected = "[B, 3, H, W]" if views == 1 else "[B, 2, 3, H, W] (left and right eye)"
        raise UserError(f"explain: images of shape {list(images.shape)} (expected {expected}); pass a batch of "
                        f"the model's inputs")
    was_training = model.training
    model.eval()
    try:
        if method == "rollout":
            maps, targets = _rollout(model, images), None
        else:
            maps, targets = _gradcam(model, images, target)
    finally:
        if was_training:
            model.train()
    return _upsample_normalise(maps, images.shape[0], views, images.shape[-2:]), targets


def explain_batch(model, images, method: str, target=None) -> np.ndarray:
    """Heat maps in [0, 1] of what ``model`` looked at, one per image (dual-eye: one per eye).

    Args:
        model: a toolkit model (any ViT incl. RETFound, the PaddleClas CNNs, the dual-eye models).
        images: the model's input, [B, 3, H, W] (dual-eye: [B, 2, 3, H, W]), a paddle Tensor or an array.
        method: ``'rollout'`` (ViT only) or ``'gradcam'``.
        target: output index explained by Grad-CAM: one for every image, one per image, or None for the
            highest output (the predicted class; the single output of a regression model). Rollout ignores it.

    Returns:
        float32 maps [B, H, W] (dual-eye: [B, 2, H, W]) at the input resolution.
    """
    return explain(model, images, method, target)[0]


# ----------------------------------------------------------------------------------------------- files
def _jet(heat: np.ndarray) -> np.ndarray:
    """The jet colour map (blue -> cyan -> yellow -> red) as piecewise-linear RGB in [0, 1]."""
    h = np.clip(heat, 0.0, 1.0)[..., None]
    return np.clip(1.5 - np.abs(4.0 * h - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def overlay(image_rgb_uint8: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The heat map in jet colours blended over the image; a dual-eye pair side by side (left, then right)."""
    image = np.asarray(image_rgb_uint8)
    heat = np.asarray(heat, dtype=np.float64)
    if image.dtype != np.uint8 or image.shape[-1] != 3 or image.shape[:-1] != heat.shape or heat.ndim not in (2, 3):
        raise UserError(f"save_explanation: image {image.shape} {image.dtype} and map {heat.shape} do not fit "
                        f"(expected uint8 [H, W, 3] with a map [H, W], or [2, H, W, 3] with [2, H, W]); pass the "
                        f"un-normalised input image and its map")
    blend = (1.0 - alpha) * image + alpha * 255.0 * _jet(heat)
    blend = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    if blend.ndim == 4:   # eyes side by side with a 2-pixel black gap
        gap = np.zeros((blend.shape[1], 2, 3), dtype=np.uint8)
        blend = np.concatenate([blend[0], gap, blend[1]], axis=1)
    return blend


def save_explanation(image_rgb_uint8: np.ndarray, heat: np.ndarray, png_path: str, npy_path: str) -> None:
    """Write the overlay of ``heat`` on the image as a PNG and the raw map, exactly, as a ``.npy``."""
    picture = overlay(image_rgb_uint8, heat)
    with atomic_path(png_path, suffix=".png") as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    with atomic_path(npy_path, suffix=".npy") as tmp:
        np.save(tmp, np.asarray(heat))


def unnormalise(x: np.ndarray, mean, std) -> np.ndarray:
    """A transformed input [..., 3, H, W] (normalised, 0-1 scale statistics) as uint8 RGB [..., H, W, 3]."""
    x = np.asarray(x, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64).reshape(3, 1, 1)
    std = np.asarray(std, dtype=np.float64).reshape(3, 1, 1)
    rgb = np.clip(np.rint((x * std + mean) * 255.0), 0, 255).astype(np.uint8)
    return np.moveaxis(rgb, -3, -1)


_IMAGE_EXT = re.compile(r"\.(png|jpe?g|tiff?|bmp|webp|gif|ppm)$", re.IGNORECASE)


def file_stem(sample_id: str) -> str:
    """A file name for sample ``sample_id``: image extensions dropped, folders and the ``|`` of a left|right
    pair joined by ``__``, other characters outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
    parts = [_IMAGE_EXT.sub("", p) for p in re.split(r"[|/\\]", sample_id) if p]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", "__".join(parts)).strip(".")
    return stem or "image"


class ExplanationWriter:
    """Writes ``<out_dir>/<name>.png`` and ``<name>.npy`` per image, unique names (``-2``, ``-3`` on a clash)."""

    def __init__(self, out_dir: str, method: str, mean, std, class_names: Sequence[str] | None = None):
        self.out_dir, self.method = out_dir, method
        self.mean, self.std = mean, std
        self.class_names = list(class_names) if class_names is not None else None
        self._used: set[str] = set()

    def _unique(self, sample_id: str) -> str:
        stem = base = file_stem(sample_id)
        k = 1
        while stem.lower() in self._used:
            k += 1
            stem = f"{base}-{k}"
        self._used.add(stem.lower())
        return stem

    def caption(self, sample_id: str, target: int | None, num_outputs: int | None = None) -> str:
        if target is None:
            return f"{sample_id} (attention rollout)"
        names = self.class_names
        if num_outputs == 1 and (names is None or len(names) != 1):
            what = "the output"             # regression: one output (the grade), not the first class
        elif names is not None and target < len(names):
            what = names[target]
        else:
            what = f"output {target}"
        return f"{sample_id} ({self.method}, {what})"

    def write(self, model, batch: np.ndarray, sample_ids: Sequence[str], target=None) -> list[tuple[str, str]]:
        """Explain one batch of transformed inputs and write its files; (caption, png path) per image."""
        maps, targets = explain(model, batch, self.method, target)
        images = unnormalise(batch, self.mean, self.std)
        out = []
        for i, sid in enumerate(sample_ids):
            stem = self._unique(sid)
            png = os.path.join(self.out_dir, stem + ".png")
            save_explanation(images[i], maps[i], png, os.path.join(self.out_dir, stem + ".npy"))
            out.append((self.caption(sid, None if targets is None else int(targets[i]),
                                     getattr(model, "num_outputs", None)), png))
        return out


def write_explanations(model, dataset, out_dir: str, method: str, *, mean, std, target=None, indices=None,
                       batch_size: int = 8, class_names: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """Explain samples of ``dataset`` (``dataset[i] -> (x, label)`` transformed; ``dataset.sample_id(i)`` names
    them) and write ``<out_dir>/<name>.png`` (overlay on the input with ``mean``/``std`` undone) and ``.npy``.

    ``target``: None (the predicted class), one output index, or one per explained sample; ``indices``: the
    samples (default all); ``class_names`` (default ``dataset.class_names``) name the target in the captions.
    Returns (caption, png path) per explained sample, in order.
    """
    check_method(method, model)
    indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    if class_names is None:
        class_names = getattr(dataset, "class_names", None)
    per_sample = target is not None and np.asarray(target).size > 1
    if per_sample and np.asarray(target).size != len(indices):
        raise UserError(f"write_explanations: {np.asarray(target).size} targets for {len(indices)} samples "
                        f"(expected one, or one per sample); pass one target or one per sample")
    writer = ExplanationWriter(out_dir, method, mean, std, class_names)
    out = []
    for start in range(0, len(indices), max(1, int(batch_size))):
        chunk = indices[start:start + max(1, int(batch_size))]
        batch = np.stack([np.asarray(dataset[i][0], dtype=np.float32) for i in chunk])
        t = np.asarray(target).reshape(-1)[start:start + len(chunk)] if per_sample else target
        out += writer.write(model, batch, [dataset.sample_id(i) for i in chunk], t)
    return out
