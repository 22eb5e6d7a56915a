"""Training data pipeline speed against the model step, for 3000-4000 px fundus JPEGs on CPU, in one run.

What it answers: does the data pipeline (decode + fundus preprocessing + train transforms + collate, through
the training DataLoader) deliver images faster than the model trains on them, and by how much, for the ways
the toolkit can read large JPEGs:

* ``full``: every epoch decodes the full image, then the RETFound train transform (random resized crop,
  flip, RandAugment, erasing) as ``main_finetune.py`` builds it;
* ``draft``: the same with ``--jpeg_draft`` (the JPEG decoded at 1/2, 1/4 or 1/8 size where the crop still
  only shrinks: ``util/image_io.py``, ``util/transforms/pipelines.py``);
* ``cache``: ``--fundus_crop fov --preprocess_size 512 --cache_dir``: the first epoch decodes, crops, resizes
  and writes a PNG per image, later epochs read the PNG (epoch 1 and later epochs are timed apart);
* ``draft_cache``: the cache with ``--jpeg_draft`` (a faster first epoch).

The images are synthesised (a bright field of view with vessels, an optic disc and sensor noise on black,
3000-4000 px, JPEG quality 90) once into ``--work_dir`` and reused. The loader is the real one: the flags go
through ``util.config.resolve_config``, then ``main_finetune.data_options``, ``util.datasets.build_splits``,
``util.transforms.assemble.attach_transforms`` / ``build_reader`` and ``util.datasets.loader.build_loaders``,
the calls ``main_finetune.py`` makes. Per configuration and worker count (0, 1, 2) it prints

* **img/s**: the steady rate, the images after the first round of batches (one batch per worker) over the
  time after it, so worker start-up and the first prefetch are left out; **epoch s**: the whole epoch, the
  start of the workers included (Paddle starts them every epoch);
* **x model**: that rate over the model's training rate with synthetic inputs (ViT-B/16, forward +
  label-smoothing CE + backward + AdamW with layer decay, ``--threads`` math threads), and whether it
  reaches the issue's target of 2x. The model is timed before and after the loaders, the mean used;
* **CPU ms/img**: CPU time per image of the loader's workers and this process (``getrusage``; Paddle ends
  the workers every epoch, so they are counted then), and **x model CPU**: the model step's CPU ms per
  image over it, the ratio of the two on the same number of free cores (2 workers against 2 math threads:
  the issue's set-up). On a shared machine img/s follow the load; CPU times much less (the model's include
  OpenMP threads spinning between operations, so they flatter the pipeline a little).

The pipeline and the model compete for the same cores in training (workers decode while the main process
computes), so it also runs the train loop end to end: one epoch of ``--e2e_copies`` x the images (hard links,
so the epoch is long against the workers' prefetch of 2 batches each) through the real loader
(``--e2e_workers``) feeding the model step, timed from the loader's start (worker start-up included) to the
last step, against steps on synthetic inputs timed before and after (**x synthetic**: 1.00 means the
pipeline costs the model nothing; a cache is filled by one loader pass first), and the loop's CPU ms per
image over the synthetic step's: the pipeline's share of the machine.

Last, the effect of ``--jpeg_draft`` on the pixels: the 224 px crop from a reduced decode against the same
crop (the same fraction of the image) from the full decode, in 8-bit levels (a level is 1/255/std, about
0.017, in the normalised tensor).

Usage (from the repository root, with the toolkit's environment active):
    python benchmarks/data_pipeline.py                 # 48 images, ViT-B/16 at 224, batch 8, 0/1/2 workers
    python benchmarks/data_pipeline.py --quick         # tiny images and model: a smoke run, seconds

References: RETFound_MAE ``main_finetune.py`` / ``util/datasets.py`` (the train transform), timm
``transforms_factory.py``; libjpeg-turbo ``libjpeg.txt`` (DCT scaling) and Pillow ``Image.draft``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

import main_finetune  # noqa: E402  (before Paddle's import: it picks the math threads and the MKL)

CONFIGS = ("full", "draft", "cache", "draft_cache")
TARGET = 2.0  # the target: pipeline img/s >= 2x the model's
LR, WEIGHT_DECAY, LAYER_DECAY, SMOOTHING, DROP_PATH = 5e-4, 0.05, 0.65, 0.1, 0.1
NUM_CLASSES = 2


# --------------------------------------------------------------------------------------------- the images
def synth_fundus(w: int, h: int, seed: int) -> Image.Image:
    """A fundus-like RGB image: an orange-red field of view (darker to the rim, mottled) with a bright optic
    disc, a darker macula, branching dark vessels and sensor noise, on a black frame with a little noise."""
    rng = np.random.default_rng(seed)
    s = min(w, h)
    cx, cy = w / 2 + rng.uniform(-0.02, 0.02) * s, h / 2 + rng.uniform(-0.02, 0.02) * s
    r = s / 2 * rng.uniform(0.92, 1.04)  # above 1: the disc is clipped at the top and bottom, as often
    side = 1 if rng.random() < 0.5 else -1
    ox, oy = cx + side * 0.33 * r, cy + rng.uniform(-0.05, 0.05) * r  # optic disc
    mx, my = cx - side * 0.12 * r, cy  # macula

    q = 8  # the smooth parts at 1/8 size, then resized up
    sw, sh = -(-w // q), -(-h // q)
    yy, xx = (np.mgrid[0:sh, 0:sw].astype(np.float32) + 0.5) * q
    d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / r ** 2
    mottle = rng.standard_normal((sh // 24 + 2, sw // 24 + 2)).astype(np.float32)
    mottle = np.asarray(Image.fromarray(mottle).resize((sw, sh), Image.Resampling.BICUBIC))
    disc = np.exp(-((xx - ox) ** 2 + (yy - oy) ** 2) / (0.09 * r) ** 2)
    macula = np.exp(-((xx - mx) ** 2 + (yy - my) ** 2) / (0.15 * r) ** 2)
    shade = np.clip(1.0 - 0.55 * d2, 0.15, 1.0) * (1 + 0.06 * mottle) * (1 - 0.35 * macula)
    rgb = np.stack([rng.uniform(170, 215) * shade + 50 * disc, rng.uniform(65, 95) * shade + 140 * disc,
                    rng.uniform(20, 40) * shade + 90 * disc], axis=-1)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)

    vessels = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(vessels)
    for _ in range(int(rng.integers(10, 15))):  # trees grown from the optic disc
        stack = [(ox, oy, rng.uniform(0, 2 * math.pi), 0.012 * r, 0)]
        while stack:
            x, y, angle, width, depth = stack.pop()
            pts = [(x, y)]
            for _ in range(int(rng.integers(8, 16))):
                angle += rng.normal(0, 0.25)
                x, y = x + math.cos(angle) * 0.035 * r, y + math.sin(angle) * 0.035 * r
                pts.append((x, y))
            draw.line(pts, fill=int(rng.integers(120, 200)), width=max(2, int(width)), joint="curve")
            if depth < 2:
                for turn in (-0.6, 0.6):
                    stack.append((x, y, angle + turn + rng.normal(0, 0.2), width * 0.7, depth + 1))
    vessels = vessels.filter(ImageFilter.GaussianBlur(max(1.0, s / 2000)))
    img = Image.composite(Image.eval(img, lambda v: v * 55 // 100), img, vessels)

    fov = Image.new("L", (w, h), 0)
    ImageDraw.Draw(fov).ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    fov = fov.filter(ImageFilter.GaussianBlur(max(1.0, s / 1500)))
    img = Image.composite(img, Image.new("RGB", (w, h)), fov)
    # sensor noise: sigma 5 levels in the field of view (JPEGs of 1-2 MB, as camera exports), 1 on the frame
    sigma = np.asarray(fov, dtype=np.float32)[..., None] * (4.0 / 255) + 1.0
    arr = np.asarray(img, dtype=np.float32) + rng.standard_normal((h, w, 3), dtype=np.float32) * sigma
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def image_sizes(n: int, lo: int, hi: int, seed: int = 0) -> list[tuple[int, int]]:
    """Camera-like sizes: the longer side uniform in [lo, hi], aspect 1:1, 4:3 or 3:2 in turn."""
    rng = np.random.default_rng(seed)
    aspects = (1.0, 4 / 3, 3 / 2)
    sizes = []
    for i in range(n):
        long = int(rng.integers(lo, hi + 1))
        sizes.append((long, int(round(long / aspects[i % 3]))))
    return sizes


def make_dataset(a: argparse.Namespace, say) -> str:
    """``<work_dir>/fundus_<n>_<lo>-<hi>_q<quality>/train/<class>/*.jpg``, made once and reused."""
    root = os.path.join(a.work_dir, f"fundus_{a.images}_{a.min_px}-{a.max_px}_q{a.quality}")
    done = os.path.join(root, "complete")
    if os.path.exists(done):
        return root
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    total = 0
    for i, (w, h) in enumerate(image_sizes(a.images, a.min_px, a.max_px)):
        folder = os.path.join(root, "train", f"class{i % NUM_CLASSES}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"fundus_{i:03d}.jpg")
        synth_fundus(w, h, seed=i).save(path, quality=a.quality)
        total += os.path.getsize(path)
    open(done, "w").close()
    say(f"made {a.images} JPEGs of {a.min_px}-{a.max_px} px (quality {a.quality}, {total / a.images / 1e6:.1f} MB "
        f"each on average) in {time.perf_counter() - t0:.0f} s under {root}")
    return root


# --------------------------------------------------------------------------------------------- the loader
def _quiet(msg: str) -> None:
    pass


def config_flags(a: argparse.Namespace, config: str, cache_dir: str | None) -> list[str]:
    flags = ["--jpeg_draft"] if config.startswith("draft") else []
    if config.endswith("cache"):
        flags += ["--fundus_crop", a.fundus_crop, "--preprocess_size", str(a.preprocess_size),
                  "--cache_dir", cache_dir]
    return flags


def build_train_loader(a: argparse.Namespace, root: str, data_cfg: dict, config: str, workers: int,
                       cache_dir: str | None):
    """The train split's loader as ``main_finetune.py`` builds it, for the flags of ``config``."""
    from util.config import resolve_config
    from util.datasets import build_splits
    from util.datasets.loader import build_loaders
    from util.transforms.assemble import attach_transforms, build_reader

    cfg = resolve_config(["--data_path", root, "--model", a.model, "--input_size", str(a.input_size),
                          "--batch_size", str(a.batch_size), "--nb_classes", str(NUM_CLASSES),
                          "--num_workers", str(workers), *config_flags(a, config, cache_dir)])
    datasets = build_splits(cfg.data_path, ["train"], cfg.nb_classes, cfg.data_format or None,
                            main_finetune.data_options(cfg), _quiet)
    augment = {k: getattr(cfg, k) for k in ("aa", "reprob", "remode", "recount", "color_jitter", "hflip", "vflip",
                                            "rotation", "train_aug")}
    attach_transforms(datasets, data_cfg, build_reader(cfg.fundus_crop, cfg.fov_threshold, cfg.preprocess_size,
                                                       cfg.cache_dir), augment, _quiet)
    loaders, seeders = build_loaders(datasets, cfg.batch_size, workers, a.seed, 0, 1)
    return loaders["train"], seeders["train"]


def _cpu_s() -> float:
    """CPU seconds of this process (all its threads) and of its ended children (the loader's workers, which
    Paddle ends at the end of every epoch)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def time_epoch(loader, seeder, epoch: int, workers: int, seed: int) -> dict:
    """One pass over ``loader``: the steady img/s (after the first round of ``max(1, workers)`` batches), the
    epoch's wall time, worker start-up included, and the CPU time per image (workers + this process)."""
    seeder.base = seed * 100003 + epoch * 7  # as util/training.fit reseeds the workers every epoch
    random.seed(seed + epoch)
    np.random.seed(seed + epoch)
    cpu0, t0 = _cpu_s(), time.perf_counter()
    arrivals = []
    for x, _ in loader:
        arrivals.append((time.perf_counter(), int(x.shape[0])))
    wall = time.perf_counter() - t0
    skip = max(1, workers)
    steady = None
    if len(arrivals) > skip:
        steady = sum(n for _, n in arrivals[skip:]) / (arrivals[-1][0] - arrivals[skip - 1][0])
    n = sum(n for _, n in arrivals)
    return {"img_s": steady, "epoch_s": wall, "epoch_img_s": n / wall, "first_batch_s": arrivals[0][0] - t0,
            "cpu_ms": 1000 * (_cpu_s() - cpu0) / n}


def measure_loaders(a, root: str, data_cfg: dict, say) -> list[dict]:
    rows = []
    for config in a.configs:
        for workers in a.workers:
            cache_dir = None
            if config.endswith("cache"):
                cache_dir = os.path.join(a.work_dir, "cache", f"{config}-w{workers}")
                shutil.rmtree(cache_dir, ignore_errors=True)  # a cold cache for epoch 1
            loader, seeder = build_train_loader(a, root, data_cfg, config, workers, cache_dir)
            epochs = [time_epoch(loader, seeder, e, workers, a.seed) for e in range(a.loader_epochs)]
            first, later = epochs[0], epochs[1:] if cache_dir else epochs
            steady = [e["img_s"] for e in later if e["img_s"]]
            row = {"config": config, "workers": workers, "epoch1": first,
                   "img_s": float(np.median(steady)) if steady else None,
                   "epoch_s": float(np.median([e["epoch_s"] for e in later])),
                   "cpu_ms": float(np.median([e["cpu_ms"] for e in later])), "epochs": epochs}
            rows.append(row)
            say(f"  {config:<12} {workers} worker(s): " + ", ".join(
                f"epoch {i + 1} {e['img_s'] or float('nan'):.1f} img/s steady, {e['epoch_s']:.2f} s, "
                f"{e['cpu_ms']:.0f} CPU ms/img" for i, e in enumerate(epochs)))
    return rows


# ---------------------------------------------------------------------------------------------- the model
def build_model_step(a: argparse.Namespace):
    import paddle

    import models
    from util.losses import soft_cross_entropy
    from util.lr_decay import build_optimizer

    paddle.seed(a.seed)
    model = models.create_model(a.model, num_classes=NUM_CLASSES, drop_path_rate=DROP_PATH, global_pool=True,
                                input_size=a.input_size)
    opt = build_optimizer(model, LR, weight_decay=WEIGHT_DECAY, layer_decay=LAYER_DECAY)
    model.train()

    def step(x, y) -> None:  # what engine_finetune.train_one_epoch does per batch, fp32, no accumulation
        opt.set_lr(LR)
        loss = soft_cross_entropy(model(x), y, SMOOTHING)
        float(loss)  # the engine reads the loss every step (non-finite check)
        loss.backward()
        opt.step()
        opt.clear_grad()

    return model, step


def synthetic_batch(a: argparse.Namespace):
    import paddle

    rng = np.random.default_rng(a.seed)
    x = paddle.to_tensor(rng.standard_normal((a.batch_size, 3, a.input_size, a.input_size), dtype=np.float32))
    y = paddle.to_tensor(rng.integers(0, NUM_CLASSES, a.batch_size).astype(np.int64))
    return x, y


def time_model(step, batch, warmup: int, steps: int, bs: int) -> tuple[float, float]:
    """(img/s, CPU ms per image) of ``steps`` model steps on ``batch``."""
    for _ in range(warmup):
        step(*batch)
    cpu0, t0 = _cpu_s(), time.perf_counter()
    for _ in range(steps):
        step(*batch)
    return bs * steps / (time.perf_counter() - t0), 1000 * (_cpu_s() - cpu0) / (bs * steps)


def linked_copies(root: str, copies: int) -> str:
    """``root``'s train images ``copies`` times over (hard links, or copies where links fail), for a long epoch."""
    from util.image_io import scan_images

    out = f"{root}_x{copies}"
    if os.path.exists(os.path.join(out, "complete")):
        return out
    shutil.rmtree(out, ignore_errors=True)
    for c in range(copies):
        for path in scan_images(os.path.join(root, "train")):
            rel = os.path.relpath(path, os.path.join(root, "train"))
            dst = os.path.join(out, "train", os.path.dirname(rel), f"c{c}_{os.path.basename(rel)}")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                os.link(path, dst)
            except OSError:
                shutil.copyfile(path, dst)
    open(os.path.join(out, "complete"), "w").close()
    return out


def time_end_to_end(a, step, root: str, data_cfg: dict, config: str, say) -> dict:
    """One epoch of the train loop with the real loader, from the loader's start to the last model step."""
    cache_dir = None
    if config.endswith("cache"):
        cache_dir = os.path.join(a.work_dir, "cache", f"{config}-e2e")
        shutil.rmtree(cache_dir, ignore_errors=True)
    loader, seeder = build_train_loader(a, root, data_cfg, config, a.e2e_workers, cache_dir)
    if cache_dir:
        time_epoch(loader, seeder, 0, a.e2e_workers, a.seed)  # fill the cache: the epochs after the first
    seeder.base = a.seed * 100003 + 7
    images, steps = 0, 0
    cpu0, t0 = _cpu_s(), time.perf_counter()
    for x, y in loader:
        step(x, y)
        images += int(x.shape[0])
        steps += 1
    rate, cpu_ms = images / (time.perf_counter() - t0), 1000 * (_cpu_s() - cpu0) / images
    say(f"  {config:<12} {a.e2e_workers} worker(s): {rate:.2f} img/s over {steps} steps, {cpu_ms:.0f} CPU ms/img")
    return {"config": config, "workers": a.e2e_workers, "img_s": rate, "cpu_ms": cpu_ms, "steps": steps}


# ---------------------------------------------------------------------------------------------- pixels
def _crop_boxes(rng, n: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> list[tuple[float, float, float, float]]:
    """Crops as RandomResizedCrop draws them, as fractions (left, top, right, bottom) of a square-ish image."""
    boxes = []
    while len(boxes) < n:
        area, aspect = rng.uniform(*scale), math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        fw, fh = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if fw <= 1 and fh <= 1:
            left, top = rng.uniform(0, 1 - fw), rng.uniform(0, 1 - fh)
            boxes.append((left, top, left + fw, top + fh))
    return boxes


def _crop_224(img: Image.Image, box, size: int) -> np.ndarray:
    w, h = img.size
    px = (round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h))
    return np.asarray(img.crop(px).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def measure_pixels(a, root: str, say) -> list[dict]:
    """|draft - full| of the model's input, before normalisation, over the first ``--pixel_images`` images."""
    from util.image_io import decode_image, scan_images
    from util.transforms.assemble import build_reader
    from util.transforms.pipelines import build_transform

    paths = scan_images(os.path.join(root, "train"))[:a.pixel_images]
    train, ev = build_transform(True, a.input_size), build_transform(False, a.input_size)
    reader = build_reader(a.fundus_crop, 10, a.preprocess_size)
    rng = np.random.default_rng(a.seed)
    cases = {"train crop (full image)": [], f"train crop ({a.fundus_crop} + {a.preprocess_size})": [],
             "eval resize + centre crop": []}
    reductions = {k: [] for k in cases}
    for path in paths:
        full, _ = decode_image(path)
        draft, k = decode_image(path, train.source_min_size)
        boxes = _crop_boxes(rng, a.pixel_crops)
        key = "train crop (full image)"
        cases[key] += [np.abs(_crop_224(draft, b, a.input_size) - _crop_224(full, b, a.input_size)) for b in boxes]
        reductions[key].append(k)
        key = f"train crop ({a.fundus_crop} + {a.preprocess_size})"
        pre_full, pre_draft = reader(path), reader(path, train.source_min_size)
        cases[key] += [np.abs(_crop_224(pre_draft, b, a.input_size) - _crop_224(pre_full, b, a.input_size))
                       for b in boxes]
        reductions[key].append(decode_image(path, reader.decode_need(train.source_min_size))[1])
        key = "eval resize + centre crop"
        draft_ev, k_ev = decode_image(path, ev.source_min_size)
        to_levels = ev.transforms[:-1]  # without the normalisation: 8-bit levels
        ref, got = full, draft_ev
        for t in to_levels:
            ref, got = t(ref), t(got)
        cases[key].append(np.abs(np.asarray(got, np.float32) - np.asarray(ref, np.float32)))
        reductions[key].append(k_ev)
    rows = []
    for key, diffs in cases.items():
        d = np.stack(diffs)
        row = {"case": key, "reductions": sorted(set(reductions[key])), "crops": len(diffs),
               "mean": float(d.mean()), "p99_9": float(np.percentile(d, 99.9)), "max": float(d.max()),
               "crop_mean_max": float(d.reshape(len(diffs), -1).mean(1).max())}
        rows.append(row)
        say(f"  {key:<28} 1/{'/'.join(map(str, row['reductions'])):<6} {row['crops']:>4} crops: mean "
            f"{row['mean']:.3f}, worst crop's mean {row['crop_mean_max']:.3f}, 99.9% {row['p99_9']:.0f}, "
            f"max {row['max']:.0f} levels")
    return rows


# ---------------------------------------------------------------------------------------------- driver
def _load() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=48, help="synthetic JPEGs (a multiple of --batch_size)")
    p.add_argument("--min_px", type=int, default=3000, help="smallest longer side of the images")
    p.add_argument("--max_px", type=int, default=4000, help="largest longer side of the images")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--model", default="vit_base_patch16", help="registered model of the training step")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="math threads of the model step (the main process)")
    p.add_argument("--workers", default="0,1,2", help="loader worker counts to measure")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"of {', '.join(CONFIGS)}")
    p.add_argument("--fundus_crop", default="fov", help="the cached preprocessing (cache configurations)")
    p.add_argument("--preprocess_size", type=int, default=512, help="its shorter side (cache configurations)")
    p.add_argument("--loader_epochs", type=int, default=3, help="epochs per loader measurement (the first "
                   "is the cold cache's)")
    p.add_argument("--warmup", type=int, default=2, help="untimed model steps")
    p.add_argument("--steps", type=int, default=5, help="timed model steps on synthetic inputs")
    p.add_argument("--e2e_copies", type=int, default=2,
                   help="the end-to-end epoch holds the images this many times (0: no end-to-end run)")
    p.add_argument("--e2e_workers", type=int, default=2)
    p.add_argument("--pixel_images", type=int, default=8, help="images for the pixel effect of --jpeg_draft (0: skip it)")
    p.add_argument("--pixel_crops", type=int, default=8, help="train crops per image for the pixel effect")
    p.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "retfound_data_pipeline"),
                   help="where the images (kept for the next run) and the caches go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 16 images of 300-400 px, vit_test at 32 px, batch 4, a few steps")
    p.add_argument("--json", default="", help="write every measurement to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.quick:
        a.images, a.min_px, a.max_px, a.model, a.input_size, a.batch_size = 16, 300, 400, "vit_test", 32, 4
        a.preprocess_size, a.loader_epochs, a.warmup, a.steps, a.e2e_copies = 64, 2, 1, 2, 1
        a.pixel_images, a.pixel_crops = 2, 2
    a.workers = [int(w) for w in str(a.workers).split(",") if w.strip()]
    a.configs = [c.strip() for c in str(a.configs).split(",") if c.strip()]
    unknown = [c for c in a.configs if c not in CONFIGS]
    if unknown or a.images % a.batch_size or a.loader_epochs < 2:
        print(f"data_pipeline: unknown configuration(s) {unknown} (of {', '.join(CONFIGS)}), or --images not a "
              f"multiple of --batch_size, or --loader_epochs below 2", file=sys.stderr)
        return 2
    os.makedirs(a.work_dir, exist_ok=True)

    def say(msg: str) -> None:
        print(msg, flush=True)

    import paddle
    import PIL
    import PIL.features

    from util.exported import describe_cpu

    paddle.base.core.set_num_threads(a.threads)
    paddle.set_device("cpu")
    t_start = time.time()
    say(f"CPU: {describe_cpu()}; nproc {os.cpu_count()}; load average {_load()}")
    say(f"Python {platform.python_version()}, Paddle {paddle.__version__}, Pillow {PIL.__version__} "
        f"(libjpeg-turbo {PIL.features.version('jpg')}), math threads {a.threads}, {main_finetune.BLAS}")
    root = make_dataset(a, say)
    model, step = build_model_step(a)
    data_cfg = dict(model.default_cfg)

    # The machine may be shared: the model is timed before and after the loaders (and around the end-to-end
    # runs), and the ratios use the mean, so a change of load shows as a gap between the two.
    say(f"\nmodel step, synthetic inputs ({a.model}, {a.input_size} px, batch {a.batch_size}):")
    batch = synthetic_batch(a)
    before, cpu_before = time_model(step, batch, a.warmup, a.steps, a.batch_size)
    say(f"  {before:.2f} img/s, {cpu_before:.0f} CPU ms/img (load average {_load()})")
    say(f"\nloader alone (train split, {a.images} images, batch {a.batch_size}, {a.loader_epochs} epochs each):")
    loaders = measure_loaders(a, root, data_cfg, say)
    after, cpu_after = time_model(step, batch, 0, a.steps, a.batch_size)
    model_img_s, model_cpu_ms = (before + after) / 2, (cpu_before + cpu_after) / 2
    say(f"model step again: {after:.2f} img/s, {cpu_after:.0f} CPU ms/img (load average {_load()}); the ratios "
        f"use {model_img_s:.2f} img/s, {model_cpu_ms:.0f} CPU ms/img")
    e2e, synthetic = [], []
    if a.e2e_copies > 0:
        e2e_root = linked_copies(root, a.e2e_copies)
        say(f"\nend to end: one epoch of {a.images * a.e2e_copies} images, the real loader ({a.e2e_workers} "
            f"workers) feeding the model step:")
        synthetic.append(time_model(step, batch, 0, a.steps, a.batch_size))
        say(f"  {'synthetic':<12} {synthetic[-1][0]:.2f} img/s, {synthetic[-1][1]:.0f} CPU ms/img (no loader)")
        e2e = [time_end_to_end(a, step, e2e_root, data_cfg, c, say) for c in a.configs]
        synthetic.append(time_model(step, batch, 0, a.steps, a.batch_size))
        say(f"  {'synthetic':<12} {synthetic[-1][0]:.2f} img/s, {synthetic[-1][1]:.0f} CPU ms/img (no loader; "
            f"load average {_load()})")
        model_e2e_ref = sum(r for r, _ in synthetic) / 2
        model_e2e_cpu = sum(c for _, c in synthetic) / 2
    pixels = []
    if a.pixel_images > 0:
        say("\n--jpeg_draft: |draft - full| of the model input before normalisation (8-bit levels):")
        pixels = measure_pixels(a, root, say)

    say(f"\nSummary: loader img/s against the model's {model_img_s:.2f} img/s ({a.model}, {a.input_size} px, batch "
        f"{a.batch_size}, {a.threads} threads; target: >= {TARGET:g}x after the first epoch)")
    say(f"| config | workers | epoch 1 img/s | later epochs img/s | later epoch s | x model | >= {TARGET:g}x "
        f"| epoch 1 CPU ms/img | later CPU ms/img | x model CPU |")
    say("|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in loaders:
        ratio = r["img_s"] / model_img_s if r["img_s"] else nan
        r["x_model"], r["x_model_cpu"] = ratio, model_cpu_ms / r["cpu_ms"]
        say(f"| {r['config']} | {r['workers']} | {r['epoch1']['img_s'] or nan:.1f} | {r['img_s'] or nan:.1f} | "
            f"{r['epoch_s']:.2f} | {ratio:.1f} | {'yes' if ratio >= TARGET else 'no'} | "
            f"{r['epoch1']['cpu_ms']:.0f} | {r['cpu_ms']:.0f} | {r['x_model_cpu']:.1f} |")
    if e2e:
        say(f"\n| end to end ({a.e2e_workers} workers) | img/s | x synthetic-input step ({model_e2e_ref:.2f} img/s) "
            f"| CPU ms/img | over the synthetic step's ({model_e2e_cpu:.0f}) |")
        say("|---|---|---|---|---|")
        for r in e2e:
            r["x_synthetic"] = r["img_s"] / model_e2e_ref
            say(f"| {r['config']} | {r['img_s']:.2f} | {r['x_synthetic']:.2f} | {r['cpu_ms']:.0f} | "
                f"{r['cpu_ms'] - model_e2e_cpu:+.0f} |")
    say(f"\ntotal {time.time() - t_start:.0f} s; load average {_load()}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "model_img_s": [before, after], "model_cpu_ms": [cpu_before, cpu_after],
                       "loaders": loaders, "end_to_end": e2e,
                       "synthetic_around_end_to_end": synthetic, "pixels": pixels}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
