"""Fine-tune a registered model on a dataset (RETFound recipe by default), or evaluate a checkpoint.

    python main_finetune.py --data_path OCTID --nb_classes 5 [--finetune RETFound_mae_meh] [--adaptation lp|lora]
    python main_finetune.py --config configs/demo_retinamnist.yaml
    python main_finetune.py --eval --resume RUN_OR_CKPT [--data_path D]     # the checkpoint knows the rest
    python main_finetune.py --resume RUN/checkpoint-last.pdparams [--epochs N]  # the run's own config.yaml
    python -m paddle.distributed.launch --nproc_per_node N main_finetune.py ...

This file wires the parts together; it is the only place that reads the resolved config. Everything below
it receives explicit arguments.

References: RETFound_MAE ``main_finetune.py`` (flags, recipe, outputs); MAE ``main_finetune.py``.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings

import numpy as np

from util.adaptation import Adaptation, is_ratio_sweep
from util.blas import select_mkl
from util.protocol.ratios import run_ratio_sweep
from util.threads import math_threads
from util.weights_files import find_weights

MATH_THREADS = math_threads()  # before Paddle's import, handed to it in main() (util/threads.py says why)
BLAS = select_mkl()  # before Paddle's import: its matrix products on the current MKL (util/blas.py says why)
os.environ.setdefault("GLOG_minloglevel", "1")  # Paddle's C++ INFO lines (warnings and errors still show)
warnings.filterwarnings("ignore", message="No ccache found")  # Paddle's, at import: a C++ compiler cache


def data_options(cfg):
    """The dataset-format options of the config (CSV columns, splits, dual-eye mode)."""
    from util.datasets import DataOptions

    label_cols = [c.strip() for c in cfg.label_cols.split(",") if c.strip()] if cfg.label_cols else None
    same = {k: getattr(cfg, k) for k in DataOptions.__dataclass_fields__ if k not in ("label_cols", "task_type")}
    return DataOptions(**same, label_cols=label_cols, task_type=cfg.task_type or None)


def main(cfg) -> dict:
    """Set up the process (distributed group, device, seeds, the run folder's lock), then ``run``."""
    if cfg.finetune and not cfg.resume:
        find_weights(cfg.finetune, cfg.weights_dir)  # a missing weights file fails first, before Paddle is set up
    if is_ratio_sweep(cfg):  # --dataratio a,b,c: one run of this script per ratio (util/adaptation.py)
        return run_ratio_sweep(cfg, os.path.abspath(__file__))
    import paddle

    from models import resolve_model_name
    from util import distributed as D
    from util.cli import sigterm_as_interrupt
    from util.config import config_warnings
    from util.inference import select_device
    from util.outputs.checkpoint import seed_everything
    from util.outputs.run_folder import RunFolderLock, check_new_run, remove_stale_temporaries

    paddle.base.core.set_num_threads(MATH_THREADS)  # the MKL and OpenMP threads of Paddle's CPU kernels
    sigterm_as_interrupt()
    D.init_distributed()
    main_proc = D.get_rank() == 0

    say = functools.partial(print, flush=True) if main_proc else (lambda msg: None)  # the main process speaks

    for line in cfg._notes + config_warnings(cfg):
        say(line)
    device, amp = select_device(cfg.device, cfg.amp, cfg.amp_dtype, say)
    if device == "cpu":   # models/cpu_kernels.py: the compiled kernels of the eager step, or why not
        from models.cpu_kernels import status as kernel_status

        say(f"CPU math: {MATH_THREADS} thread(s), {BLAS}; {kernel_status()}")
    else:
        say(f"CPU math: {MATH_THREADS} thread(s), {BLAS}")
    seed = seed_everything(cfg.seed + D.get_rank())
    model_name = resolve_model_name(cfg.model, cfg.model_arch)
    data_name = os.path.splitext(os.path.basename(os.path.normpath(cfg.data_path)))[0]
    run_dir = os.path.join(cfg.output_dir, cfg.task or f"{model_name}_{data_name}") if cfg.output_dir else None
    lock = RunFolderLock(run_dir) if main_proc and run_dir else None  # held until the end: one run per folder
    try:
        if lock is not None:
            if not cfg.eval and not cfg.resume:
                check_new_run(run_dir)
            remove_stale_temporaries(run_dir)
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
    from models.pretrained import load_weights
    from models.registry import check_views
    from util import distributed as D
    from util.config import config_to_dict, save_config
    from util.datasets import build_splits
    from util.datasets.loader import build_loaders
    from util.explain import check_method, write_explanations
    from util.final_test import run_test
    from util.image_check import check_dataset_images
    from util.inference import RunIdentity
    from util.losses import build_criterion
    from util.outputs.recorder import Recorder
    from util.outputs.run_folder import trim_to_epoch
    from util.outputs.run_log import RunLogger
    from util.run_config import eval_classes
    from util.threads import resolve_num_workers
    from util.training import FitOptions, fit
    from util.transforms.assemble import attach_transforms, build_reader

    main_proc, world = D.get_rank() == 0, D.get_world_size()
    # data first: num_classes and the task come from it
    datasets = build_splits(cfg.data_path, ["test"] if cfg.eval else ["train", "val", "test"], cfg.nb_classes,
                            cfg.data_format or None, data_options(cfg), say)
    if not cfg.skip_image_check:  # on every rank, so all of them stop together
        check_dataset_images(datasets, say)  # every bad file at once, before any epoch is spent
    first = next(iter(datasets.values()))
    # --eval on data with some of the checkpoint's classes: matched by name, scored on those present
    matched = eval_classes(datasets, cfg.resume, cfg.data_path, say) if cfg.eval and cfg.resume else None
    class_names = list(matched.model_classes if matched else first.class_names)
    num_classes, task = cfg.nb_classes or len(class_names), engine.get_task(first.task_type)
    val_metric = task.check_metric(cfg.val_metric or task.default_val_metric, "--val_metric")
    model = create_model(model_name, num_classes=task.num_outputs(num_classes), drop_path_rate=cfg.drop_path,
                         global_pool=cfg.global_pool, input_size=cfg.input_size)
    check_views(model, model_name, getattr(first, "num_views", 1), cfg.data_path)
    if cfg.explain:  # --explain rollout on a CNN fails now, not after training
        check_method(cfg.explain, model)
    # input_size: --input_size, or the model's own default size
    data_cfg = {**model.default_cfg, **({} if cfg.crop_pct is None else {"crop_pct": cfg.crop_pct})}
    augment = {k: getattr(cfg, k) for k in ("aa", "reprob", "remode", "recount", "color_jitter", "hflip", "vflip",
                                            "rotation", "train_aug")}
    attach_transforms(datasets, data_cfg, build_reader(cfg.fundus_crop, cfg.fov_threshold, cfg.preprocess_size,
                                                       cfg.cache_dir), augment, say)
    identity = RunIdentity(model_name, num_classes, tuple(class_names), data_cfg["input_size"], cfg.global_pool,
                           cfg.data_path, first.task_type, tuple(data_cfg["mean"]), tuple(data_cfg["std"]),
                           data_cfg.get("interpolation", "bicubic"), data_cfg.get("crop_pct"), cfg.fundus_crop,
                           cfg.fov_threshold, cfg.preprocess_size).meta()
    resume_state = Adaptation(**{k: getattr(cfg, k) for k in Adaptation.__dataclass_fields__}).prepare(  # lp, LoRA
        model, lambda: load_weights(model, identity, resume=cfg.resume, finetune=cfg.finetune, eval_only=cfg.eval,
                                    weights_dir=cfg.weights_dir, verbose=main_proc), cfg.resume, cfg.eval, say)
    if resume_state is not None and not cfg.eval and main_proc and run_dir:
        trim_to_epoch(run_dir, int(resume_state["epoch"]), say=say)  # records of epochs after the checkpoint's
    thresholds = (resume_state or {}).get("thresholds") if cfg.eval else None
    temperature = (resume_state or {}).get("temperature") if cfg.eval else None  # --calibrate fitted it on val
    if matched is not None:  # the model's outputs for the data's classes
        model, thresholds, class_names, num_classes = matched.apply(model, thresholds)
    n_parameters = sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient)
    workers = resolve_num_workers(cfg.num_workers)  # --num_workers, else from the cores (util/threads.py)
    say(f"Model {model_name}: {n_parameters / 1e6:.2f} M trainable parameters, task {task.name}, "
        f"{num_classes} {'labels' if task.name == 'multi_label' else 'classes'}, input {data_cfg['input_size']} px; "
        f"CPU: {MATH_THREADS} math thread(s), {workers} data loader worker(s)")
    loaders, seeders = build_loaders(datasets, cfg.batch_size, workers, seed, D.get_rank(), world,
                                     balanced=cfg.balanced_sampler and not cfg.eval)
    bare_model = model
    if world > 1:
        model = paddle.DataParallel(model)
    logger = RunLogger(run_dir, cfg.log_dir, enabled=main_proc)
    if main_proc and run_dir:
        save_config(cfg, os.path.join(run_dir, "config_eval.yaml" if cfg.eval else "config.yaml"))
    recorder = Recorder(run_dir, logger, task, class_names, identity, savemodel=cfg.savemodel)
    losses = dict(train_set=datasets.get("train"), num_classes=num_classes, smoothing=cfg.smoothing,
                  class_weights=cfg.class_weights, pos_weight=cfg.pos_weight, focal_alpha=cfg.focal_alpha,
                  focal_gamma=cfg.focal_gamma, say=say)
    eval_loss = build_criterion(task, cfg.loss, reduction="none", **losses)
    if not cfg.eval:
        opts = FitOptions(**{k: getattr(cfg, k) for k in FitOptions.__dataclass_fields__ if hasattr(cfg, k)
                             and k not in ("val_metric", "seed", "info")}, val_metric=val_metric, seed=seed,
                          info={"world_size": world, "device": device, "amp": amp.enabled,
                                "n_parameters": n_parameters, "class_names": class_names, "task": first.task_type,
                                "val_metric": val_metric, "paddle": paddle.__version__, "data_cfg": data_cfg})
        calibration = {}  # --calibrate: the temperature fitted on val, for the test
        thresholds = fit(model, bare_model, loaders, seeders, task, num_classes, class_names,
                         criterion=build_criterion(task, cfg.loss, **losses), eval_loss=eval_loss, amp=amp,
                         logger=logger, recorder=recorder, opts=opts, resume_state=resume_state, say=say,
                         calibration=calibration)
        temperature = calibration.get("temperature")
    explain = None if not cfg.explain else lambda ds: write_explanations(
        bare_model, ds, os.path.join(run_dir, "explanations"), cfg.explain, mean=data_cfg["mean"], std=data_cfg["std"])
    stats = run_test(model, loaders["test"], datasets, task, num_classes, recorder, say, eval_loss=eval_loss,
                     thresholds=thresholds, temperature=temperature, class_names=class_names, amp=amp,
                     print_freq=cfg.print_freq, classes=matched.macro_over if matched else None, explain=explain,
                     tested_epoch=(resume_state or {}).get("epoch") if cfg.eval else None,
                     report=dict(config=config_to_dict(cfg), model=model_name, device=device, data_path=cfg.data_path,
                                 checkpoint=cfg.resume if cfg.eval else recorder.path("checkpoint-best.pdparams"),
                                 weights=find_weights(cfg.finetune, cfg.weights_dir) if cfg.finetune and not cfg.eval
                                 else None))
    logger.close()
    return stats


def cli(argv: list[str] | None = None) -> int:
    from util.protocol import protocol_cli

    return protocol_cli(argv, __file__, main)  # a plain run, or the sub-runs of --seeds/--kfold/--external


if __name__ == "__main__":
    sys.exit(cli())
