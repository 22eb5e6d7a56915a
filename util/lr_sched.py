"""Learning-rate schedules, set per iteration: warmup + half-cycle cosine (the RETFound recipe), step decay,
and reduce-on-plateau.

The engine asks for the LR before every optimizer step with the fractional epoch ``epoch + step /
len(loader)`` and sets the optimizer's base LR with ``optimizer.set_lr``, which Paddle multiplies by each
parameter group's fixed scale (util/lr_decay.py). (Writing the LR into the group dicts instead is ignored by
Paddle and trains at a constant LR.)

``build_schedule(name, ...)`` returns a ``Schedule`` registered by name ('cosine', 'step', 'plateau'); the
function ``lr_at`` is the cosine schedule on its own. 'step' and 'plateau'
reproduce torch's StepLR and ReduceLROnPlateau stepped once per epoch (tests/unit/test_sched.py compares them with
LRs recorded from torch by tools/make_sched_fixture.py), with an optional linear warmup in front.

References: facebookresearch/mae util/lr_sched.py; RETFound_MAE main_finetune.py (effective LR rule);
torch.optim.lr_scheduler.StepLR and ReduceLROnPlateau (documented semantics).
"""
from __future__ import annotations

import abc
import math
from typing import TYPE_CHECKING

from util.errors import UserError, unknown_name_error

if TYPE_CHECKING:  # the schedules only call optimizer.set_lr: no Paddle import needed to compute LRs
    import paddle


def effective_lr(blr: float, lr: float | None, batch_size: int, accum_iter: int = 1,
                 world_size: int = 1) -> float:
    """The absolute peak LR: ``lr`` when given, else ``blr * batch_size * accum_iter * world_size / 256``.

    The one place this rule is computed; log its result, do not write it back into the config.
    """
    if lr is not None:
        return float(lr)
    return float(blr) * int(batch_size) * int(accum_iter) * int(world_size) / 256.0


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """LR at fractional ``epoch``: ``lr * epoch / warmup_epochs`` during warmup, then
    ``min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (epoch - warmup) / (epochs - warmup)))``.

    Beyond the reference's domain: at or past ``epochs`` (and when ``warmup_epochs >= epochs``, once the
    warmup is over) the LR stays at ``min_lr`` instead of rising along the cosine again.
    """
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = epochs - warmup_epochs
    if span <= 0 or epoch >= epochs:
        return min_lr
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))


# ------------------------------------------------------------------------------------------------------------
# Selectable schedules: one object per run, asked for the LR every iteration and told the val metric per epoch.

PLATEAU_EPS = 1e-8  # torch ReduceLROnPlateau(eps=1e-8): a reduction smaller than this is not applied

SCHEDULES: dict[str, type['Schedule']] = {}


def register_schedule(cls: type['Schedule']) -> type['Schedule']:
    """Register a ``Schedule`` subclass under its ``name``."""
    if cls.name in SCHEDULES:
        raise ValueError(f"schedule {cls.name!r} registered twice")
    SCHEDULES[cls.name] = cls
    return cls


class Schedule(abc.ABC):
    """An LR schedule over fractional epochs.

    The engine calls ``lr_at(epoch + step / len(loader))`` (or ``adjust(optimizer, ...)``) before every
    optimizer step and ``epoch_end(epoch, val_metric)`` after each epoch's validation; ``state_dict`` goes
    into the checkpoint so a resumed run continues with the same LRs.
    """
    name: str = ''

    def __init__(self, lr: float, min_lr: float, warmup_epochs: float, epochs: int):
        self.lr, self.min_lr = float(lr), float(min_lr)
        self.warmup_epochs, self.epochs = float(warmup_epochs), int(epochs)

    @abc.abstractmethod
    def lr_at(self, epoch: float) -> float:
        """The LR at fractional ``epoch`` (``epoch + step / steps_per_epoch``)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the log."""

    def epoch_end(self, epoch: int, metric: float | None) -> None:  # noqa: B027 (a hook most schedules ignore)
        """Called after epoch ``epoch`` (0-based) with the monitored validation metric; most ignore it."""

    def adjust(self, optimizer: paddle.optimizer.Optimizer, epoch: float) -> float:
        """Set the optimizer's LR to ``lr_at(epoch)`` (per-group scales apply on top); return it."""
        value = self.lr_at(epoch)
        optimizer.set_lr(float(value))
        return value

    def state_dict(self) -> dict:
        return {'name': self.name}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get('name') if isinstance(state, dict) else None
        if saved != self.name:
            raise UserError(f"resume: the checkpoint's LR schedule is {saved!r} but this run uses {self.name!r} "
                            f"(a resumed run continues its schedule); resume with the {saved!r} schedule, or start a "
                            "new run from the checkpoint's weights with --finetune")

    def _warmup_text(self) -> str:
        return f"linear warmup over {self.warmup_epochs:g} epochs, then " if self.warmup_epochs > 0 else ""


@register_schedule
class CosineSchedule(Schedule):
    """Linear warmup then half-cycle cosine down to ``min_lr`` at ``epochs`` (``lr_at`` above; MAE's)."""
    name = 'cosine'

    def lr_at(self, epoch: float) -> float:
        return lr_at(epoch, self.lr, self.min_lr, self.warmup_epochs, self.epochs)

    def describe(self) -> str:
        return (f"lr schedule cosine: {self._warmup_text()}half-cycle cosine from {self.lr:.3g} to min_lr "
                f"{self.min_lr:.3g} at epoch {self.epochs}")


@register_schedule
class StepSchedule(Schedule):
    """Linear warmup, then ``lr * gamma ** (floor(epoch) // step_size)``: torch StepLR stepped once per epoch.

    The decay is counted in whole epochs from epoch 0 (constant within an epoch) and computed as torch does,
    by multiplying by ``gamma`` once per decay. There is no ``min_lr`` floor (StepLR has none).
    """
    name = 'step'

    def __init__(self, lr: float, min_lr: float, warmup_epochs: float, epochs: int, *, step_size: int = 10,
                 step_gamma: float = 0.1):
        super().__init__(lr, min_lr, warmup_epochs, epochs)
        self.step_size, self.step_gamma = int(step_size), float(step_gamma)

    def lr_at(self, epoch: float) -> float:
        if epoch < self.warmup_epochs:
            return self.lr * epoch / self.warmup_epochs
        value = self.lr
        for _ in range(int(math.floor(epoch)) // self.step_size):
            value *= self.step_gamma
        return value

    def describe(self) -> str:
        return (f"lr schedule step: {self._warmup_text()}{self.lr:.3g} x{self.step_gamma:g} every "
                f"{self.step_size} epochs (no min_lr floor, as torch StepLR)")


@register_schedule
class PlateauSchedule(Schedule):
    """Linear warmup, then a constant LR multiplied by ``factor`` whenever the monitored metric has not
    improved for more than ``patience`` epochs: torch ReduceLROnPlateau with ``threshold_mode='rel'``.

    An epoch improves when ``metric > best * (1 + threshold)`` (mode ``max``) or ``metric < best * (1 -
    threshold)`` (``min``); NaN never improves. After a reduction the bad-epoch count restarts and
    ``cooldown`` epochs are ignored. The new LR is ``max(lr * factor, min_lr)`` and is applied only when it
    is more than ``eps = 1e-8`` below the old one. The floor is on the base LR (the head's); groups with a
    layer-decay or backbone scale keep their ratio to it, where torch would floor each group on its own.
    Epochs that end inside the warmup are not counted (the LR is still rising; torch has no warmup).
    """
    name = 'plateau'

    def __init__(self, lr: float, min_lr: float, warmup_epochs: float, epochs: int, *, mode: str = 'max',
                 factor: float = 0.1, patience: int = 10, threshold: float = 1e-4, cooldown: int = 0):
        super().__init__(lr, min_lr, warmup_epochs, epochs)
        self.mode, self.factor, self.patience = mode, float(factor), int(patience)
        self.threshold, self.cooldown = float(threshold), int(cooldown)
        self.best = -math.inf if mode == 'max' else math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.current_lr = self.lr
        self.num_reductions = 0
        self.last_epoch = -1

    def lr_at(self, epoch: float) -> float:
        if epoch < self.warmup_epochs:
            return self.current_lr * epoch / self.warmup_epochs
        return self.current_lr

    def _is_better(self, metric: float) -> bool:
        if self.mode == 'max':
            return metric > self.best * (1.0 + self.threshold)
        return metric < self.best * (1.0 - self.threshold)

    def epoch_end(self, epoch: int, metric: float | None) -> None:
        if metric is None:
            raise ValueError("PlateauSchedule.epoch_end: the plateau schedule needs the monitored validation "
                             "metric every epoch (got None)")
        self.last_epoch = int(epoch)
        if epoch + 1 <= self.warmup_epochs:
            return
        current = float(metric)
        if self._is_better(current):  # False for NaN
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            new_lr = max(self.current_lr * self.factor, self.min_lr)
            if self.current_lr - new_lr > PLATEAU_EPS:
                self.current_lr = new_lr
                self.num_reductions += 1
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0

    _STATE = ('best', 'num_bad_epochs', 'cooldown_counter', 'current_lr', 'num_reductions', 'last_epoch')

    def state_dict(self) -> dict:
        return {**super().state_dict(), **{k: getattr(self, k) for k in self._STATE}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        missing = [k for k in self._STATE if k not in state]
        if missing:
            raise UserError(f"resume: the checkpoint's plateau schedule state lacks {', '.join(missing)} "
                            "(written by another version?); start a new run with --finetune")
        self.best, self.current_lr = float(state['best']), float(state['current_lr'])
        self.num_bad_epochs, self.cooldown_counter = int(state['num_bad_epochs']), int(state['cooldown_counter'])
        self.num_reductions, self.last_epoch = int(state['num_reductions']), int(state['last_epoch'])

    def describe(self) -> str:
        now = f"; now {self.current_lr:.3g} after {self.num_reductions} reduction(s)" if self.num_reductions else ""
        return (f"lr schedule plateau: {self._warmup_text()}{self.lr:.3g} x{self.factor:g} when the val metric "
                f"({self.mode}) has not improved by more than {self.threshold:g} (relative) for more than "
                f"{self.patience} epochs, cooldown {self.cooldown}, floor min_lr {self.min_lr:.3g}{now}")


def _require(ok: bool, what: str, expected: str, fix: str) -> None:
    if not ok:
        raise UserError(f"build_schedule: {what} ({expected}); {fix}")


def build_schedule(name: str, lr: float, min_lr: float, warmup_epochs: float, epochs: int, *,
                   step_size: int = 10, step_gamma: float = 0.1, plateau_mode: str = 'max',
                   plateau_factor: float = 0.1, plateau_patience: int = 10, plateau_threshold: float = 1e-4,
                   plateau_cooldown: int = 0) -> Schedule:
    """The schedule ``name`` ('cosine', 'step' or 'plateau'); options of the other schedules are ignored."""
    if name not in SCHEDULES:
        raise unknown_name_error('LR schedule', name, SCHEDULES)
    _require(math.isfinite(lr) and lr >= 0, f"lr {lr}", "expected a finite LR >= 0", "pass a valid --lr/--blr")
    _require(math.isfinite(min_lr) and min_lr >= 0, f"min_lr {min_lr}", "expected a finite LR >= 0",
             "pass --min_lr >= 0")
    _require(math.isfinite(warmup_epochs) and warmup_epochs >= 0, f"warmup_epochs {warmup_epochs}",
             "expected >= 0", "pass --warmup_epochs >= 0")
    if name == 'step':
        _require(int(step_size) == step_size and step_size >= 1, f"step_size {step_size}",
                 "expected a whole number of epochs >= 1", "pass a step size of at least 1 epoch")
        _require(math.isfinite(step_gamma) and step_gamma > 0, f"step_gamma {step_gamma}",
                 "expected a factor > 0, e.g. 0.1", "pass a positive step gamma")
        return StepSchedule(lr, min_lr, warmup_epochs, epochs, step_size=step_size, step_gamma=step_gamma)
    if name == 'plateau':
        _require(plateau_mode in ('max', 'min'), f"plateau_mode {plateau_mode!r}",
                 "expected 'max' for a score such as AUROC or F1, 'min' for a loss", "pass max or min")
        _require(0 < plateau_factor < 1, f"plateau_factor {plateau_factor}", "expected 0 < factor < 1",
                 "pass e.g. 0.1")
        _require(int(plateau_patience) == plateau_patience and plateau_patience >= 0,
                 f"plateau_patience {plateau_patience}", "expected a whole number of epochs >= 0",
                 "pass e.g. 10")
        _require(math.isfinite(plateau_threshold) and plateau_threshold >= 0,
                 f"plateau_threshold {plateau_threshold}", "expected a relative threshold >= 0",
                 "pass e.g. 1e-4")
        _require(int(plateau_cooldown) == plateau_cooldown and plateau_cooldown >= 0,
                 f"plateau_cooldown {plateau_cooldown}", "expected a whole number of epochs >= 0", "pass e.g. 0")
        return PlateauSchedule(lr, min_lr, warmup_epochs, epochs, mode=plateau_mode, factor=plateau_factor,
                               patience=plateau_patience, threshold=plateau_threshold, cooldown=plateau_cooldown)
    return SCHEDULES[name](lr, min_lr, warmup_epochs, epochs)
