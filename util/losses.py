"""Training and evaluation losses for the three tasks, registered by task and name.

``build_loss(task, name)`` returns a callable ``loss(logits, target) -> Tensor``:

* ``single_label``: ``ce`` -- softmax cross-entropy with label smoothing spread over all classes and
  optional per-class weights (PyTorch ``CrossEntropyLoss(weight=w, label_smoothing=s)``: the weighted mean
  divides by the summed weights of the targets). Without weights this is timm's
  ``LabelSmoothingCrossEntropy``, the RETFound reference's training loss.
* ``multi_label``: ``bce`` -- sigmoid BCE with optional per-label ``pos_weight`` (PyTorch
  ``BCEWithLogitsLoss``); ``focal`` -- sigmoid focal loss (torchvision ``sigmoid_focal_loss``, mean);
  ``hybrid`` -- ``0.5 * bce(pos_weight) + 0.5 * focal``, the loss of the ODIR-5K ConvNeXt seed system
  (alpha 0.3, gamma 2.5 unless given).
* ``regression``: ``smooth_l1`` (PyTorch ``SmoothL1Loss``, beta 1) and ``mse``; logits ``[B, 1]`` (or
  ``[B]``) against float targets ``[B]``.

``auto`` picks ce / bce / smooth_l1. ``reduction='none'`` returns one loss per sample, shape ``[B]`` (the
mean over the labels for multi-label), which is what evaluation averages; ``'mean'`` and ``'sum'`` reduce
over the batch. Logits are cast to float32 first (safe under AMP) and every sigmoid term is written with
``softplus(x) = max(x, 0) + log1p(exp(-|x|))``, so logits of +-100 give finite losses and gradients.

References: PyTorch ``torch.nn.functional.cross_entropy`` / ``binary_cross_entropy_with_logits`` /
``smooth_l1_loss`` definitions; torchvision ``ops.sigmoid_focal_loss`` (Lin et al., "Focal Loss for Dense
Object Detection", 2017); timm ``LabelSmoothingCrossEntropy``; scikit-learn ``compute_class_weight``
('balanced'). Numbers are checked against PyTorch in tests/fixtures/loss_reference.npz
(tools/make_loss_fixture.py).
"""
from __future__ import annotations

import abc
import warnings
from typing import Callable, Sequence

import numpy as np
import paddle
import paddle.nn.functional as F

from util.errors import UserError, close_matches
from util.task_names import TASK_NAMES

REDUCTIONS = ('mean', 'sum', 'none')

# task -> loss name -> factory(**options) -> (logits, target) -> per-element losses + how to reduce
LOSSES: dict[str, dict[str, Callable[..., 'Loss']]] = {t: {} for t in TASK_NAMES}
AUTO_LOSS = {'single_label': 'ce', 'multi_label': 'bce', 'regression': 'smooth_l1'}

# Focal defaults when focal_alpha / focal_gamma are None: torchvision's for 'focal', the ODIR seed's for
# 'hybrid'.
FOCAL_DEFAULTS = {'focal': (0.25, 2.0), 'hybrid': (0.3, 2.5)}


class LossWarning(UserWarning):
    """A loss weight could not be derived from the data as asked and a neutral value was used."""


def register_loss(task: str, name: str):
    """Register ``factory(**options) -> Loss`` as loss ``name`` of ``task``."""
    def deco(factory):
        if name in LOSSES[task]:
            raise ValueError(f"register_loss: {task}/{name} is registered twice")
        LOSSES[task][name] = factory
        return factory
    return deco


def loss_names(task: str) -> list[str]:
    """The loss names valid for ``task`` (plus 'auto')."""
    return ['auto'] + sorted(LOSSES[task])


# ---------------------------------------------------------------------------------------------------
# Numerically stable pieces (float32 tensors)


def _softplus(x: paddle.Tensor) -> paddle.Tensor:
    """log(1 + exp(x)) without overflow: max(x, 0) + log1p(exp(-|x|))."""
    return F.relu(x) + paddle.log1p(paddle.exp(-paddle.abs(x)))


def _log_softmax(x: paddle.Tensor) -> paddle.Tensor:
    """x - logsumexp(x) over the last axis. Paddle 3.3's ``F.log_softmax`` (and ``F.cross_entropy``,
    ``F.softmax``) clamp log-probabilities at -64 on CPU, even in float64, so a confidently wrong sample
    would lose at most 64 where PyTorch gives its true loss."""
    return x - paddle.logsumexp(x, axis=-1, keepdim=True)


def _bce_elementwise(x: paddle.Tensor, t: paddle.Tensor, pos_weight: paddle.Tensor | None) -> paddle.Tensor:
    """-[pw * t * log sigmoid(x) + (1 - t) * log(1 - sigmoid(x))]; log sigmoid(x) = -softplus(-x)."""
    pos = t * _softplus(-x)
    if pos_weight is not None:
        pos = pos * pos_weight
    return pos + (1.0 - t) * _softplus(x)


def _focal_elementwise(x: paddle.Tensor, t: paddle.Tensor, alpha: float, gamma: float) -> paddle.Tensor:
    """torchvision's ce * (1 - p_t) ** gamma * alpha_t, with 1 - p_t = t * sigmoid(-x) + (1 - t) *
    sigmoid(x) computed directly (no cancellation in 1 - p_t for confident predictions)."""
    loss = _bce_elementwise(x, t, None)
    if gamma != 0:
        one_minus_pt = t * F.sigmoid(-x) + (1.0 - t) * F.sigmoid(x)
        # the floor keeps d/dq q**gamma finite for gamma < 1 where q underflows to 0 (|x| > ~100)
        loss = loss * paddle.pow(paddle.clip(one_minus_pt, min=1e-30), gamma)
    if alpha >= 0:
        loss = loss * (alpha * t + (1.0 - alpha) * (1.0 - t))
    return loss


# ---------------------------------------------------------------------------------------------------


class Loss(abc.ABC):
    """A configured loss: ``loss(logits, target) -> Tensor`` (scalar, or ``[B]`` for reduction 'none')."""

    task: str = ''
    name: str = ''

    def __init__(self, reduction: str = 'mean'):
        self.reduction = reduction

    @abc.abstractmethod
    def __call__(self, logits: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        """The loss of ``logits`` against ``target``."""

    def _reduce(self, per_sample: paddle.Tensor) -> paddle.Tensor:
        if self.reduction == 'none':
            return per_sample
        if self.reduction == 'sum':
            return per_sample.sum()
        return per_sample.mean()

    def _options(self) -> str:
        return ''

    def __repr__(self) -> str:
        opts = self._options()
        return f"{type(self).__name__}({self.task}/{self.name}, reduction={self.reduction!r}" \
               f"{', ' + opts if opts else ''})"


def _as_tensor(values: np.ndarray | None, like: paddle.Tensor) -> paddle.Tensor | None:
    if values is None:
        return None
    return paddle.to_tensor(values, dtype='float32', place=like.place)


def _fmt(values: np.ndarray | None) -> str:
    return 'None' if values is None else '[' + ', '.join(f'{v:.4g}' for v in values) + ']'


class CrossEntropy(Loss):
    task, name = 'single_label', 'ce'

    def __init__(self, reduction: str = 'mean', smoothing: float = 0.0, class_weights: np.ndarray | None = None):
        super().__init__(reduction)
        self.smoothing = float(smoothing)
        self.class_weights = class_weights

    def _options(self) -> str:
        return f"smoothing={self.smoothing}, class_weights={_fmt(self.class_weights)}"

    def __call__(self, logits, target):
        logits = logits.astype('float32')
        if logits.ndim != 2:
            raise ValueError(f"loss ce: logits must have shape [B, K], got {list(logits.shape)}")
        k = logits.shape[1]
        target = target.reshape([-1]).astype('int64')
        if target.shape[0] != logits.shape[0]:
            raise ValueError(f"loss ce: {target.shape[0]} targets for {logits.shape[0]} rows of logits")
        logp = _log_softmax(logits)
        nll = -paddle.take_along_axis(logp, target.reshape([-1, 1]), axis=1).squeeze(1)
        if self.class_weights is None:
            # soft_cross_entropy of the original engine, unchanged: (1 - s) * nll + s * mean_c(-log p_c)
            loss = nll if self.smoothing <= 0 else (1.0 - self.smoothing) * nll - self.smoothing * logp.mean(axis=-1)
            return self._reduce(loss)
        if len(self.class_weights) != k:
            raise ValueError(f"loss ce: {len(self.class_weights)} class weights for {k} classes")
        w = _as_tensor(self.class_weights, logits)
        w_t = paddle.gather(w, target)
        loss = w_t * nll
        if self.smoothing > 0:
            smooth = -(logp * w.reshape([1, -1])).sum(axis=-1)  # PyTorch: weights inside the smoothing sum too
            loss = (1.0 - self.smoothing) * loss + (self.smoothing / k) * smooth
        if self.reduction == 'mean':
            # PyTorch's weighted mean: divided by the summed weights of the targets, not by B
            return loss.sum() / w_t.sum()
        return self._reduce(loss)


class _MultiLabel(Loss):
    task = 'multi_label'

    def _check(self, logits, target):
        logits = logits.astype('float32')
        target = target.astype('float32')
        if logits.ndim != 2 or list(target.shape) != list(logits.shape):
            raise ValueError(f"loss {self.name}: logits and targets must both have shape [B, L], got "
                             f"{list(logits.shape)} and {list(target.shape)}")
        return logits, target

    def _pos_weight(self, logits):
        pw = getattr(self, 'pos_weight', None)
        if pw is None:
            return None
        if len(pw) != logits.shape[1]:
            raise ValueError(f"loss {self.name}: {len(pw)} pos_weight values for {logits.shape[1]} labels")
        return _as_tensor(pw, logits).reshape([1, -1])


class BCEWithLogits(_MultiLabel):
    name = 'bce'

    def __init__(self, reduction: str = 'mean', pos_weight: np.ndarray | None = None):
        super().__init__(reduction)
        self.pos_weight = pos_weight

    def _options(self) -> str:
        return f"pos_weight={_fmt(self.pos_weight)}"

    def __call__(self, logits, target):
        logits, target = self._check(logits, target)
        return self._reduce(_bce_elementwise(logits, target, self._pos_weight(logits)).mean(axis=1))


class SigmoidFocal(_MultiLabel):
    name = 'focal'

    def __init__(self, reduction: str = 'mean', alpha: float = 0.25, gamma: float = 2.0):
        super().__init__(reduction)
        self.alpha, self.gamma = float(alpha), float(gamma)

    def _options(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}"

    def __call__(self, logits, target):
        logits, target = self._check(logits, target)
        return self._reduce(_focal_elementwise(logits, target, self.alpha, self.gamma).mean(axis=1))


class HybridBCEFocal(_MultiLabel):
    name = 'hybrid'

    def __init__(self, reduction: str = 'mean', pos_weight: np.ndarray | None = None, alpha: float = 0.3,
                 gamma: float = 2.5):
        super().__init__(reduction)
        self.pos_weight = pos_weight
        self.alpha, self.gamma = float(alpha), float(gamma)

    def _options(self) -> str:
        return f"pos_weight={_fmt(self.pos_weight)}, alpha={self.alpha}, gamma={self.gamma}"

    def __call__(self, logits, target):
        logits, target = self._check(logits, target)
        bce = _bce_elementwise(logits, target, self._pos_weight(logits))
        focal = _focal_elementwise(logits, target, self.alpha, self.gamma)
        return self._reduce((0.5 * bce + 0.5 * focal).mean(axis=1))


class _Regression(Loss):
    task = 'regression'

    def _check(self, logits, target):
        logits = logits.astype('float32')
        if not (logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1)):
            raise ValueError(f"loss {self.name}: regression logits must have shape [B, 1] or [B], got "
                             f"{list(logits.shape)}")
        logits = logits.reshape([-1])
        target = target.astype('float32').reshape([-1])
        if target.shape[0] != logits.shape[0]:
            raise ValueError(f"loss {self.name}: {target.shape[0]} targets for {logits.shape[0]} outputs")
        return logits, target


class SmoothL1(_Regression):
    name = 'smooth_l1'
    beta = 1.0

    def __call__(self, logits, target):
        logits, target = self._check(logits, target)
        d = paddle.abs(logits - target)
        return self._reduce(paddle.where(d < self.beta, 0.5 * d * d / self.beta, d - 0.5 * self.beta))


class MSE(_Regression):
    name = 'mse'

    def __call__(self, logits, target):
        logits, target = self._check(logits, target)
        return self._reduce((logits - target) ** 2)


# ---------------------------------------------------------------------------------------------------
# Registry. Each factory receives every option and uses the ones that apply to it; build_loss rejects
# options that a loss would silently ignore.

@register_loss('single_label', 'ce')
def _ce(reduction, smoothing, class_weights, **_):
    return CrossEntropy(reduction, smoothing, class_weights)


@register_loss('multi_label', 'bce')
def _bce(reduction, pos_weight, **_):
    return BCEWithLogits(reduction, pos_weight)


@register_loss('multi_label', 'focal')
def _focal(reduction, focal_alpha, focal_gamma, **_):
    return SigmoidFocal(reduction, focal_alpha, focal_gamma)


@register_loss('multi_label', 'hybrid')
def _hybrid(reduction, pos_weight, focal_alpha, focal_gamma, **_):
    return HybridBCEFocal(reduction, pos_weight, focal_alpha, focal_gamma)


@register_loss('regression', 'smooth_l1')
def _smooth_l1(reduction, **_):
    return SmoothL1(reduction)


@register_loss('regression', 'mse')
def _mse(reduction, **_):
    return MSE(reduction)


# which options each loss reads (the others must be left at their neutral value)
_USES = {'ce': {'smoothing', 'class_weights'}, 'bce': {'pos_weight'}, 'focal': set(),
         'hybrid': {'pos_weight'}, 'smooth_l1': set(), 'mse': set()}


def _weights_array(values, what: str) -> np.ndarray | None:
    if values is None:
        return None
    if isinstance(values, paddle.Tensor):
        values = values.numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0 or not np.isfinite(arr).all() or (arr < 0).any():
        raise UserError(f"build_loss: {what} must be finite non-negative numbers, got {_fmt(arr)}; "
                        f"fix the values or leave {what} unset")
    return arr.astype(np.float32)


def build_loss(task: str, name: str = 'auto', *, reduction: str = 'mean', smoothing: float = 0.0,
               class_weights: Sequence[float] | np.ndarray | None = None,
               pos_weight: Sequence[float] | np.ndarray | None = None,
               focal_alpha: float | None = None, focal_gamma: float | None = None) -> Loss:
    """The loss ``name`` of ``task`` as a callable ``(logits, target) -> Tensor``.

    Args:
        task: 'single_label', 'multi_label' or 'regression'.
        name: a loss of that task (see ``loss_names(task)``) or 'auto' (ce / bce / smooth_l1).
        reduction: 'mean' (weighted mean for ce with class_weights), 'sum', or 'none' (one value per
            sample, ``[B]``; the mean over labels for multi-label).
        smoothing: label smoothing in [0, 1) (ce only).
        class_weights: K non-negative per-class weights (ce only).
        pos_weight: L non-negative per-label weights of the positive term (bce, hybrid).
        focal_alpha: focal alpha in [0, 1], or -1 for no alpha weighting (torchvision); None -> 0.25 for
            'focal', 0.3 for 'hybrid'. Ignored by the other losses.
        focal_gamma: focal gamma >= 0; None -> 2.0 for 'focal', 2.5 for 'hybrid'. Ignored by the others.

    Raises:
        UserError: unknown task or loss name for the task, invalid option values, or an option the
            chosen loss does not use (e.g. pos_weight with 'ce').
    """
    if task not in LOSSES:
        near = close_matches(task, TASK_NAMES)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise UserError(f"build_loss: task {task!r} has no losses ({', '.join(TASK_NAMES)} expected); {hint}"
                        f"check the dataset's task")
    if name == 'auto':
        name = AUTO_LOSS[task]
    if name not in LOSSES[task]:
        near = close_matches(name, LOSSES[task])
        hint = f"did you mean {', '.join(repr(n) for n in near)}? " if near else ""
        other = [t for t in TASK_NAMES if name in LOSSES[t]]
        where = f" ({name!r} is a {other[0]} loss)" if other else ""
        raise UserError(f"build_loss: loss {name!r} is not available for task {task!r}{where} (valid for "
                        f"{task}: {', '.join(loss_names(task))}); {hint}pass one of those as --loss")
    if reduction not in REDUCTIONS:
        raise UserError(f"build_loss: reduction {reduction!r} is not supported ({', '.join(REDUCTIONS)} "
                        f"expected)")
    smoothing = float(smoothing or 0.0)
    if not 0.0 <= smoothing < 1.0:
        raise UserError(f"build_loss: smoothing {smoothing} is out of range ([0, 1) expected); pass e.g. "
                        f"--smoothing 0.1")
    class_weights = _weights_array(class_weights, 'class_weights')
    pos_weight = _weights_array(pos_weight, 'pos_weight')
    given = {'smoothing': smoothing > 0, 'class_weights': class_weights is not None,
             'pos_weight': pos_weight is not None}
    unused = [k for k, v in given.items() if v and k not in _USES[name]]
    if unused:
        users = {k: [n for n, u in _USES.items() if k in u] for k in unused}
        detail = '; '.join(f"{k} applies to {', '.join(repr(n) for n in v)}" for k, v in users.items())
        raise UserError(f"build_loss: {', '.join(unused)} given but loss {task}/{name!r} does not use it "
                        f"({detail}); remove the option or choose a loss that uses it")
    alpha0, gamma0 = FOCAL_DEFAULTS.get(name, (0.25, 2.0))
    focal_alpha = alpha0 if focal_alpha is None else float(focal_alpha)
    focal_gamma = gamma0 if focal_gamma is None else float(focal_gamma)
    if not (0.0 <= focal_alpha <= 1.0 or focal_alpha == -1.0):
        raise UserError(f"build_loss: focal_alpha {focal_alpha} is out of range ([0, 1], or -1 for no alpha "
                        f"weighting, expected)")
    if not focal_gamma >= 0.0:
        raise UserError(f"build_loss: focal_gamma {focal_gamma} is out of range (>= 0 expected)")
    return LOSSES[task][name](reduction=reduction, smoothing=smoothing, class_weights=class_weights,
                              pos_weight=pos_weight, focal_alpha=focal_alpha, focal_gamma=focal_gamma)


def soft_cross_entropy(logits: paddle.Tensor, target: paddle.Tensor, smoothing: float = 0.0) -> paddle.Tensor:
    """Mean cross-entropy with label smoothing spread over all classes (timm's LabelSmoothingCrossEntropy);
    the same as ``build_loss('single_label', 'ce', smoothing=smoothing)``."""
    return CrossEntropy('mean', smoothing)(logits, target)


# ---------------------------------------------------------------------------------------------------
# Weights from training labels


def pos_weight_from_labels(Y, label_names: Sequence[str] | None = None) -> np.ndarray:
    """Per-label ``pos_weight = negatives / positives`` from a 0/1 label matrix ``Y [N, L]`` (float32 [L]).

    A label with no positive sample gets 1.0: its positive term never occurs in this data, so any finite
    value trains the same, and 1.0 is neutral if it is reused elsewhere. A label with no negative sample
    also gets 1.0 (``0 / positives`` would switch its positive term off). Either case emits one
    ``LossWarning`` naming the labels.
    """
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim != 2:
        raise ValueError(f"pos_weight_from_labels: labels must have shape [N, L], got {Y.shape}")
    pos = Y.sum(axis=0)
    neg = Y.shape[0] - pos
    bad = (pos == 0) | (neg == 0)
    w = np.ones(Y.shape[1], dtype=np.float64)
    np.divide(neg, pos, out=w, where=~bad)
    if bad.any():
        names = ', '.join(_label(i, label_names) for i in np.flatnonzero(bad))
        warnings.warn(f"pos_weight_from_labels: label(s) {names} have no positive or no negative training "
                      f"sample; their pos_weight is set to 1.0", LossWarning, stacklevel=2)
    return w.astype(np.float32)


def class_weights_from_labels(y, num_classes: int, class_names: Sequence[str] | None = None) -> np.ndarray:
    """Per-class weights ``N / (K * count_k)`` (scikit-learn's 'balanced') from labels ``y [N]`` (float32 [K]).

    A class with no sample gets weight 0 (it has no loss term to weight; with label smoothing it then
    receives no smoothing mass either) and one ``LossWarning`` names the classes.
    """
    y = np.asarray(y).reshape(-1)
    if y.size and (not np.all(np.mod(y, 1) == 0) or y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"class_weights_from_labels: labels must be integers in [0, {num_classes})")
    counts = np.bincount(y.astype(np.int64), minlength=num_classes).astype(np.float64)
    w = np.zeros(num_classes, dtype=np.float64)
    np.divide(y.size, num_classes * counts, out=w, where=counts > 0)
    if (counts == 0).any():
        names = ', '.join(_label(i, class_names) for i in np.flatnonzero(counts == 0))
        warnings.warn(f"class_weights_from_labels: class(es) {names} have no training sample; their weight is 0",
                      LossWarning, stacklevel=2)
    return w.astype(np.float32)


def _label(i: int, names: Sequence[str] | None) -> str:
    return f"{i} ({names[i]!r})" if names is not None and i < len(names) else str(i)


def build_criterion(task, loss: str, *, train_set=None, num_classes: int | None = None, smoothing: float = 0.0,
                    class_weights: bool = False, pos_weight: bool = False, focal_alpha: float | None = None,
                    focal_gamma: float | None = None, reduction: str = 'mean', say=print) -> Callable:
    """The training loss of ``task`` (an ``engine_finetune.TaskSpec``) from ``--loss`` and its options; class
    weights / pos_weight come from the training labels. A weighting option that does not apply to the task
    (``task.loss_options``) is an error. ``reduction='none'`` gives the evaluation loss: the unweighted,
    unsmoothed form of the same loss."""
    options = dict(focal_alpha=focal_alpha, focal_gamma=focal_gamma)
    if reduction == 'none':
        return build_loss(task.name, loss, reduction='none', **options)
    if class_weights:
        if 'class_weights' not in task.loss_options:
            raise UserError(f"--class_weights: applies to single-label cross-entropy, not to {task.name} data; "
                            "use --pos_weight for multi-label data or --balanced_sampler")
        options['class_weights'] = class_weights_from_labels(train_set.targets, num_classes)
        say('class weights: ' + ', '.join(f'{c} {w:.3f}' for c, w in zip(train_set.class_names,
                                                                            options['class_weights'])))
    if pos_weight:
        if 'pos_weight' not in task.loss_options:
            raise UserError(f"--pos_weight: applies to multi-label BCE, not to {task.name} data; remove it "
                            "(--class_weights weights single-label cross-entropy)")
        options['pos_weight'] = pos_weight_from_labels(train_set.targets)
        say('BCE pos_weight: ' + ', '.join(f'{c} {w:.3f}' for c, w in zip(train_set.class_names,
                                                                             options['pos_weight'])))
    return build_loss(task.name, loss, smoothing=smoothing if 'smoothing' in task.loss_options else 0.0, **options)
