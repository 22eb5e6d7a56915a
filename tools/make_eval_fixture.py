"""Write the PyTorch-reference fixture for ``tests/e2e/test_eval_parity.py`` (dev-only).

The fixture checks end to end that ``main_finetune.py --eval --resume <fine-tuned RETFound .pth>`` gives the
numbers the PyTorch reference computes for the same checkpoint and images. Everything in it is produced
here by the reference stack (torch, timm, torchvision, scikit-learn), never by the toolkit:

* ``data/test/<class>/*.png``: a small class-folder test split (3 classes, 8 images each) with odd sizes
  (45x38, 60x52, 38x45, 52x60, 33x33, 64x41), a grayscale and an RGBA image, and file names whose
  lexicographic order differs from their numeric order (``img_10`` before ``img_2``). Only ``test/`` is
  written: ``--eval`` builds the test split alone.
* ``checkpoint-best.pth``: a checkpoint in the fine-tuned RETFound layout, saved with ``torch.save``:
  ``{'model': state_dict, 'optimizer': AdamW state_dict (layer-decay groups), 'epoch': 7,
  'scaler': GradScaler state_dict, 'args': argparse.Namespace}``. The model is RETFound's
  ``models_vit.VisionTransformer`` (a timm ``VisionTransformer`` with ``fc_norm`` added and the encoder
  ``norm`` deleted in global-pool mode; forward = ``head(forward_features(x))``) with the architecture of
  the toolkit's ``vit_test`` (patch 16, embed 32, depth 2, heads 2, mlp 4, qkv bias, LayerNorm eps 1e-6),
  3 classes, img 32. Its weights are drawn at O(1) scale and then trained for a few AdamW steps on the
  images, so predictions are spread over the classes, correlate with the labels without being perfect,
  and every parameter has real optimizer state.
* ``reference.json``: the reference evaluation of that checkpoint on ``data/test``: RETFound's eval
  transform (crop_pct 224/256 for input <= 224; ``Resize(int(input_size / crop_pct), BICUBIC)`` on the
  short side; ``CenterCrop``; ``ToTensor``; ``Normalize`` ImageNet), ``torchvision.datasets.ImageFolder``,
  ``model.eval()``, softmax, and the scikit-learn calls of RETFound's ``engine_finetune.evaluate``
  (2024/25 version). Stores the metrics, the per-image probabilities, labels and file names in ImageFolder
  order, the mean per-sample cross-entropy, the versions used and the command that regenerates it.

Regenerate (needs PyTorch + timm + torchvision + scikit-learn; the repo's Paddle venv has none of them):

    TORCH_PYTHON tools/make_eval_fixture.py     # from the repository root

TORCH_PYTHON: the Python interpreter of an environment with those packages.

References: rmaphoh/RETFound_MAE ``models_vit.py``, ``util/datasets.py`` (build_transform),
``engine_finetune.py`` (evaluate), ``util/misc.py`` (save_model layout), ``util/lr_decay.py``
(param groups with ``lr_scale``); timm ``vision_transformer.py``; torchvision ``datasets.ImageFolder``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import types
import warnings
from functools import partial

# torchvision's compiled ops do not load in the dev torch venv; only its Python parts are needed.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import sklearn  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    accuracy_score,
    average_precision_score,
    cohen_kappa_score,
    f1_score,
    hamming_loss,
    jaccard_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "eval_ref")
CLASSES = ("cataract", "glaucoma", "normal")
PER_CLASS = 8
SIZES = [(45, 38), (60, 52), (38, 45), (52, 60), (33, 33), (64, 41)]   # (width, height)
INPUT_SIZE = 32
NB_CLASSES = len(CLASSES)
# architecture of the toolkit's registered `vit_test` (models/vit.py)
PATCH, DIM, DEPTH, HEADS = 16, 32, 2, 2
SEED = 0
COMMAND = "TORCH_PYTHON tools/make_eval_fixture.py"   # from the repository root; see the module docstring


# ----------------------------------------------------------------------------------------------- data
def write_images(root: str, rng: np.random.Generator) -> None:
    """Class-coloured images with a smooth spatial pattern plus mild noise (PNG compresses them well).

    The class signal is weak (shifted channel means) and the pattern differs per image, so a few training
    steps give spread, imperfect predictions; the spatial structure makes the output depend on resize/crop
    details.
    """
    for ci, cls in enumerate(CLASSES):
        folder = os.path.join(root, "test", cls)
        os.makedirs(folder, exist_ok=True)
        for i in range(PER_CLASS):
            w, h = SIZES[(i + ci) % len(SIZES)]
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            fx, fy, phase = rng.uniform(0.05, 0.4), rng.uniform(0.05, 0.4), rng.uniform(0, 2 * np.pi)
            wave = np.sin(fx * xx + fy * yy + phase)[..., None]                     # [h, w, 1]
            tint = np.full(3, 110.0, dtype=np.float32)
            tint[ci] += 8.0
            img = tint + 60.0 * wave * rng.uniform(0.5, 1.5, size=3) + rng.normal(0, 12, (h, w, 3))
            img = np.clip(img, 0, 255).astype(np.uint8)
            pil = Image.fromarray(img, "RGB")
            if (ci, i) == (0, 3):
                pil = pil.convert("L")            # grayscale file: both loaders convert to RGB
            elif (ci, i) == (1, 5):
                pil = pil.convert("RGBA")         # alpha channel: dropped by convert('RGB')
            # img_0 .. img_7 with img_10 style names interleaved: lexicographic != numeric order
            name = f"img_{i if i < 4 else i + 6}.png"
            pil.save(os.path.join(folder, name))


# ----------------------------------------------------------------------------------------------- model
class RETFoundViT(TimmViT):
    """RETFound ``models_vit.VisionTransformer`` as published: a timm ViT, and in global-pool mode a new
    ``fc_norm`` with the encoder ``norm`` deleted; features = fc_norm(mean of the patch tokens).

    RETFound pinned timm 0.3.2/0.4.x, whose ``forward`` is ``head(forward_features(x))``; that is written
    out here because timm 1.x's ``forward_head`` would pool the already pooled feature again.
    """

    def __init__(self, global_pool: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.global_pool = global_pool
        if self.global_pool:
            self.fc_norm = kwargs["norm_layer"](kwargs["embed_dim"])
            del self.norm

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        if self.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(dim=1))
        return self.norm(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def build_reference_model() -> RETFoundViT:
    return RETFoundViT(global_pool=True, img_size=INPUT_SIZE, patch_size=PATCH, embed_dim=DIM, depth=DEPTH,
                       num_heads=HEADS, mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                       num_classes=NB_CLASSES, drop_path_rate=0.1)


@torch.no_grad()
def randomise(model: nn.Module, gen: torch.Generator) -> None:
    """O(1)-scale weights: matrices ~ N(0, 1/fan_in) (head x3), LayerNorm weight ~ 1 + N(0, .2), biases and
    tokens ~ N(0, .1), so a wrong op or a wrong input shows up in the probabilities."""
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=gen)
        if name.endswith("weight") and p.ndim >= 2:
            r = r / float(np.prod(p.shape[1:])) ** 0.5 * (3.0 if name.startswith("head") else 1.0)
        elif name.endswith("weight"):
            r = 1.0 + 0.2 * r
        else:
            r = 0.1 * r
        p.copy_(r)


def layer_decay_groups(model: RETFoundViT, weight_decay: float = 0.05, layer_decay: float = 0.65) -> list[dict]:
    """Param groups shaped like RETFound's ``param_groups_lrd`` (decay / no-decay per layer, ``lr_scale``)."""
    num_layers = len(model.blocks) + 1
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if p.ndim == 1 or name in ("pos_embed", "cls_token"):
            g_decay, wd = "no_decay", 0.0
        else:
            g_decay, wd = "decay", weight_decay
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            lid = 0
        elif name.startswith("blocks."):
            lid = int(name.split(".")[1]) + 1
        else:
            lid = num_layers
        key = f"layer_{lid}_{g_decay}"
        groups.setdefault(key, {"lr_scale": layer_decay ** (num_layers - lid), "weight_decay": wd, "params": []})
        groups[key]["params"].append(p)
    return list(groups.values())


def eval_transform(input_size: int) -> transforms.Compose:
    """RETFound ``util/datasets.build_transform`` for evaluation."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return transforms.Compose([
        transforms.Resize(int(input_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def train_a_little(model: RETFoundViT, images: torch.Tensor, labels: torch.Tensor, steps: int, lr: float,
                   gen: torch.Generator) -> torch.optim.Optimizer:
    """A few AdamW steps (label smoothing 0.1, drop path on) so the head means something."""
    groups = layer_decay_groups(model)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(images), generator=gen)[:8]
        opt.zero_grad()
        crit(model(images[idx]), labels[idx]).backward()
        opt.step()
    model.eval()
    return opt


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def reference_evaluate(model: nn.Module, dataset: datasets.ImageFolder, batch_size: int = 5) -> dict:
    """RETFound ``engine_finetune.evaluate``: softmax, argmax, one-hots and its scikit-learn calls."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    model.eval()
    true_onehot, pred_onehot, true_labels, pred_labels, pred_softmax, losses = [], [], [], [], [], []
    for images, target in loader:
        output = model(images)          # reference wraps this in torch.cuda.amp.autocast: a no-op on CPU
        losses.extend(F.cross_entropy(output, target, reduction="none").tolist())
        prob = nn.Softmax(dim=1)(output)
        label = prob.argmax(dim=1)
        true_onehot.extend(F.one_hot(target.to(torch.int64), num_classes=NB_CLASSES).numpy())
        pred_onehot.extend(F.one_hot(label.to(torch.int64), num_classes=NB_CLASSES).numpy())
        true_labels.extend(target.numpy())
        pred_labels.extend(label.numpy())
        pred_softmax.extend(prob.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = {
            "accuracy": accuracy_score(true_labels, pred_labels),
            "hamming": hamming_loss(true_onehot, pred_onehot),
            "jaccard": jaccard_score(true_onehot, pred_onehot, average="macro"),
            "average_precision": average_precision_score(true_onehot, pred_softmax, average="macro"),
            "kappa": cohen_kappa_score(true_labels, pred_labels),
            "f1": f1_score(true_onehot, pred_onehot, zero_division=0, average="macro"),
            "roc_auc": roc_auc_score(true_onehot, pred_softmax, multi_class="ovr", average="macro"),
            "precision": precision_score(true_onehot, pred_onehot, zero_division=0, average="macro"),
            "recall": recall_score(true_onehot, pred_onehot, zero_division=0, average="macro"),
        }
    m = {k: float(v) for k, v in m.items()}
    m["score"] = (m["f1"] + m["roc_auc"] + m["kappa"]) / 3
    return {"metrics": m, "probs": np.asarray(pred_softmax, dtype=np.float64), "labels": np.asarray(true_labels),
            "preds": np.asarray(pred_labels), "loss_mean": float(np.mean(losses))}


def main() -> None:
    data_root = os.path.join(OUT, "data")
    if os.path.isdir(data_root):
        shutil.rmtree(data_root)
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    gen = torch.Generator().manual_seed(SEED)
    write_images(data_root, rng)

    dataset = datasets.ImageFolder(os.path.join(data_root, "test"), transform=eval_transform(INPUT_SIZE))
    assert dataset.classes == sorted(CLASSES), dataset.classes
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor(dataset.targets)

    model = build_reference_model()
    randomise(model, gen)
    opt = train_a_little(model, images, labels, steps=4, lr=2e-3, gen=gen)

    # the RETFound subclass must agree with timm's own global-pool ViT on the same weights
    native = TimmViT(img_size=INPUT_SIZE, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_ratio=4,
                     qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=NB_CLASSES,
                     global_pool="avg", fc_norm=True).eval()
    native.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(native(images), model(images), atol=1e-6)
    assert "norm.weight" not in model.state_dict() and "fc_norm.weight" in model.state_dict()

    args = argparse.Namespace(
        model="RETFound_mae", input_size=INPUT_SIZE, nb_classes=NB_CLASSES, global_pool=True, drop_path=0.1,
        batch_size=16, epochs=50, blr=5e-3, lr=None, layer_decay=0.65, weight_decay=0.05, min_lr=1e-6,
        warmup_epochs=10, smoothing=0.1, data_path="./eval_ref", task="RETFound_mae_eval_ref",
        finetune="RETFound_mae_meh", output_dir="./output_dir", device="cuda", seed=0, savemodel=True,
        world_size=1, distributed=False, accum_iter=1, clip_grad=None, aa="rand-m9-mstd0.5-inc1", reprob=0.25)
    scaler = {"scale": 32768.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 118}   # torch.cuda.amp.GradScaler().state_dict() of a GPU run
    ckpt_path = os.path.join(OUT, "checkpoint-best.pth")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 7, "scaler": scaler,
                "args": args}, ckpt_path)

    # evaluate the checkpoint as saved (reload into a fresh reference model, strict)
    fresh = build_reference_model()
    fresh.load_state_dict(torch.load(ckpt_path, map_location="cpu", weights_only=False)["model"], strict=True)
    res = reference_evaluate(fresh, dataset)
    counts = np.bincount(res["preds"], minlength=NB_CLASSES)
    assert (counts > 0).all(), f"predictions not spread over the classes: {counts}"

    root_len = len(os.path.join(data_root, "test")) + 1
    ref = {
        "description": "PyTorch RETFound reference evaluation of checkpoint-best.pth on data/test "
                       "(tools/make_eval_fixture.py)",
        "command": COMMAND,
        "toolkit_args": ["--eval", "--resume", "checkpoint-best.pth", "--model", "vit_test", "--input_size",
                         str(INPUT_SIZE), "--nb_classes", str(NB_CLASSES)],
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                     "torchvision": torchvision.__version__, "scikit-learn": sklearn.__version__,
                     "pillow": PIL.__version__, "numpy": np.__version__},
        "model": {"arch": "RETFound models_vit.VisionTransformer (timm), global_pool=True", "img_size": INPUT_SIZE,
                  "patch_size": PATCH, "embed_dim": DIM, "depth": DEPTH, "num_heads": HEADS, "mlp_ratio": 4,
                  "num_classes": NB_CLASSES},
        "transform": {"resize": int(INPUT_SIZE / (224 / 256)), "interpolation": "bicubic",
                      "center_crop": INPUT_SIZE, "mean": list(IMAGENET_DEFAULT_MEAN),
                      "std": list(IMAGENET_DEFAULT_STD)},
        "classes": dataset.classes,
        "files": [p[root_len:] for p, _ in dataset.samples],
        "labels": res["labels"].tolist(),
        "predictions": res["preds"].tolist(),
        "probs": [[float(f"{v:.9g}") for v in row] for row in res["probs"]],
        "metrics": res["metrics"],
        "loss_mean": res["loss_mean"],
    }
    with open(os.path.join(OUT, "reference.json"), "w", encoding="utf8") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")

    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, fs in os.walk(OUT) for n in fs)
    print(f"predictions per class {counts.tolist()}, labels per class "
          f"{np.bincount(res['labels'], minlength=NB_CLASSES).tolist()}")
    print(json.dumps(res["metrics"], indent=1))
    print(f"loss_mean {res['loss_mean']:.4f}; wrote {OUT} ({total / 1e6:.3f} MB)")


if __name__ == "__main__":
    main()
