"""The training run around the engine: optimizer, schedule and loss scaler (``build_training``), resuming their
state (``restore_training``) and the epoch loop with validation, model selection and checkpoints (``fit``).

Everything comes in as explicit values: ``FitOptions`` (frozen) holds the settings of the loop; the
recorder writes every file. References: RETFound_MAE / MAE ``main_finetune.py`` (the epoch loop, best
checkpoint by the validation score, the test on the best checkpoint). ``--patience`` (early stopping, off
by default as in the reference, which has none) counts epochs without a new best by that same comparison.

Adaptation (``util/adaptation.py``): a LoRA model's ``checkpoint-best`` is rewritten merged each time it is saved
(a plain model; ``checkpoint-last`` keeps the adapters, to resume), and its adapters are merged into the weights
before the best checkpoint is loaded for the test. With ``lp_cached_features`` the network trained (and
calibrated) is the head on the train and val features, computed once (``util/lp_features.py``): only trainable
parameters change, so their best and last values are kept in memory and both checkpoints (of the full model)
are written once, at the end.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import paddle

import engine_finetune as engine
from models.pretrained import load_state_dict_strict
from util import distributed as D
from util.adaptation import has_lora, merge_lora, merged_state_dict
from util.errors import UserError
from util.fileio import atomic_path
from util.lp_features import feature_loaders
from util.lr_decay import build_optimizer
from util.lr_sched import Schedule, build_schedule, effective_lr
from util.metrics.calibration import (
    CALIBRATED_TASKS,
    apply_temperature,
    apply_temperature_to_thresholds,
    calibration_summary,
    fit_temperature,
    negative_log_likelihood,
)
from util.outputs.checkpoint import (
    CheckpointWriter,
    atomic_save,
    load_checkpoint,
    load_optimizer_state_by_name,
    set_rng_state,
)
from util.outputs.reports import format_metrics, format_per_class


@dataclass(frozen=True)
class FitOptions:
    """The settings of a training run (the CLI flags of the same names)."""
    epochs: int
    batch_size: int
    accum_iter: int = 1
    blr: float = 5e-3
    lr: float | None = None
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    opt: str = "adamw"
    momentum: float = 0.9
    backbone_lr_scale: float = 1.0
    sched: str = "cosine"
    step_size: int = 10
    step_gamma: float = 0.1
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    plateau_metric: str = ""
    val_metric: str = "score"
    patience: int = 0  # stop after this many epochs in a row without a new best val_metric; 0: never
    tune_thresholds: bool | None = None
    calibrate: bool = False  # fit a temperature on the tested weights' val outputs (calibrate_on_val)
    clip_grad: float | None = None
    start_epoch: int = 0
    print_freq: int = 20
    per_class_report: bool = False
    seed: int = 0
    data_path: str = ""
    balanced_sampler: bool = False
    lp_cached_features: bool = False  # train the head on features computed once (util/lp_features.py)
    save_last_every: int = 1  # checkpoint-last every N epochs (and at the last epoch, early stop, new best)
    async_save: bool = False  # write checkpoints in a background thread (util.outputs.checkpoint.CheckpointWriter)
    info: dict = field(default_factory=dict)  # written to run_info.json


@dataclass
class Training:
    """What the loop updates: optimizer, LR schedule, loss scaler (float16 AMP only) and the peak LR."""
    optimizer: paddle.optimizer.Optimizer
    schedule: Schedule
    scaler: object | None
    lr: float
    plateau_metric: str
    tune: bool


def build_training(model, task, opts: FitOptions, amp, say) -> Training:
    world = D.get_world_size()
    lr = effective_lr(opts.blr, opts.lr, opts.batch_size, opts.accum_iter, world)
    say(f"base lr: {lr * 256 / (opts.batch_size * opts.accum_iter * world):.2e}  actual lr: {lr:.2e}  "
        f"effective batch size: {opts.batch_size * opts.accum_iter * world} "
        f"(batch {opts.batch_size} x accum {opts.accum_iter} x {world} process(es))")
    optimizer = build_optimizer(model, lr, weight_decay=opts.weight_decay, layer_decay=opts.layer_decay,
                                opt=opts.opt, momentum=opts.momentum, backbone_lr_scale=opts.backbone_lr_scale)
    plateau_metric = task.check_metric(opts.plateau_metric or opts.val_metric, "--plateau_metric")
    schedule = build_schedule(opts.sched, lr, opts.min_lr, opts.warmup_epochs, opts.epochs, step_size=opts.step_size,
                              step_gamma=opts.step_gamma, plateau_factor=opts.plateau_factor,
                              plateau_patience=opts.plateau_patience,
                              plateau_mode="min" if plateau_metric in task.minimize else "max")
    say(f"optimizer {opts.opt}, schedule: {schedule.describe()}"
        + (f" on val {plateau_metric}" if opts.sched == "plateau" else "")
        + (f", backbone LR x{opts.backbone_lr_scale}" if opts.backbone_lr_scale != 1 else ""))
    scaler = None
    if amp.enabled and amp.dtype == "float16":
        scaler = paddle.amp.GradScaler(init_loss_scaling=2.0**16)  # dynamic loss scaling, GPU only
    tune = task.tune_by_default if opts.tune_thresholds is None else bool(opts.tune_thresholds)
    if tune and task.tune is None:
        raise UserError(f"--tune_thresholds: {task.name} predictions have no decision thresholds to tune "
                        "(argmax); remove the flag")
    if opts.patience < 0 or int(opts.patience) != opts.patience:
        raise UserError(f"--patience {opts.patience}: not a whole number of epochs >= 0 (0 turns early stopping "
                        "off; N stops after N epochs in a row without a new best); pass 0 or a positive integer")
    return Training(optimizer, schedule, scaler, lr, plateau_metric, tune)


@dataclass
class RunState:
    """Where the run stands: the next epoch, the best so far and the epochs since (for ``--patience``)."""
    start_epoch: int
    best_score: float = -math.inf
    best_epoch: int = -1
    best_thresholds: list | None = None
    epochs_without_improvement: int = 0
    stopped_early: bool = False

    def record(self, epoch: int, score: float, thresholds=None) -> bool:
        """Model selection for one epoch: ``True`` when ``score`` (the selection value, higher is better) is a
        new best, i.e. strictly greater; the first epoch is kept even if NaN. Counts the epochs without one."""
        score = -math.inf if math.isnan(score) else score  # an undefined metric never beats a number
        improved = score > self.best_score or self.best_epoch < 0
        if improved:
            self.best_score, self.best_epoch, self.best_thresholds = score, epoch, thresholds
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        return improved

    def patience_exhausted(self, patience: int) -> bool:
        """``patience`` epochs in a row without a new best (never with ``patience`` 0)."""
        return patience > 0 and self.epochs_without_improvement >= patience


def restore_training(state: dict | None, training: Training, model, opts: FitOptions, say) -> RunState:
    """Load optimizer, scaler, schedule and RNG state from a resumed checkpoint (``None``: a new run)."""
    if state is None:
        return RunState(opts.start_epoch)
    if "optimizer" in state:
        load_optimizer_state_by_name(training.optimizer, model, state["optimizer"])
    if training.scaler is not None and state.get("scaler"):
        training.scaler.load_state_dict(state["scaler"])
    if state.get("schedule"):
        training.schedule.load_state_dict(state["schedule"])
    run = RunState(int(state["epoch"]) + 1, float(state.get("best_score", -math.inf)),
                   int(state.get("best_epoch", -1)), state.get("best_thresholds"))
    # a checkpoint written before --patience existed has no counter: every epoch after the best had none
    run.epochs_without_improvement = int(state.get("epochs_without_improvement",
                                                   max(0, int(state["epoch"]) - run.best_epoch)))
    run.stopped_early = bool(state.get("stopped_early", False))
    if "rng" in state and D.get_world_size() == 1:
        set_rng_state(state["rng"])
    say(f"Resuming at epoch {run.start_epoch} (best val {opts.val_metric} so far at epoch {run.best_epoch})")
    return run


def _metric_value(task, metric: str, score: float) -> float:
    """The metric's own value from its selection value (negated when lower is better; -inf was NaN)."""
    if not math.isfinite(score):
        return float("nan")
    return -score if metric in task.minimize else score


def check_steps(steps_per_epoch: int, n_images: int, opts: FitOptions, say) -> None:
    world = D.get_world_size()
    if steps_per_epoch == 0:
        raise UserError(f"{opts.data_path}/train: {n_images} images are fewer than one batch "
                        f"(batch_size {opts.batch_size} x {world} process(es), last partial batch dropped); "
                        "lower --batch_size or add images")
    if opts.accum_iter > steps_per_epoch:
        raise UserError(f"--accum_iter {opts.accum_iter}: more than the {steps_per_epoch} batches of an epoch (the "
                        "model would never be updated: the optimizer steps once every accum_iter batches and the "
                        f"count restarts each epoch); pass --accum_iter {steps_per_epoch} or less, or a smaller "
                        "--batch_size")
    if steps_per_epoch % opts.accum_iter:
        say(f"warning: --accum_iter {opts.accum_iter} does not divide the {steps_per_epoch} batches of an epoch: the "
            f"last {steps_per_epoch % opts.accum_iter} batch(es) of each epoch add gradients that no optimizer "
            "step uses (as in the reference); pick an --accum_iter that divides it to use every batch")


def calibrate_on_val(model, val_loader, task, num_classes: int, class_names: list, thresholds, *, eval_loss, amp,
                     print_freq: int, say) -> dict | None:
    """``--calibrate``: fit a temperature on the validation outputs of the weights in ``model``.

    Returns ``{'temperature', 'nll': (before, after), 'ece': (before, after)}`` after printing them on one
    line, or ``None`` for regression (its output is a grade: nothing to calibrate; said so).

    Multi-label thresholds tuned on validation before calibration stay as they were tuned, on the
    uncalibrated probabilities (that is what the checkpoint's ``thresholds`` mean, for every reader that
    knows no temperature); ``evaluate(..., temperature=T)`` moves them through the same increasing map as the
    probabilities. So T changes the reported probabilities, the loss and the calibration, never a decision.
    Re-tuning on the calibrated validation outputs would find the same split of the validation cases (the
    map keeps their order) but could place the cut elsewhere between them, changing test decisions for no
    gain in validation F1; T is a calibration of the probabilities, not a new classifier.
    """
    if task.name not in CALIBRATED_TASKS:
        say(f"calibration: --calibrate does not apply to {task.name} (its output is a grade, not a "
            "probability); skipped")
        return None
    _, y_true, outputs = engine.evaluate(model, val_loader, task, num_classes, loss_fn=eval_loss, thresholds=thresholds,
                                         class_names=class_names, amp=amp, header="Calibrate", print_freq=print_freq)
    temperature = fit_temperature(y_true, outputs, task.name)
    after = apply_temperature(outputs, temperature, task.name)
    nll = tuple(negative_log_likelihood(y_true, o, task.name) for o in (outputs, after))
    ece = tuple(calibration_summary(y_true, o, task.name).get("ece", math.nan) for o in (outputs, after))
    say(f"calibration: temperature {temperature:.4g} fitted on val (NLL {nll[0]:.4f} -> {nll[1]:.4f}, "
        f"ECE {ece[0]:.4f} -> {ece[1]:.4f})")
    return {"temperature": temperature, "nll": nll, "ece": ece}


def store_temperature(state: dict, bare_model, best_path: str, thresholds_path: str | None, task,
                      temperature: float) -> None:
    """Rewrite ``checkpoint-best.pdparams`` (atomically) with a top-level ``temperature``, and add it to
    ``thresholds.json`` when there is one (multi-label: with the thresholds on the calibrated scale too)."""
    atomic_save({**state, "model": bare_model.state_dict(), "temperature": float(temperature)}, best_path)
    if not thresholds_path or not os.path.isfile(thresholds_path):
        return
    with open(thresholds_path, encoding="utf8") as f:
        record = json.load(f)
    record["temperature"] = float(temperature)
    if task.name == "multi_label" and record.get("thresholds") is not None:
        calibrated = apply_temperature_to_thresholds(record["thresholds"], temperature, task.name)
        record["thresholds_calibrated"] = [float(t) for t in calibrated]
        record["temperature_note"] = ("thresholds apply to the uncalibrated probabilities, thresholds_calibrated "
                                      "to the probabilities with the temperature applied: the same decisions")
    with atomic_path(thresholds_path, suffix=".json") as tmp, open(tmp, "w", encoding="utf8") as f:
        json.dump(record, f, indent=2)


def fit(model, bare_model, loaders: dict, seeders: dict, task, num_classes: int, class_names: list, *, criterion,
        eval_loss, amp, logger, recorder, opts: FitOptions, resume_state: dict | None, say,
        calibration: dict | None = None):
    """Train with per-epoch validation and checkpoints; leaves the best checkpoint's weights in the model and
    returns the decision thresholds tuned on validation at that epoch (``None`` when not tuned).

    With ``opts.calibrate`` a temperature is fitted on the validation outputs of the weights to be tested
    (``calibrate_on_val``) and stored in checkpoint-best (``store_temperature``); ``calibration`` (a dict,
    when given) receives ``calibrate_on_val``'s result, for the test: ``evaluate(..., temperature=...)``."""
    training = build_training(bare_model, task, opts, amp, say)
    run = restore_training(resume_state, training, bare_model, opts, say)
    if opts.lp_cached_features and run.start_epoch < opts.epochs:  # the network: the head on frozen features
        model, loaders, seeders = feature_loaders(bare_model, {s: loaders[s].dataset for s in ("train", "val")},
                                                  loaders["val"].dataset.transform, opts.batch_size,
                                                  loaders["train"].num_workers, opts.seed, amp, opts.balanced_sampler,
                                                  say)
    if logger.enabled:
        with open(os.path.join(recorder.run_dir, "run_info.json"), "w", encoding="utf8") as f:
            json.dump({"effective_lr": training.lr, "tune_thresholds": training.tune,
                       "plateau_metric": training.plateau_metric, **opts.info}, f, indent=2)
    steps_per_epoch = len(loaders["train"])
    check_steps(steps_per_epoch, len(loaders["train"].dataset), opts, say)
    global_step = run.start_epoch * (steps_per_epoch // opts.accum_iter)
    headline = list(task.headline)
    if opts.val_metric not in headline:
        headline.append(opts.val_metric)
    say(f"Start training for {opts.epochs} epochs ({steps_per_epoch} steps each), best checkpoint by val "
        f"{opts.val_metric}" + (f", early stopping after {opts.patience} epoch(s) without a new best"
                                if opts.patience else "") + f" -> {recorder.run_dir}")
    epochs = range(run.start_epoch, opts.epochs)
    if epochs and run.patience_exhausted(opts.patience):  # resumed from a run that had stopped early
        say(f"Early stopping: the resumed run had already gone {run.epochs_without_improvement} epoch(s) without a "
            f"new best val {opts.val_metric} (--patience {opts.patience}; best {opts.val_metric} "
            f"{_metric_value(task, opts.val_metric, run.best_score):.4f} at epoch {run.best_epoch}); not training "
            "on; pass a larger --patience, or --patience 0, to train the remaining epochs")
        epochs = range(0)
    elif epochs and run.stopped_early:
        say(f"resume: the run had stopped early after {run.epochs_without_improvement} epoch(s) without a new best "
            f"val {opts.val_metric}; with --patience {opts.patience}" + (" (off)" if not opts.patience else "")
            + f" it trains on from epoch {run.start_epoch}")
    if opts.save_last_every < 1 or int(opts.save_last_every) != opts.save_last_every:
        raise UserError(f"--save_last_every {opts.save_last_every}: not a whole number of epochs >= 1 (1 writes "
                        "checkpoint-last after every epoch); pass 1 or more")
    if opts.save_last_every > 1 or opts.async_save:
        say("checkpoints: " + ", ".join(
            ([f"checkpoint-last every {opts.save_last_every} epochs, at the last one and with each new best (a "
              f"crash loses up to {opts.save_last_every - 1} epoch(s))"] if opts.save_last_every > 1 else [])
            + (["written in a background thread from a copy in memory (as large as checkpoint-last, kept for "
                "the run)"]
               if opts.async_save else [])))
    last_epoch = run.start_epoch - 1  # the run's last trained epoch (-1: none)
    kept: dict = {}  # lp_cached_features: (epoch, trainable values, val stats) of the best and the last epoch
    writer = CheckpointWriter(background=opts.async_save)

    def save(epoch: int, val_stats: dict, improved: bool, last: bool = True) -> None:
        # checkpoint-best is a plain model (predict.py, export.py): a LoRA model's adapters merged into qkv.weight
        lora_best = improved and recorder.enabled and recorder.savemodel and has_lora(bare_model)
        merged = merged_state_dict(bare_model) if lora_best else None
        recorder.checkpoints(epoch, model=bare_model, optimizer=training.optimizer, scaler=training.scaler,
                             schedule=training.schedule, val_stats=val_stats, val_metric=opts.val_metric,
                             improved=improved, best_score=run.best_score, best_epoch=run.best_epoch,
                             best_thresholds=run.best_thresholds,
                             epochs_without_improvement=run.epochs_without_improvement,
                             stopped_early=run.stopped_early, save_last=last, best_model_state=merged,
                             writer=writer)

    def last_due(epoch: int, improved: bool) -> bool:
        """--save_last_every N: checkpoint-last at every Nth epoch, the final one, an early stop, and with every
        new checkpoint-best (as PyTorch Lightning's ``save_last`` does), so a resumed run never meets a
        checkpoint-best from an epoch after the one it resumes from; a crash loses at most N - 1 epochs."""
        return (improved or run.stopped_early or (epoch + 1) % opts.save_last_every == 0
                or epoch + 1 >= opts.epochs)

    t0 = time.time()
    try:
        for epoch in epochs:
            loaders["train"].batch_sampler.set_epoch(epoch)
            seeders["train"].base = opts.seed * 100003 + epoch * 7
            train_stats, global_step = engine.train_one_epoch(
                model, criterion, loaders["train"], training.optimizer, epoch, schedule=training.schedule,
                accum_iter=opts.accum_iter, clip_grad=opts.clip_grad, scaler=training.scaler, amp=amp,
                logger=logger, print_freq=opts.print_freq, global_step=global_step, epochs=opts.epochs)
            val_stats, _, _ = engine.evaluate(model, loaders["val"], task, num_classes, loss_fn=eval_loss,
                                              tune=training.tune, class_names=class_names, amp=amp, header="Val",
                                              print_freq=opts.print_freq)
            training.schedule.epoch_end(epoch, val_stats.get(training.plateau_metric))
            score = task.selection_value(val_stats, opts.val_metric)
            improved = run.record(epoch, score, val_stats.get("thresholds"))
            # every rank computed val_stats from the same gathered rows (engine.evaluate), so all of them take
            # the same decision here without another collective
            run.stopped_early = run.patience_exhausted(opts.patience) and epoch + 1 < opts.epochs
            say(f"Epoch {epoch}: train loss {train_stats['loss']:.4f}, "
                + format_metrics("val", val_stats, ["val_loss", *headline])
                + (" (best)" if improved else f" (best {opts.val_metric} at epoch {run.best_epoch})"))
            if opts.per_class_report:
                say(format_per_class(val_stats.get("per_class", [])))
            recorder.epoch(epoch, train_stats, val_stats, opts.info["n_parameters"])
            if opts.lp_cached_features:  # only the head changes: its states are kept, the files written at the end
                if improved:
                    kept["best"] = (epoch, _trainable_values(bare_model), val_stats)
                kept["last"] = (epoch, None, val_stats)
            else:
                save(epoch, val_stats, improved, last=last_due(epoch, improved))
            D.barrier()
            last_epoch = epoch
            if run.stopped_early:
                say(f"Early stopping at epoch {epoch}: no new best val {opts.val_metric} for "
                    f"{run.epochs_without_improvement} epoch(s) (--patience {opts.patience}); best "
                    f"{opts.val_metric} {_metric_value(task, opts.val_metric, run.best_score):.4f} at epoch "
                    f"{run.best_epoch}")
                break
        if "last" in kept:  # lp_cached_features: the best and the last head of this run's epochs, written now
            if "best" in kept:
                final = _trainable_values(bare_model)
                _set_values(bare_model, kept["best"][1])
                save(kept["best"][0], kept["best"][2], True, last=False)
                _set_values(bare_model, final)
            save(kept["last"][0], kept["last"][2], False)
        writer.close()  # the last write done (or its error raised) before the files are read
    except BaseException as exc:  # Ctrl-C included: the write in flight still lands, a failed one is noted
        writer.abandon(exc)
        raise
    say(f"Training time {time.time() - t0:.0f}s; best val {opts.val_metric} at epoch {run.best_epoch}")
    recorder.curves(run.best_epoch, headline)
    if has_lora(bare_model):  # the test (and anything after it) sees the plain model checkpoint-best holds
        say(f"LoRA: the adapters of {merge_lora(bare_model)} qkv projections merged into the weights")

    # the test runs once, on the best checkpoint, with the thresholds tuned at that epoch
    best_path = recorder.path("checkpoint-best.pdparams")
    if best_path and os.path.isfile(best_path):
        state = load_checkpoint(best_path)
        load_state_dict_strict(bare_model, state["model"], best_path)
        recorder.tested_weights(last_epoch if last_epoch >= 0 else None, state.get("epoch", run.best_epoch))
        thresholds = state.get("thresholds")
        fitted = _calibrate(model, loaders, task, num_classes, class_names, thresholds, eval_loss, amp, opts, say,
                            calibration)
        if fitted is not None and recorder.enabled:
            store_temperature(state, bare_model, best_path, recorder.path("thresholds.json"), task,
                              fitted["temperature"])
        say(f"Test on the best checkpoint (epoch {run.best_epoch})")
        return thresholds
    recorder.tested_weights(*(2 * [last_epoch if last_epoch >= 0 else None]))
    _calibrate(model, loaders, task, num_classes, class_names, run.best_thresholds, eval_loss, amp, opts, say,
               calibration)
    say("Test on the final weights (no best checkpoint was saved: --no-savemodel or no output folder)")
    return run.best_thresholds


def _trainable_values(model) -> dict:
    """Copies of the values of ``model``'s trainable parameters, by name."""
    return {n: p.numpy().copy() for n, p in model.named_parameters() if not p.stop_gradient}


def _set_values(model, values: dict) -> None:
    params = dict(model.named_parameters())
    with paddle.no_grad():
        for name, value in values.items():
            params[name].set_value(value)


def _calibrate(model, loaders, task, num_classes, class_names, thresholds, eval_loss, amp, opts, say, calibration):
    """``calibrate_on_val`` when ``--calibrate`` is on (every rank: the evaluation is collective)."""
    if not opts.calibrate:
        return None
    fitted = calibrate_on_val(model, loaders["val"], task, num_classes, class_names, thresholds, eval_loss=eval_loss,
                              amp=amp, print_freq=opts.print_freq, say=say)
    if fitted is not None and calibration is not None:
        calibration.update(fitted)
    return fitted
