"""Layer-wise learning-rate decay parameter groups and the AdamW optimizer of the fine-tuning recipe.

Parameters are grouped by (layer id, decay / no decay). Layer ids and the weight-decay exemption list come
from the model itself (``model.layer_id(name)``, ``model.num_layers``, ``model.no_weight_decay()``), so this
module never branches on a model name. A parameter in layer ``i`` gets the LR scale
``layer_decay ** (num_layers - i)``; 1-D parameters (biases, norms) and the model's named exemptions
(ViT: ``pos_embed``, ``cls_token``) get no weight decay.

Paddle specifics, checked against paddle 3.3.1 (``paddle/optimizer/adamw.py``, ``optimizer.py``) and by
``tests/test_lr.py`` measuring real updates:

* ``AdamW(parameters=[{'params', 'weight_decay', 'learning_rate'}, ...])``: a group's ``weight_decay`` float
  is the decoupled decay coefficient used for that group; its ``learning_rate`` is copied once into every
  parameter's ``optimize_attr['learning_rate']`` and multiplies the optimizer's current LR at every step. So
  the per-iteration LR must be changed with ``optimizer.set_lr`` (util/lr_sched.py); editing the group
  dicts after construction does nothing (the fault of an earlier port).
* Paddle's AdamW update equals torch.optim.AdamW: ``p <- p * (1 - lr_g * wd)`` with the group LR
  ``lr_g = lr * scale`` (not bias-corrected), then ``p <- p - lr_g * m_hat / (sqrt(v_hat) + eps)``. Paddle
  writes it as ``lr_t = lr_g * sqrt(1 - b2^t) / (1 - b1^t)`` and ``eps * sqrt(1 - b2^t)``, which is the same
  number. Measured to float32 precision in tests/test_lr.py.
* Because the scale lives on the parameter, building a second optimizer over the same parameters overwrites
  the first one's scales.

References: facebookresearch/mae util/lr_decay.py (param_groups_lrd), BEiT; RETFound_MAE main_finetune.py.
"""
from __future__ import annotations

import paddle


def _check_model_contract(model) -> None:
    missing = [a for a in ('layer_id', 'num_layers', 'no_weight_decay') if not hasattr(model, a)]
    if missing:
        raise TypeError(f"param_groups_lrd: {type(model).__name__} lacks {', '.join(missing)} "
                        f"(every registered model must describe its layers; see models/registry.py)")


def param_groups_lrd(model: paddle.nn.Layer, weight_decay: float = 0.05,
                     layer_decay: float = 0.75) -> list[dict]:
    """Paddle parameter groups with layer-wise LR decay.

    Returns a list of dicts, in order of first appearance, each with ``name``
    (``layer_<id>_<decay|no_decay>``), ``params`` (trainable parameters; ``stop_gradient`` ones are left
    out), ``weight_decay`` (``weight_decay`` or 0.0), ``learning_rate`` (the LR scale) and ``param_names``
    (for logs and tests). Pass it as ``paddle.optimizer.AdamW(parameters=groups)``.
    """
    _check_model_contract(model)
    num_layers = int(model.num_layers)
    no_decay_names = set(model.no_weight_decay())
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if param.stop_gradient:
            continue
        layer = int(model.layer_id(name))
        if not 0 <= layer <= num_layers:
            raise ValueError(f"param_groups_lrd: {type(model).__name__}.layer_id({name!r}) = {layer}, "
                             f"outside [0, num_layers={num_layers}]")
        if param.ndim == 1 or name in no_decay_names:
            kind, wd = 'no_decay', 0.0
        else:
            kind, wd = 'decay', float(weight_decay)
        key = f"layer_{layer}_{kind}"
        if key not in groups:
            groups[key] = {'name': key, 'params': [], 'param_names': [], 'weight_decay': wd,
                           'learning_rate': float(layer_decay) ** (num_layers - layer), 'layer_id': layer}
        groups[key]['params'].append(param)
        groups[key]['param_names'].append(name)
    return list(groups.values())


def build_optimizer(model: paddle.nn.Layer, lr: float, weight_decay: float = 0.05, layer_decay: float = 0.75,
                    betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> paddle.optimizer.AdamW:
    """AdamW over ``param_groups_lrd(model, weight_decay, layer_decay)`` starting at ``lr``.

    No ``grad_clip`` is given to Paddle: with parameter groups, Paddle clips each group by its own norm,
    whereas the reference clips the global norm over all parameters; the engine does that itself
    (``paddle.nn.utils.clip_grad_norm_`` in ``engine_finetune.train_one_epoch``). The LR is meant to be set
    every iteration with ``util.lr_sched.adjust_learning_rate``.
    """
    groups = param_groups_lrd(model, weight_decay=weight_decay, layer_decay=layer_decay)
    if not groups:
        raise ValueError(f"build_optimizer: {type(model).__name__} has no trainable parameters")
    return paddle.optimizer.AdamW(learning_rate=float(lr), parameters=groups, beta1=betas[0], beta2=betas[1],
                                  epsilon=eps, weight_decay=float(weight_decay))


def group_learning_rates(optimizer: paddle.optimizer.Optimizer) -> list[tuple[str, float]]:
    """(group name, LR the group receives now) for every parameter group, read from what Paddle uses:
    the optimizer's current LR times each parameter's ``optimize_attr['learning_rate']``."""
    lr = float(optimizer.get_lr())
    out = []
    for i, group in enumerate(getattr(optimizer, '_param_groups', [])):
        if not isinstance(group, dict) or not group['params']:
            continue
        scale = float(group['params'][0].optimize_attr.get('learning_rate', 1.0))
        out.append((group.get('name', f'group_{i}'), lr * scale))
    return out
