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


def build_loaders(datasets: dict, batch_size: int, num_workers: int, seed: int, rank: int, world: int,
                  balanced: bool = False):
    import paddle

    from util.datasets.loader import BatchLoader
    from util.datasets.samplers import WeightedBatchSampler, balanced_sample_weights
    from util.distributed import ShardSampler

    loaders, seeders = {}, {}
    for split, ds in datasets.items():
        seeder = WorkerSeeder(seed)
        if split == "train" and balanced:
            # the same weighted stream on every rank (seeded by --seed and the epoch), then sharded
            sampler = WeightedBatchSampler(balanced_sample_weights(ds), batch_size, num_replicas=world, rank=rank,
                                           drop_last=True, seed=seed - rank)
        elif split == "train":
            sampler = paddle.io.DistributedBatchSampler(ds, batch_size=batch_size, num_replicas=world, rank=rank,
                                                        shuffle=True, drop_last=True)
        else:
            sampler = paddle.io.BatchSampler(sampler=ShardSampler(len(ds), rank, world), batch_size=batch_size,
                                             drop_last=False)
        loaders[split] = BatchLoader(ds, sampler, num_workers=num_workers,
                                     worker_init_fn=seeder if num_workers > 0 else None, name=f"{split} split")
        seeders[split] = seeder
    return loaders, seeders


def run_identity(cfg, model_name: str, nb_classes: int, class_names: list, task_type: str,
                 input_size: int) -> dict:
    return {"model": model_name, "nb_classes": nb_classes, "class_names": list(class_names),
            "input_size": input_size, "global_pool": cfg.global_pool,
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


def data_options(cfg):
    """The dataset-format options of the config (CSV columns, splits, dual-eye mode)."""
    from util.datasets import DataOptions

    label_cols = [c.strip() for c in cfg.label_cols.split(",") if c.strip()] if cfg.label_cols else None
    return DataOptions(image_col=cfg.image_col, label_cols=label_cols, grade_col=cfg.grade_col,
                       split_col=cfg.split_col, val_ratio=cfg.val_ratio, test_ratio=cfg.test_ratio,
                       split_seed=cfg.split_seed, image_root=cfg.image_root, left_col=cfg.left_col,
                       right_col=cfg.right_col, patient_col=cfg.patient_col, eye_mode=cfg.eye_mode,
                       task_type=cfg.task_type or None, sheet=cfg.sheet,
                       allow_outside_paths=cfg.allow_outside_paths)


def build_datasets(cfg, say) -> dict:
    """The splits this run needs, checked against each other (transforms are attached once the model
    is known, since they follow its data defaults)."""
    from util.datasets import build_dataset

    splits = ["test"] if cfg.eval else ["train", "val", "test"]
    options = data_options(cfg)
    datasets = {split: build_dataset(split, cfg.data_path, None, nb_classes=cfg.nb_classes,
                                     fmt=cfg.data_format or None, options=options) for split in splits}
    first = datasets[splits[0]]
    class_names = list(first.class_names)
    said = set()
    for split, ds in datasets.items():
        if list(ds.class_names) != class_names or ds.task != first.task:
            raise UserError(f"{cfg.data_path}/{split}: classes {list(ds.class_names)} ({ds.task}) differ from "
                            f"{splits[0]}'s {class_names} ({first.task}); use the same classes in every split")
        say(ds.describe())
        for note in getattr(ds, "notes", []):
            if note not in said:  # the splits of one table share their notes
                said.add(note)
                say(f"note: {note}")
        missing = [c for c, n in zip(ds.class_names, ds.class_counts()) if n == 0]
        if missing and split != "train":
            say(f"warning: {split} split has no {'positive ' if ds.task == 'multi_label' else ''}images of "
                f"class(es) {missing}: their AUROC is undefined (NaN) on it")
    return datasets


def attach_transforms(datasets: dict, cfg, data_cfg: dict) -> None:
    """Fundus preprocessing (and its cache) as the image reader; train augmentation on the train split, the
    eval transform elsewhere, with the model's mean/std; dual-eye data gets the consistent pair transform."""
    from util.transforms import build_transform
    from util.transforms.dual import build_dual_transform
    from util.transforms.fundus import FundusReader, build_preprocess

    preprocess = build_preprocess(cfg.fundus_crop, threshold=cfg.fov_threshold, size=cfg.preprocess_size)
    reader = FundusReader(preprocess, cache_dir=cfg.cache_dir or None) if (preprocess or cfg.cache_dir) else None
    common = dict(mean=data_cfg["mean"], std=data_cfg["std"], interpolation=data_cfg.get("interpolation", "bicubic"),
                  crop_pct=data_cfg.get("crop_pct"))
    size = data_cfg["input_size"]
    for split, ds in datasets.items():
        ds.reader = reader
        train = split == "train"
        if ds.num_views == 2:
            extra = dict(hflip=cfg.hflip, vflip=cfg.vflip, rotation=cfg.rotation, color_jitter=cfg.color_jitter)
            ds.transform = build_dual_transform(train, size, **common, **(extra if train else {}))
        elif train:
            ds.transform = build_transform(True, size, aa=cfg.aa, reprob=cfg.reprob, remode=cfg.remode,
                                           recount=cfg.recount, color_jitter=cfg.color_jitter, hflip=cfg.hflip,
                                           policy=cfg.train_aug, rotation=cfg.rotation, vflip=cfg.vflip, **common)
        else:
            ds.transform = build_transform(False, size, **common)


def check_eval_classes(saved_meta: dict, identity: dict, path: str) -> None:
    """--eval on data whose classes are not the checkpoint's would score outputs under the wrong names."""
    saved = saved_meta.get("class_names")
    if saved is not None and list(saved) != list(identity["class_names"]):
        raise UserError(f"{path}: the checkpoint was trained on classes {list(saved)} but the data at "
                        f"{identity['data_path']} has {list(identity['class_names'])} (the metrics would pair "
                        "outputs with the wrong classes); rename the class folders / label columns to the "
                        "checkpoint's names, in its order")


def load_weights(cfg, model, identity: dict, verbose: bool) -> dict | None:
    """Apply --resume / --finetune to ``model``; returns the toolkit checkpoint being resumed, if any."""
    from models.pretrained import load_finetuned, load_pretrained, load_state_dict_strict
    from util.outputs.checkpoint import check_resume_compatible, read_toolkit_checkpoint

    if cfg.resume:
        state = read_toolkit_checkpoint(cfg.resume)
        if state is not None:
            if not cfg.eval:
                check_resume_compatible(state["meta"], identity, cfg.resume)
            else:
                check_eval_classes(state["meta"], identity, cfg.resume)
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

    _sigterm_as_interrupt()  # after importing paddle, which installs its own SIGTERM handler (a C++ stack dump)
    from models import resolve_model_name
    from util import distributed as D

    D.init_distributed()
    rank = D.get_rank()
    main_proc = rank == 0

    def say(msg: str) -> None:
        if main_proc:
            print(msg, flush=True)

    from util.config import config_warnings

    for line in config_warnings(cfg):
        say(line)
    device, amp = setup_device(cfg, say)
    seed = cfg.seed + rank
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)

    model_name = resolve_model_name(cfg.model)
    data_name = os.path.splitext(os.path.basename(os.path.normpath(cfg.data_path)))[0]
    run_dir = os.path.join(cfg.output_dir, cfg.task or f"{model_name}_{data_name}") if cfg.output_dir else None
    lock = None
    if main_proc and run_dir:
        from util.outputs.run_folder import RunFolderLock, check_new_run, remove_stale_temporaries

        lock = RunFolderLock(run_dir)  # held until this process ends: one run per folder
        if not cfg.eval and not cfg.resume:
            check_new_run(run_dir)
        remove_stale_temporaries(run_dir)
    try:
        return run(cfg, model_name, run_dir, device, amp, seed, say)
    except KeyboardInterrupt as exc:
        exc.run_dir = run_dir  # for the message: what the interrupted run left
        raise
    finally:
        if lock is not None:
            lock.release()


def run(cfg, model_name: str, run_dir: str | None, device: str, amp, seed: int, say) -> dict:
    """Build the data, model and loaders, then train (or only evaluate) and test; returns the test metrics."""
    import paddle

    import engine_finetune as engine
    from models import create_model
    from util import distributed as D
    from util.outputs.run_log import RunLogger

    rank, world = D.get_rank(), D.get_world_size()
    main_proc = rank == 0
    # data first: nb_classes and the task come from it
    datasets = build_datasets(cfg, say)
    if not cfg.skip_image_check:  # on every rank, so all of them stop together
        from util.image_check import check_dataset_images

        check_dataset_images(datasets, say)  # every bad file at once, before any epoch is spent
    first = next(iter(datasets.values()))
    class_names = list(first.class_names)
    nb_classes = cfg.nb_classes or len(class_names)
    task = engine.get_task(first.task)
    val_metric = check_metric_name(cfg.val_metric or task.default_val_metric, task, "--val_metric")

    model = create_model(model_name, num_classes=task.num_outputs(nb_classes), drop_path_rate=cfg.drop_path,
                         global_pool=cfg.global_pool, img_size=cfg.input_size)
    if getattr(model, "num_views", 1) != getattr(first, "num_views", 1):
        raise UserError(f"--model {model_name} takes {model.num_views} image(s) per sample but the dataset "
                        f"at {cfg.data_path} gives {first.num_views}; pick a matching model (dual_* models take "
                        f"a left and a right eye; --eye_mode per_eye turns a dual-eye table into single images)")
    data_cfg = dict(model.default_cfg)  # input_size: --input_size, or the model's own default size
    if cfg.crop_pct is not None:
        data_cfg["crop_pct"] = cfg.crop_pct
    attach_transforms(datasets, cfg, data_cfg)

    identity = run_identity(cfg, model_name, nb_classes, class_names, first.task, data_cfg["input_size"])
    # what predict.py needs to apply the checkpoint to new images
    identity["inference"] = {"mean": list(data_cfg["mean"]), "std": list(data_cfg["std"]),
                             "interpolation": data_cfg.get("interpolation", "bicubic"),
                             "crop_pct": data_cfg.get("crop_pct"), "fundus_crop": cfg.fundus_crop,
                             "fov_threshold": cfg.fov_threshold, "preprocess_size": cfg.preprocess_size}
    resume_state = load_weights(cfg, model, identity, verbose=main_proc)
    if resume_state is not None and not cfg.eval and main_proc and run_dir:
        from util.outputs.run_folder import trim_to_epoch

        dropped = trim_to_epoch(run_dir, int(resume_state["epoch"]))
        if dropped:
            say(f"resume: dropped the records of epochs after the checkpoint's epoch {resume_state['epoch']} ("
                + ", ".join(f"{n} row(s) of {k}" for k, n in dropped.items()) + ")")
    if cfg.freeze_backbone:
        from util.lr_decay import freeze_backbone

        say(f"--freeze_backbone: {freeze_backbone(model)} backbone parameter tensors frozen; training the head only")

    n_parameters = sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient)
    say(f"Model {model_name}: {n_parameters / 1e6:.2f} M trainable parameters, task {task.name}, "
        f"{nb_classes} {'labels' if task.name == 'multi_label' else 'classes'}, input {data_cfg['input_size']} px")

    loaders, seeders = build_loaders(datasets, cfg.batch_size, cfg.num_workers, seed, rank, world,
                                     balanced=cfg.balanced_sampler and not cfg.eval)
    if world > 1:
        model = paddle.DataParallel(model)
    bare_model = model._layers if world > 1 else model

    logger = RunLogger(run_dir, cfg.log_dir, enabled=main_proc)
    if main_proc and run_dir:
        from util.config import save_config

        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config_eval.yaml" if cfg.eval else "config.yaml"))
    eval_loss = build_criterion(cfg, task, datasets.get("train"), nb_classes, say, reduction="none")
    run = dict(cfg=cfg, model=model, bare_model=bare_model, loaders=loaders, task=task, nb_classes=nb_classes,
               class_names=class_names, amp=amp, logger=logger, run_dir=run_dir, say=say, eval_loss=eval_loss)
    thresholds = (resume_state or {}).get("thresholds") if cfg.eval else None
    if not cfg.eval:
        info = {"world_size": world, "device": device, "amp": amp.enabled, "n_parameters": n_parameters,
                "class_names": class_names, "task": first.task, "val_metric": val_metric,
                "paddle": paddle.__version__, "data_cfg": data_cfg}
        criterion = build_criterion(cfg, task, datasets["train"], nb_classes, say)
        thresholds = fit(**run, criterion=criterion, val_metric=val_metric, seeders=seeders, seed=seed,
                         resume_state=resume_state, identity=identity, info=info)

    test_stats, y_true, outputs = engine.evaluate(model, loaders["test"], task, nb_classes, loss_fn=eval_loss,
                                                  thresholds=thresholds, class_names=class_names, amp=amp,
                                                  header="Test", print_freq=cfg.print_freq)
    D.stop_watching_peers()  # the test gather was the last collective: the other ranks may now exit
    report_test(logger, test_stats, y_true, outputs, datasets["test"], run_dir, task, nb_classes, say)
    logger.close()
    return test_stats


def check_metric_name(name: str, task, flag: str) -> str:
    if name not in task.columns:
        from util.errors import close_matches

        near = close_matches(name, task.columns)
        raise UserError(f"{flag} {name!r}: not a {task.name} metric (one of {', '.join(task.columns)}); "
                        + (f"did you mean {near[0]!r}? " if near else "") + "pick one of those")
    return name


def build_criterion(cfg, task, train_set, nb_classes: int, say, reduction: str = "mean"):
    """The task's loss from --loss and its options; class weights / pos_weight come from the training labels.

    The evaluation loss (``reduction='none'``) is the unweighted, unsmoothed form of the same loss."""
    from util.losses import build_loss, class_weights_from_labels, pos_weight_from_labels

    options = dict(focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma)
    if reduction == "none":
        return build_loss(task.name, cfg.loss, reduction="none", **options)
    if cfg.class_weights:
        if task.name != "single_label":
            raise UserError(f"--class_weights: applies to single-label cross-entropy, not to {task.name} data; "
                            "use --pos_weight for multi-label data or --balanced_sampler")
        options["class_weights"] = class_weights_from_labels(train_set.targets, nb_classes)
        say("class weights: " + ", ".join(f"{c} {w:.3f}" for c, w in zip(train_set.class_names,
                                                                            options["class_weights"])))
    if cfg.pos_weight:
        if task.name != "multi_label":
            raise UserError(f"--pos_weight: applies to multi-label BCE, not to {task.name} data; remove it "
                            "(--class_weights weights single-label cross-entropy)")
        options["pos_weight"] = pos_weight_from_labels(train_set.targets)
        say("BCE pos_weight: " + ", ".join(f"{c} {w:.3f}" for c, w in zip(train_set.class_names,
                                                                             options["pos_weight"])))
    return build_loss(task.name, cfg.loss, smoothing=cfg.smoothing if task.name == "single_label" else 0.0,
                      **options)


def fit(*, cfg, model, bare_model, loaders, task, nb_classes, class_names, amp, logger, run_dir, say, seeders,
        seed, resume_state, identity, info, criterion, eval_loss, val_metric):
    """Train with per-epoch validation and checkpoints; leaves the best checkpoint's weights in the model and
    returns the decision thresholds tuned on validation at that epoch (``None`` when not tuned)."""
    import paddle

    import engine_finetune as engine
    from models.pretrained import load_state_dict_strict
    from util import distributed as D
    from util.lr_decay import build_optimizer
    from util.lr_sched import build_schedule, effective_lr
    from util.outputs.checkpoint import load_checkpoint, load_optimizer_state_by_name, save_checkpoint, set_rng_state
    from util.outputs.reports import append_per_class_csv, format_per_class, save_thresholds_json

    world = D.get_world_size()
    lr = effective_lr(cfg.blr, cfg.lr, cfg.batch_size, cfg.accum_iter, world)
    say(f"base lr: {lr * 256 / (cfg.batch_size * cfg.accum_iter * world):.2e}  actual lr: {lr:.2e}  "
        f"effective batch size: {cfg.batch_size * cfg.accum_iter * world} "
        f"(batch {cfg.batch_size} x accum {cfg.accum_iter} x {world} process(es))")
    optimizer = build_optimizer(bare_model, lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
                                opt=cfg.opt, momentum=cfg.momentum, backbone_lr_scale=cfg.backbone_lr_scale)
    plateau_metric = check_metric_name(cfg.plateau_metric or val_metric, task, "--plateau_metric")
    schedule = build_schedule(cfg.sched, lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs, step_size=cfg.step_size,
                              step_gamma=cfg.step_gamma, plateau_factor=cfg.plateau_factor,
                              plateau_patience=cfg.plateau_patience,
                              plateau_mode="min" if plateau_metric in task.minimize else "max")
    say(f"optimizer {cfg.opt}, schedule: {schedule.describe()}"
        + (f" on val {plateau_metric}" if cfg.sched == "plateau" else "")
        + (f", backbone LR x{cfg.backbone_lr_scale}" if cfg.backbone_lr_scale != 1 else ""))
    scaler = None
    if amp.enabled and amp.dtype == "float16":
        scaler = paddle.amp.GradScaler(init_loss_scaling=2.0**16)  # dynamic loss scaling, GPU only
    tune = task.tune_by_default if cfg.tune_thresholds is None else bool(cfg.tune_thresholds)
    if tune and task.tune is None:
        raise UserError(f"--tune_thresholds: {task.name} predictions have no decision thresholds to tune "
                        "(argmax); remove the flag")

    def set_lr(epoch_float: float) -> float:
        return schedule.adjust(optimizer, epoch_float)

    start_epoch, best_score, best_epoch, best_thresholds = cfg.start_epoch, -math.inf, -1, None
    if resume_state is not None:
        if "optimizer" in resume_state:
            load_optimizer_state_by_name(optimizer, bare_model, resume_state["optimizer"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        if resume_state.get("schedule"):
            schedule.load_state_dict(resume_state["schedule"])
        start_epoch = int(resume_state["epoch"]) + 1
        best_score = float(resume_state.get("best_score", -math.inf))
        best_epoch = int(resume_state.get("best_epoch", -1))
        best_thresholds = resume_state.get("best_thresholds")
        if "rng" in resume_state and world == 1:
            set_rng_state(resume_state["rng"])
        say(f"Resuming at epoch {start_epoch} (best val {val_metric} so far at epoch {best_epoch})")

    if logger.enabled:
        with open(os.path.join(run_dir, "run_info.json"), "w", encoding="utf8") as f:
            json.dump({"effective_lr": lr, "tune_thresholds": tune, "plateau_metric": plateau_metric, **info}, f,
                      indent=2)

    steps_per_epoch = len(loaders["train"])
    if steps_per_epoch == 0:
        raise UserError(f"{cfg.data_path}/train: {len(loaders['train'].dataset)} images are fewer than one batch "
                        f"(batch_size {cfg.batch_size} x {world} process(es), last partial batch dropped); "
                        "lower --batch_size or add images")
    if cfg.accum_iter > steps_per_epoch:
        raise UserError(f"--accum_iter {cfg.accum_iter}: more than the {steps_per_epoch} batches of an epoch (the "
                        "model would never be updated: the optimizer steps once every accum_iter batches and the "
                        f"count restarts each epoch); pass --accum_iter {steps_per_epoch} or less, or a smaller "
                        "--batch_size")
    if steps_per_epoch % cfg.accum_iter:
        say(f"warning: --accum_iter {cfg.accum_iter} does not divide the {steps_per_epoch} batches of an epoch: the "
            f"last {steps_per_epoch % cfg.accum_iter} batch(es) of each epoch add gradients that no optimizer "
            "step uses (as in the reference); pick an --accum_iter that divides it to use every batch")
    global_step = start_epoch * (steps_per_epoch // cfg.accum_iter)
    last_path = os.path.join(run_dir, "checkpoint-last.pdparams") if run_dir else None
    best_path = os.path.join(run_dir, "checkpoint-best.pdparams") if run_dir else None
    n_parameters = info["n_parameters"]
    headline = list(task.headline)
    if val_metric not in headline:
        headline.append(val_metric)
    say(f"Start training for {cfg.epochs} epochs ({steps_per_epoch} steps each), best checkpoint by val "
        f"{val_metric} -> {run_dir}")
    t0 = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        loaders["train"].batch_sampler.set_epoch(epoch)
        seeders["train"].base = seed * 100003 + epoch * 7
        train_stats, global_step = engine.train_one_epoch(
            model, criterion, loaders["train"], optimizer, epoch, set_lr=set_lr, accum_iter=cfg.accum_iter,
            clip_grad=cfg.clip_grad, scaler=scaler, amp=amp, logger=logger, print_freq=cfg.print_freq,
            global_step=global_step)
        val_stats, _, _ = engine.evaluate(model, loaders["val"], task, nb_classes, loss_fn=eval_loss, tune=tune,
                                          class_names=class_names, amp=amp, header="Val", print_freq=cfg.print_freq)
        schedule.epoch_end(epoch, val_stats.get(plateau_metric))
        score = task.selection_value(val_stats, val_metric)
        improved = score > best_score or best_epoch < 0  # the first epoch is kept even with an undefined score
        if improved:
            best_score, best_epoch, best_thresholds = score, epoch, val_stats.get("thresholds")
        say(f"Epoch {epoch}: train loss {train_stats['loss']:.4f}, val loss {val_stats['val_loss']:.4f}, " +
            ", ".join(f"{k} {val_stats[k]:.4f}" for k in headline) +
            (" (best)" if improved else f" (best {val_metric} at epoch {best_epoch})"))
        if cfg.per_class_report:
            say(format_per_class(val_stats.get("per_class", [])))
        if logger.enabled:
            logger.csv_row("metrics_val.csv", task.columns, val_stats)
            append_per_class_csv(os.path.join(run_dir, "per_class_val.csv"), val_stats.get("per_class", []), epoch)
            logger.scalars("val", val_stats, epoch)
            logger.json_line({"epoch": epoch, "train_lr": train_stats["lr"], "train_loss": train_stats["loss"],
                              **{f"val_{k}": v for k, v in val_stats.items()}, "n_parameters": n_parameters})
            logger.flush()
            meta = {**identity, "best_epoch": best_epoch}
            scalars = {k: v for k, v in val_stats.items() if isinstance(v, (int, float))}
            if improved and cfg.savemodel:
                save_checkpoint(best_path, model=bare_model, epoch=epoch, best_score=best_score, meta=meta,
                                extra={"best_epoch": best_epoch, "val_metrics": scalars, "val_metric": val_metric,
                                       "thresholds": best_thresholds})
                if best_thresholds is not None:
                    save_thresholds_json(os.path.join(run_dir, "thresholds.json"), task.name, class_names,
                                         best_thresholds, f"tuned on the validation split at epoch {epoch}")
            save_checkpoint(last_path, model=bare_model, optimizer=optimizer, scaler=scaler, epoch=epoch,
                            best_score=best_score, meta=meta,
                            extra={"best_epoch": best_epoch, "best_thresholds": best_thresholds,
                                   "schedule": schedule.state_dict()})
        D.barrier()
    say(f"Training time {time.time() - t0:.0f}s; best val {val_metric} at epoch {best_epoch}")
    if logger.enabled:
        from util.outputs.plots import save_training_curves_png

        save_training_curves_png(os.path.join(run_dir, "log.txt"), os.path.join(run_dir, "training_curves.png"),
                                 best_epoch=best_epoch, metrics=tuple(headline))

    # the test runs once, on the best checkpoint, with the thresholds tuned at that epoch
    if best_path and os.path.isfile(best_path):
        state = load_checkpoint(best_path)
        load_state_dict_strict(bare_model, state["model"], best_path)
        best_thresholds = state.get("thresholds")
        say(f"Test on the best checkpoint (epoch {best_epoch})")
    else:
        say("Test on the final weights (no best checkpoint was saved: --no-savemodel or no output folder)")
    return best_thresholds


def report_test(logger, stats, y_true, outputs, dataset, run_dir, task, nb_classes, say) -> None:
    """Print the test metrics; write metrics_test.csv, per-class table, confusion matrices, predictions."""
    from util.outputs.reports import write_test_report

    say("Test: " + ", ".join(f"{k} {stats[k]:.4f}" for k in task.columns if k in stats))
    if stats.get("thresholds") is not None:
        say("Test thresholds (tuned on val): " + ", ".join(f"{t:.3f}" for t in stats["thresholds"]))
    if not logger.enabled:
        return
    logger.csv_row("metrics_test.csv", task.columns, stats, fresh=True)  # one evaluation: never appended
    write_test_report(run_dir, task, stats, y_true, outputs, dataset, nb_classes)


def _sigterm_as_interrupt() -> None:
    """SIGTERM (a scheduler stopping the job, ``kill PID``) ends the run as Ctrl-C does: a clean message,
    the last checkpoint intact, no C++ stack dump."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def cli(argv: list[str] | None = None) -> int:
    from util.config import resolve_config

    try:
        cfg = resolve_config(argv)
        main(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as exc:
        from util.outputs.run_folder import describe_interrupted

        print(describe_interrupted(getattr(exc, "run_dir", None)), file=sys.stderr, flush=True)
        return 130
    except SystemError as exc:  # Paddle's SIGCHLD handler: a DataLoader worker died (killed, out of memory)
        if "DataLoader" not in str(exc):
            raise
        import re

        found = re.search(r"pid (\d+)\).*?signal: (\w+)", str(exc))
        what = (f"data loader worker (pid {found.group(1)}) was killed by signal {found.group(2)}" if found else
                str(exc).strip().splitlines()[0].replace("(Fatal) ", "").split(" (at /")[0])
        print(f"error: {what}; it was stopped from outside the run (the system may have run out of memory: "
              "check `dmesg`); rerun, with fewer --num_workers or --num_workers 0", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as exc:  # a collective operation failed because another process of the run died
        from util.distributed import get_rank, get_world_size, stop_watching_peers, wait_for_peer_problem

        if get_world_size() == 1:
            raise
        stop_watching_peers()  # this handler says it, once
        problem = wait_for_peer_problem() or "another process of the run failed or cannot be reached"
        first = (str(exc).strip().splitlines() or [""])[-1][:200]
        print(f"error: rank {get_rank()}: a collective operation failed ({first}): {problem}; that rank's own log "
              "(workerlog.N in the launcher's --log_dir) says why", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:  # read-only folder, full disk, a file where a folder belongs, ...
        where = exc.filename or "a file of this run"
        print(f"error: {where}: {exc.strerror or exc} (while writing or reading this run's files); check that "
              "the folder exists, is writable and has free space, or pick another --output_dir",
              file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
