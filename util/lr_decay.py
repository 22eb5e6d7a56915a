"""Parameter groups with layer-wise LR decay and a backbone LR scale; the optimizers of the recipes.

Parameters are grouped by (layer id, decay / no decay). Layer ids and the weight-decay exemption list come
from the model itself (``model.layer_id(name)``, ``model.num_layers``, ``model.no_weight_decay()``), so this
module never branches on a model name. A parameter in layer ``i`` gets the LR scale
``layer_decay ** (num_layers - i)``, times ``backbone_lr_scale`` when ``i < num_layers`` (the backbone; the
head and fusion layers have ``i == num_layers``); 1-D parameters (biases, norms) and the model's named
exemptions (ViT: ``pos_embed``, ``cls_token``) get no weight decay. ``freeze_backbone`` stops the gradient of
every backbone parameter instead (the head and anything above the backbone train). Frozen parameters (this, and
``--adaptation lp|lora``, util/adaptation.py) are in no group, so they get neither updates nor weight decay; a LoRA
adapter (``blocks.3.attn.qkv.lora_a_q``) is in the group of the block it sits in.

Optimizers (``build_optimizer(opt=...)``), each with torch's update rule:

* ``adamw`` -- torch.optim.AdamW: decoupled decay ``p <- p * (1 - lr_g * wd)``, then the Adam step.
* ``adam``  -- torch.optim.Adam: ``weight_decay`` is L2, ``g <- g + wd * p`` before the moments.
* ``sgd``   -- torch.optim.SGD(momentum, dampening=0, nesterov=False): ``v <- mu * v + (g + wd * p)``,
  ``p <- p - lr_g * v`` (the first step's ``v`` is the gradient itself, as torch's).

Paddle specifics, checked against paddle 3.3.1 (``paddle/optimizer/{optimizer,adam,adamw,momentum}.py``) and
measured by ``tests/unit/test_lr.py`` against updates recorded from torch (tests/fixtures/sched_reference.json):

* A group's ``learning_rate`` is copied once into every parameter's ``optimize_attr['learning_rate']`` and
  multiplies the optimizer's current LR at every step. So the per-iteration LR must be changed with
  ``optimizer.set_lr`` (util/lr_sched.py); editing the group dicts after construction does nothing (training
  would silently run at a constant LR). Because the scale lives on the parameter, building a second optimizer
  over the same parameters overwrites the first one's scales.
* ``AdamW``: a group's ``weight_decay`` float is that group's decoupled decay coefficient. Paddle writes the
  step as ``lr_t = lr_g * sqrt(1 - b2^t) / (1 - b1^t)`` with ``eps * sqrt(1 - b2^t)``: torch's number.
* ``Adam``: the base optimizer turns a group's ``weight_decay`` *float* into ``param.regularizer =
  L2Decay(wd)`` (an int or anything else is taken as a regularizer object as it is), and the regularizer
  adds ``wd * p`` to the gradient before the Adam step: torch's L2 semantics. The regularizer stays on the
  parameter after the optimizer is gone, and ``AdamW`` never resets it, so an AdamW built later over the
  same parameters would silently add the stale L2 term too; ``build_optimizer`` therefore sets
  ``param.regularizer`` itself for every optimizer.
* ``Momentum``: per-group ``weight_decay`` floats work, but through a detour: the constructor rewrites each
  group dict (``weight_decay`` -> None plus ``regularization_method/_coeff``) and fuses the L2 term into the
  momentum kernel (so it is not added twice). The kernel takes ``mu`` and the L2 coefficient as float32
  attributes even for float64 parameters: 0.9 becomes 0.89999998, a 1e-8 relative difference from torch
  that only matters to a float64 test. The group dicts are copied before being handed to it.

References: facebookresearch/mae util/lr_decay.py (param_groups_lrd), BEiT; RETFound_MAE main_finetune.py;
torch.optim.{AdamW, Adam, SGD} update rules (documentation).
"""
from __future__ import annotations

import math
from typing import Callable

import paddle

from util.errors import UserError, unknown_name_error


def _check_model_contract(model, where: str) -> None:
    missing = [a for a in ('layer_id', 'num_layers', 'no_weight_decay') if not hasattr(model, a)]
    if missing:
        raise TypeError(f"{where}: {type(model).__name__} lacks {', '.join(missing)} "
                        f"(every registered model must describe its layers; see models/registry.py)")


def _layer_of(model, name: str, num_layers: int, where: str) -> int:
    layer = int(model.layer_id(name))
    if not 0 <= layer <= num_layers:
        raise ValueError(f"{where}: {type(model).__name__}.layer_id({name!r}) = {layer}, "
                         f"outside [0, num_layers={num_layers}]")
    return layer


def param_groups_lrd(model: paddle.nn.Layer, weight_decay: float = 0.05, layer_decay: float = 0.75,
                     backbone_lr_scale: float = 1.0) -> list[dict]:
    """Paddle parameter groups with layer-wise LR decay and a backbone LR scale.

    Returns a list of dicts, in order of first appearance, each with ``name``
    (``layer_<id>_<decay|no_decay>``), ``params`` (trainable parameters; ``stop_gradient`` ones are left
    out), ``weight_decay`` (``weight_decay`` or 0.0), ``learning_rate`` (the LR scale
    ``layer_decay ** (num_layers - id)``, times ``backbone_lr_scale`` for ``id < num_layers``),
    ``layer_id`` and ``param_names`` (for logs and tests). Pass it to ``build_optimizer`` (or as
    ``paddle.optimizer.AdamW(parameters=groups)``).
    """
    _check_model_contract(model, 'param_groups_lrd')
    backbone_lr_scale = float(backbone_lr_scale)
    if not (math.isfinite(backbone_lr_scale) and backbone_lr_scale >= 0):
        raise UserError(f"param_groups_lrd: backbone_lr_scale {backbone_lr_scale} (expected a finite number "
                        ">= 0, 1 = the same LR as the head); pass e.g. --backbone_lr_scale 0.1")
    num_layers = int(model.num_layers)
    no_decay_names = set(model.no_weight_decay())
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if param.stop_gradient:
            continue
        layer = _layer_of(model, name, num_layers, 'param_groups_lrd')
        if param.ndim == 1 or name in no_decay_names:
            kind, wd = 'no_decay', 0.0
        else:
            kind, wd = 'decay', float(weight_decay)
        key = f"layer_{layer}_{kind}"
        if key not in groups:
            scale = float(layer_decay) ** (num_layers - layer)
            if layer < num_layers:
                scale *= backbone_lr_scale
            groups[key] = {'name': key, 'params': [], 'param_names': [], 'weight_decay': wd,
                           'learning_rate': scale, 'layer_id': layer}
        groups[key]['params'].append(param)
        groups[key]['param_names'].append(name)
    return list(groups.values())


def freeze_backbone(model: paddle.nn.Layer) -> int:
    """Stop the gradient of every backbone parameter (``layer_id(name) < num_layers``); return how many
    parameter tensors of the backbone are frozen now.

    Only the head (and the fusion layers of a dual-eye model) then trains; ``param_groups_lrd`` leaves the
    frozen parameters out of the optimizer. Normalisation statistics (BatchNorm running mean/var) are
    buffers, not parameters: they still follow the data in train mode, as with ``requires_grad=False`` in
    torch.
    """
    _check_model_contract(model, 'freeze_backbone')
    num_layers = int(model.num_layers)
    backbone, head = [], []
    for name, param in model.named_parameters():
        layer = _layer_of(model, name, num_layers, 'freeze_backbone')
        (backbone if layer < num_layers else head).append(param)
    if not head:
        raise UserError(f"freeze_backbone: {type(model).__name__} has no head parameters "
                        f"(layer_id == num_layers = {num_layers}), so nothing would train; "
                        "drop --freeze_backbone")
    for param in backbone:
        param.stop_gradient = True
    return len(backbone)


def _adamw(groups, lr, weight_decay, betas, eps, momentum):
    for g in groups:
        for p in g['params']:
            p.regularizer = None  # a stale L2Decay left by an earlier Adam/Momentum would be added to the grad
    return paddle.optimizer.AdamW(learning_rate=lr, parameters=groups, beta1=betas[0], beta2=betas[1],
                                  epsilon=eps, weight_decay=float(weight_decay))


def _adam(groups, lr, weight_decay, betas, eps, momentum):
    # A float becomes param.regularizer = L2Decay(wd) (g += wd * p); None clears a stale one.
    groups = [{**g, 'weight_decay': float(g['weight_decay']) if g['weight_decay'] > 0 else None}
              for g in groups]
    return paddle.optimizer.Adam(learning_rate=lr, parameters=groups, beta1=betas[0], beta2=betas[1],
                                 epsilon=eps, weight_decay=None)


def _sgd(groups, lr, weight_decay, betas, eps, momentum):
    # Momentum rewrites the dicts it is given (weight_decay -> regularization_method/_coeff): hand it copies.
    groups = [{**g, 'weight_decay': float(g['weight_decay'])} for g in groups]
    return paddle.optimizer.Momentum(learning_rate=lr, momentum=float(momentum), parameters=groups,
                                     use_nesterov=False, weight_decay=None)


# name -> factory(groups, lr, weight_decay, betas, eps, momentum)
OPTIMIZERS: dict[str, Callable[..., paddle.optimizer.Optimizer]] = {
    'adamw': _adamw,
    'adam': _adam,
    'sgd': _sgd,
}


def build_optimizer(model: paddle.nn.Layer, lr: float, weight_decay: float = 0.05, layer_decay: float = 0.75,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, opt: str = 'adamw',
                    momentum: float = 0.9, backbone_lr_scale: float = 1.0) -> paddle.optimizer.Optimizer:
    """The optimizer ``opt`` over ``param_groups_lrd(model, weight_decay, layer_decay, backbone_lr_scale)``,
    starting at ``lr``.

    ``opt``: ``'adamw'`` (decoupled weight decay), ``'adam'`` (weight decay as L2 on the gradient) or
    ``'sgd'`` (momentum ``momentum``, L2 weight decay); see the module docstring. ``betas``/``eps`` are used by
    the Adam family, ``momentum`` by SGD. No ``grad_clip`` is given to Paddle: with parameter groups, Paddle
    clips each group by its own norm, whereas the reference clips the global norm over all parameters; the
    engine does that itself (``paddle.nn.utils.clip_grad_norm_`` in ``engine_finetune.train_one_epoch``). The
    LR is meant to be set every iteration with ``optimizer.set_lr`` (util/lr_sched.py).
    """
    if opt not in OPTIMIZERS:
        raise unknown_name_error('optimizer', opt, OPTIMIZERS)
    groups = param_groups_lrd(model, weight_decay=weight_decay, layer_decay=layer_decay,
                              backbone_lr_scale=backbone_lr_scale)
    if not groups:
        raise ValueError(f"build_optimizer: {type(model).__name__} has no trainable parameters")
    return OPTIMIZERS[opt](groups, float(lr), weight_decay, betas, eps, momentum)
