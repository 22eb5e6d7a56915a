"""Fine-tune a registered model on a dataset (RETFound recipe by default), or evaluate a checkpoint.

    python main_finetune.py --data_path OCTID --nb_classes 5 [--finetune RETFound_mae_meh]
    python main_finetune.py --config configs/demo_retinamnist.yaml
    python main_finetune.py --eval --resume CKPT --data_path D --nb_classes K
    python -m paddle.distributed.launch --nproc_per_node N main_finetune.py ...

This file wires the parts together; it is the only place that reads the resolved config. Everything below
it receives explicit arguments.

References: RETFound_MAE ``main_finetune.py`` (flags, recipe, outputs); MAE ``main_finetune.py``.
"""
from __future__ import annotations

import os
import sys

# Paddle's CPU kernels use one thread unless told otherwise; this must happen before Paddle is imported.
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(os.cpu_count() or 1, 8))))

import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

# Paddle warns at import that ccache (a compiler cache for C++ extensions, unused here) is missing.
warnings.filterwarnings("ignore", message="No ccache found")

from util.errors import UserError  # noqa: E402


class WorkerSeeder:
    """``worker_init_fn`` giving every DataLoader worker its own seed for ``random`` and numpy (the
    augmentations draw from both); ``base`` is set before each epoch so epochs differ."""

    def __init__(self, base: int = 0):
        self.base = base

    def __call__(self, worker_id: int) -> None:
        seed = (self.base + 7919 * (worker_id + 1)) % (2**32)
        random.seed(seed)
        np.random.seed(seed)


def build_loaders(datasets: dict, batch_size: int, num_workers: int, seed: int, rank: int, world: int):
    import paddle

    from util.distributed import ShardSampler
    from util.loader import BatchLoader

    loaders, seeders = {}, {}
    for split, ds in datasets.items():
        seeder = WorkerSeeder(seed)
        if split == "train":
            sampler = paddle.io.DistributedBatchSampler(ds, batch_size=batch_size, num_replicas=world, rank=rank,
                                                        shuffle=True, drop_last=True)
        else:
            sampler = paddle.io.BatchSampler(sampler=ShardSampler(len(ds), rank, world), batch_size=batch_size,
                                             drop_last=False)
        loaders[split] = BatchLoader(ds, sampler, num_workers=num_workers,
                                     worker_init_fn=seeder if num_workers > 0 else None, name=f"{split} split")
        seeders[split] = seeder
    return loaders, seeders


def run_identity(cfg, model_name: str, nb_classes: int, class_names: list, task_type: str) -> dict:
    return {"model": model_name, "nb_classes": nb_classes, "class_names": list(class_names),
            "input_size": cfg.input_size, "global_pool": cfg.global_pool,
            "data_path": os.path.abspath(cfg.data_path), "task_type": task_type}


def setup_device(cfg, say):
    """Pick the device (``--device auto`` prefers a visible GPU) and whether AMP can run on it."""
    import paddle

    import engine_finetune as engine
    from util.distributed import get_world_size

    has_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if cfg.device == "gpu" and not has_gpu:
        raise UserError("--device gpu: no CUDA device is visible (a GPU was requested); install "
                        "paddlepaddle-gpu and check the driver, or pass --device cpu")
    device = "gpu" if (cfg.device == "gpu" or (cfg.device == "auto" and has_gpu)) else "cpu"
    if device == "gpu":
        multi = get_world_size() > 1
        paddle.set_device(f"gpu:{paddle.distributed.ParallelEnv().dev_id}" if multi else "gpu")
    else:
        paddle.set_device("cpu")
    amp = engine.AmpConfig(enabled=bool(cfg.amp) and device == "gpu", dtype=cfg.amp_dtype)
    if cfg.amp and not amp.enabled:
        say("AMP: off (requested with --amp, but mixed precision runs on GPU only; training in float32 on CPU)")
    return device, amp


def build_datasets(cfg, say) -> dict:
    """The splits this run needs, checked against each other (transforms are attached once the model
    is known, since they follow its data defaults)."""
    from util.datasets import build_dataset

    splits = ["test"] if cfg.eval else ["train", "val", "test"]
    datasets = {split: build_dataset(split, cfg.data_path, None, nb_classes=cfg.nb_classes) for split in splits}
    class_names = list(datasets[splits[0]].class_names)
    for split, ds in datasets.items():
        if list(ds.class_names) != class_names:
            raise UserError(f"{cfg.data_path}/{split}: classes {list(ds.class_names)} differ from "
                            f"{splits[0]}'s {class_names}; use the same class folders in every split")
        say(ds.describe())
        missing = [c for c, n in zip(ds.class_names, ds.class_counts()) if n == 0]
        if missing and split != "train":
            say(f"warning: {split} split has no images of class(es) {missing}: macro AUROC and the model-selection "
                "score are undefined (NaN) on it")
    return datasets


def attach_transforms(datasets: dict, cfg, data_cfg: dict) -> None:
    """Train augmentation on the train split, the eval transform elsewhere, with the model's mean/std."""
    from util.transforms import build_transform

    common = dict(mean=data_cfg["mean"], std=data_cfg["std"], interpolation=data_cfg.get("interpolation", "bicubic"))
    for split, ds in datasets.items():
        if split == "train":
            ds.transform = build_transform(True, cfg.input_size, aa=cfg.aa, reprob=cfg.reprob, remode=cfg.remode,
                                           recount=cfg.recount, color_jitter=cfg.color_jitter, **common)
        else:
            ds.transform = build_transform(False, cfg.input_size, **common)


def load_weights(cfg, model, identity: dict, verbose: bool) -> dict | None:
    """Apply --resume / --finetune to ``model``; returns the toolkit checkpoint being resumed, if any."""
    from models.pretrained import load_finetuned, load_pretrained, load_state_dict_strict
    from util.checkpoint import check_resume_compatible, read_toolkit_checkpoint

    if cfg.resume:
        state = read_toolkit_checkpoint(cfg.resume)
        if state is not None:
            if not cfg.eval:
                check_resume_compatible(state["meta"], identity, cfg.resume)
            load_state_dict_strict(model, state["model"], cfg.resume)
            if verbose:
                print(f"Resumed from {cfg.resume} (epoch {state['epoch']})", flush=True)
            return state
        if not cfg.eval:
            raise UserError(f"{cfg.resume}: not a checkpoint of this toolkit, so it cannot be resumed "
                            "(it has no optimizer state or run identity); evaluate it with --eval, or pass it "
                            "to --finetune to start a new run from its weights")
        load_finetuned(model, cfg.resume, verbose=verbose)  # e.g. a RETFound PyTorch checkpoint-best.pth
    elif cfg.eval:
        raise UserError("--eval: no checkpoint to evaluate (--resume is empty); pass --resume CKPT")
    elif cfg.finetune:
        # as the reference: the head weight is always re-drawn (trunc normal, std 2e-5) after loading
        load_pretrained(model, cfg.finetune, weights_dir=cfg.weights_dir, reinit_head=True, verbose=verbose)
    elif verbose:
        print(f"warning: no pretrained weights given (--finetune): {identity['model']} starts from random "
              "initialisation; pass --finetune NAME|PATH to start from pretrained weights (e.g. "
              "RETFound_mae_meh in --weights_dir for retfound_mae)", file=sys.stderr, flush=True)
    return None


def main(cfg) -> dict:
    import paddle

    import engine_finetune as engine
    from models import create_model, resolve_model_name
    from util import distributed as D
    from util.logger import RunLogger

    D.init_distributed()
    rank, world = D.get_rank(), D.get_world_size()
    main_proc = rank == 0

    def say(msg: str) -> None:
        if main_proc:
            print(msg, flush=True)

    device, amp = setup_device(cfg, say)
    seed = cfg.seed + rank
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)

    # data first: nb_classes may come from it
    model_name = resolve_model_name(cfg.model)
    datasets = build_datasets(cfg, say)
    first = next(iter(datasets.values()))
    class_names = list(first.class_names)
    nb_classes = cfg.nb_classes or len(class_names)
    task = engine.get_task(first.task)

    model = create_model(model_name, num_classes=nb_classes, drop_path_rate=cfg.drop_path,
                         global_pool=cfg.global_pool, img_size=cfg.input_size)
    if getattr(model, "num_views", 1) != getattr(first, "num_views", 1):
        raise UserError(f"--model {model_name} takes {model.num_views} image(s) per sample but the dataset "
                        f"at {cfg.data_path} gives {first.num_views}; pick a matching model")
    data_cfg = dict(model.default_cfg)
    attach_transforms(datasets, cfg, data_cfg)

    data_name = os.path.splitext(os.path.basename(os.path.normpath(cfg.data_path)))[0]
    run_dir = os.path.join(cfg.output_dir, cfg.task or f"{model_name}_{data_name}") if cfg.output_dir else None
    identity = run_identity(cfg, model_name, nb_classes, class_names, first.task)
    resume_state = load_weights(cfg, model, identity, verbose=main_proc)

    n_parameters = sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient)
    say(f"Model {model_name}: {n_parameters / 1e6:.2f} M trainable parameters, {nb_classes} classes")

    loaders, seeders = build_loaders(datasets, cfg.batch_size, cfg.num_workers, seed, rank, world)
    if world > 1:
        model = paddle.DataParallel(model)
    bare_model = model._layers if world > 1 else model

    logger = RunLogger(run_dir, cfg.log_dir, enabled=main_proc)
    if main_proc and run_dir:
        from util.config import save_config

        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config_eval.yaml" if cfg.eval else "config.yaml"))
    run = dict(cfg=cfg, model=model, bare_model=bare_model, loaders=loaders, task=task, nb_classes=nb_classes,
               class_names=class_names, amp=amp, logger=logger, run_dir=run_dir, say=say)
    if not cfg.eval:
        info = {"world_size": world, "device": device, "amp": amp.enabled, "n_parameters": n_parameters,
                "class_names": class_names, "task": first.task, "paddle": paddle.__version__, "data_cfg": data_cfg}
        fit(**run, seeders=seeders, seed=seed, resume_state=resume_state, identity=identity, info=info)

    test_stats, y_true, probs = engine.evaluate(model, loaders["test"], task, nb_classes, amp=amp, header="Test",
                                                print_freq=cfg.print_freq)
    report_test(logger, test_stats, y_true, probs, datasets["test"], run_dir, task, say)
    logger.close()
    return test_stats


def fit(*, cfg, model, bare_model, loaders, task, nb_classes, class_names, amp, logger, run_dir, say, seeders,
        seed, resume_state, identity, info) -> None:
    """Train with per-epoch validation and checkpoints; leaves the best checkpoint's weights in the model."""
    import paddle

    import engine_finetune as engine
    from models.pretrained import load_state_dict_strict
    from util import distributed as D
    from util.checkpoint import load_checkpoint, load_optimizer_state_by_name, save_checkpoint, set_rng_state
    from util.lr_decay import build_optimizer
    from util.lr_sched import adjust_learning_rate, effective_lr
    from util.metrics import selection_value

    world = D.get_world_size()
    lr = effective_lr(cfg.blr, cfg.lr, cfg.batch_size, cfg.accum_iter, world)
    say(f"base lr: {lr * 256 / (cfg.batch_size * cfg.accum_iter * world):.2e}  actual lr: {lr:.2e}  "
        f"effective batch size: {cfg.batch_size * cfg.accum_iter * world} "
        f"(batch {cfg.batch_size} x accum {cfg.accum_iter} x {world} process(es))")
    optimizer = build_optimizer(bare_model, lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
    scaler = None
    if amp.enabled and amp.dtype == "float16":
        scaler = paddle.amp.GradScaler(init_loss_scaling=2.0**16)  # dynamic loss scaling, GPU only
    criterion = task.train_loss(smoothing=cfg.smoothing)

    def set_lr(epoch_float: float) -> float:
        return adjust_learning_rate(optimizer, epoch_float, lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)

    start_epoch, best_score, best_epoch = cfg.start_epoch, -math.inf, -1
    if resume_state is not None:
        if "optimizer" in resume_state:
            load_optimizer_state_by_name(optimizer, bare_model, resume_state["optimizer"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        start_epoch = int(resume_state["epoch"]) + 1
        best_score = float(resume_state.get("best_score", -math.inf))
        best_epoch = int(resume_state.get("best_epoch", -1))
        if "rng" in resume_state and world == 1:
            set_rng_state(resume_state["rng"])
        say(f"Resuming at epoch {start_epoch} (best val score so far {best_score:.4f})")

    if logger.enabled:
        with open(os.path.join(run_dir, "run_info.json"), "w", encoding="utf8") as f:
            json.dump({"effective_lr": lr, **info}, f, indent=2)

    steps_per_epoch = len(loaders["train"])
    if steps_per_epoch == 0:
        raise UserError(f"{cfg.data_path}/train: {len(loaders['train'].dataset)} images are fewer than one batch "
                        f"(batch_size {cfg.batch_size} x {world} process(es), last partial batch dropped); "
                        "lower --batch_size or add images")
    global_step = start_epoch * (steps_per_epoch // cfg.accum_iter)
    last_path = os.path.join(run_dir, "checkpoint-last.pdparams") if run_dir else None
    best_path = os.path.join(run_dir, "checkpoint-best.pdparams") if run_dir else None
    n_parameters = info["n_parameters"]
    say(f"Start training for {cfg.epochs} epochs ({steps_per_epoch} steps each) -> {run_dir}")
    t0 = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        loaders["train"].batch_sampler.set_epoch(epoch)
        seeders["train"].base = seed * 100003 + epoch * 7
        train_stats, global_step = engine.train_one_epoch(
            model, criterion, loaders["train"], optimizer, epoch, set_lr=set_lr, accum_iter=cfg.accum_iter,
            clip_grad=cfg.clip_grad, scaler=scaler, amp=amp, logger=logger, print_freq=cfg.print_freq,
            global_step=global_step)
        val_stats, _, _ = engine.evaluate(model, loaders["val"], task, nb_classes, amp=amp, header="Val",
                                          print_freq=cfg.print_freq)
        score = selection_value(val_stats["score"])
        improved = score > best_score or best_epoch < 0  # the first epoch is kept even with an undefined score
        if improved:
            best_score, best_epoch = score, epoch
        say(f"Epoch {epoch}: train loss {train_stats['loss']:.4f}, val " +
            ", ".join(f"{k} {val_stats[k]:.4f}" for k in ("accuracy", "f1", "roc_auc", "kappa", "score")) +
            (" (best)" if improved else f" (best {best_score:.4f} at epoch {best_epoch})"))
        if logger.enabled:
            logger.csv_row("metrics_val.csv", task.columns, val_stats)
            logger.scalars("val", val_stats, epoch)
            logger.json_line({"epoch": epoch, "train_lr": train_stats["lr"], "train_loss": train_stats["loss"],
                              **{f"val_{k}": v for k, v in val_stats.items()}, "n_parameters": n_parameters})
            logger.flush()
            meta = {**identity, "best_epoch": best_epoch}
            if improved and cfg.savemodel:
                save_checkpoint(best_path, model=bare_model, epoch=epoch, best_score=best_score, meta=meta,
                                extra={"best_epoch": best_epoch, "val_metrics": val_stats})
            save_checkpoint(last_path, model=bare_model, optimizer=optimizer, scaler=scaler, epoch=epoch,
                            best_score=best_score, meta=meta, extra={"best_epoch": best_epoch})
        D.barrier()
    say(f"Training time {time.time() - t0:.0f}s; best val score {best_score:.4f} at epoch {best_epoch}")
    if logger.enabled:
        from util.plots import save_training_curves_png

        save_training_curves_png(os.path.join(run_dir, "log.txt"), os.path.join(run_dir, "training_curves.png"),
                                 best_epoch=best_epoch)

    # the test runs once, on the best checkpoint
    if best_path and os.path.isfile(best_path):
        load_state_dict_strict(bare_model, load_checkpoint(best_path)["model"], best_path)
        say(f"Test on the best checkpoint (epoch {best_epoch})")
    else:
        say("Test on the final weights (no best checkpoint was saved: --no-savemodel or no output folder)")


def report_test(logger, stats, y_true, probs, dataset, run_dir, task, say) -> None:
    """Print the test metrics; write metrics_test.csv, the confusion matrix PNG and per-image predictions."""
    from util.metrics import confusion_matrix, save_confusion_matrix_png

    say("Test: " + ", ".join(f"{k} {stats[k]:.4f}" for k in task.columns if k in stats))
    if not logger.enabled:
        return
    class_names = list(dataset.class_names)
    logger.csv_row("metrics_test.csv", task.columns, stats)
    cm = confusion_matrix(y_true, probs.argmax(axis=1), len(class_names))
    save_confusion_matrix_png(cm, class_names, os.path.join(run_dir, "confusion_matrix_test.png"),
                              title="Test confusion matrix")
    with open(os.path.join(run_dir, "predictions_test.csv"), "w", newline="", encoding="utf8") as f:
        w = csv.writer(f)
        w.writerow(["index", "file", "label", "prediction"] + [f"prob_{c}" for c in class_names])
        for i, (t, p) in enumerate(zip(y_true, probs)):
            w.writerow([i, dataset.sample_id(i), int(t), int(p.argmax())] + [f"{v:.6f}" for v in p])


def cli(argv: list[str] | None = None) -> int:
    from util.config import resolve_config

    try:
        cfg = resolve_config(argv)
        main(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch's checkpoint-last.pdparams is intact; continue with "
              "--resume <run folder>/checkpoint-last.pdparams", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
