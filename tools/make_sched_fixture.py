"""Regenerate tests/fixtures/sched_reference.json with PyTorch itself (dev only; the tests never import torch).

    TORCH_PYTHON tools/make_sched_fixture.py     # from the repository root

TORCH_PYTHON: the Python interpreter of an environment with PyTorch; the toolkit's own environment does not
need it.

Two reference sets, both produced by torch, never by the toolkit:

* ``schedules``: ``torch.optim.lr_scheduler.StepLR`` and ``ReduceLROnPlateau`` driven once per epoch (SGD over
  one dummy parameter). For every epoch: the LR used during that epoch (``param_groups[0]['lr']`` before
  ``step``) and, for the plateau cases, the scheduler's ``best``, ``num_bad_epochs`` and ``cooldown_counter``
  after ``step(metric)``. The metric sequences include improvements smaller than the relative threshold,
  plateaus, NaN (torch counts it as a bad epoch), cooldown, mode ``min``, hitting ``min_lr`` and the
  ``eps = 1e-8`` rule (a reduction smaller than eps is skipped). NaN metrics are stored as ``null``, an
  infinite ``best`` as the string ``'-inf'`` / ``'inf'`` (the file is strict JSON).
* ``optimizers``: two or three steps of ``torch.optim.AdamW``, ``Adam`` (weight decay as L2) and ``SGD``
  (momentum 0.9, dampening 0, no Nesterov, weight decay as L2) in float64 over the parameters of the tiny
  ViT-shaped model of tests/unit/test_lr.py (names and shapes below), one torch parameter group per parameter
  with ``lr = base_lr * scale``. The scale is the reference rule written out here:
  ``layer_decay ** (num_layers - layer)``, times ``backbone_lr_scale`` for ``layer < num_layers``; 1-D
  parameters and ``cls_token``/``pos_embed`` get weight decay 0. Gradients are given (``p.grad = G_t``),
  the base LR changes every step. Stores the initial values, the gradients and every parameter after every
  step, flattened in C order.
"""
from __future__ import annotations

import json
import math
import os
import platform

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', 'fixtures',
                   'sched_reference.json')

NAN = float('nan')


def _f(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _dummy_optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def step_case(name: str, lr: float, step_size: int, gamma: float, epochs: int) -> dict:
    opt = _dummy_optimizer(lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    return {'name': name, 'kind': 'step', 'lr': lr, 'step_size': step_size, 'gamma': gamma, 'epochs': epochs,
            'lrs': lrs}


def plateau_case(name: str, lr: float, metrics: list[float], *, mode: str = 'max', factor: float = 0.1,
                 patience: int = 10, threshold: float = 1e-4, cooldown: int = 0, min_lr: float = 0.0) -> dict:
    opt = _dummy_optimizer(lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=factor, patience=patience,
                                                       threshold=threshold, threshold_mode='rel',
                                                       cooldown=cooldown, min_lr=min_lr, eps=1e-8)
    lrs, best, bad, cool = [], [], [], []
    for m in metrics:
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step(m)
        best.append(float(sched.best))
        bad.append(int(sched.num_bad_epochs))
        cool.append(int(sched.cooldown_counter))
    return {'name': name, 'kind': 'plateau', 'lr': lr, 'mode': mode, 'factor': factor, 'patience': patience,
            'threshold': threshold, 'cooldown': cooldown, 'min_lr': min_lr,
            'metrics': [_f(m) for m in metrics], 'lrs': lrs,
            'best': [b if math.isfinite(b) else repr(b) for b in best],  # '-inf' / 'inf' as strings
            'num_bad_epochs': bad, 'cooldown_counter': cool}


def schedules() -> list[dict]:
    rng = np.random.default_rng(7)
    walk = list(np.round(0.5 + np.cumsum(rng.normal(0.006, 0.015, size=60)), 4))
    return [
        # DR grading seed: AdamW 1e-3, x0.1 every 10 epochs, 30 epochs
        step_case('dr_seed', 1e-3, 10, 0.1, 30),
        step_case('step3_half', 0.01, 3, 0.5, 20),
        step_case('step1_gamma07', 0.3, 1, 0.7, 12),
        # max mode, patience 2: improvements below the relative threshold (0.80005, 0.80007 < 0.8 * 1.0001),
        # one above it but below best + threshold (0.80009: rel, not abs), NaN, min_lr hit
        plateau_case('max_threshold_nan_minlr', 1e-3,
                     [0.5, 0.6, 0.8, 0.80005, 0.80007, 0.80009, 0.8, 0.8, 0.8, 0.81, NAN, NAN, 0.81, 0.9, 0.9,
                      0.85, 0.9,
                      0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9],
                     patience=2, factor=0.1, threshold=1e-4, min_lr=2e-6),
        # min mode with cooldown: bad epochs during cooldown are ignored; 0.8905 < 0.9 * 0.99 improves (rel)
        plateau_case('min_cooldown', 0.01,
                     [1.0, 0.9, 0.8905, 0.95, 0.97, 0.96, 0.99, 1.0, 0.85, 0.86, 0.87, 0.88, 0.89, 0.9, 0.91, 0.5,
                      NAN, 0.6, 0.7, 0.8, 0.9, 1.0],
                     mode='min', patience=1, factor=0.5, threshold=0.01, cooldown=2, min_lr=1e-4),
        # eps rule: 1e-7 halves while the step is > 1e-8, then stays
        plateau_case('eps_rule', 1e-7, [0.5] * 12, patience=0, factor=0.5, threshold=0.0),
        # the seed's defaults (patience 10, factor 0.1, threshold 1e-4) on a noisy, rising then flat score
        plateau_case('defaults_random_walk', 1e-4, [float(x) for x in walk] + [float(walk[-1])] * 25,
                     min_lr=1e-7),
        # leading NaN: best stays -inf until a number comes
        plateau_case('leading_nan_patience0', 0.1, [NAN, NAN, 0.3, 0.2, 0.3, 0.31, NAN, 0.31], patience=0,
                     factor=0.3),
    ]


# The tiny ViT of tests/unit/test_lr.py: (name, shape, layer id, weight decay?) with DIM 4, DEPTH 2, 3 classes.
NUM_LAYERS = 3
PARAMS = [
    ('cls_token', [1, 1, 4], 0, False), ('pos_embed', [1, 3, 4], 0, False),
    ('patch_embed.proj.weight', [4, 3, 2, 2], 0, True), ('patch_embed.proj.bias', [4], 0, False),
    ('blocks.0.norm1.weight', [4], 1, False), ('blocks.0.norm1.bias', [4], 1, False),
    ('blocks.0.fc.weight', [4, 4], 1, True), ('blocks.0.fc.bias', [4], 1, False),
    ('blocks.1.norm1.weight', [4], 2, False), ('blocks.1.norm1.bias', [4], 2, False),
    ('blocks.1.fc.weight', [4, 4], 2, True), ('blocks.1.fc.bias', [4], 2, False),
    ('fc_norm.weight', [4], 3, False), ('fc_norm.bias', [4], 3, False),
    ('head.weight', [4, 3], 3, True), ('head.bias', [3], 3, False),
]


def optimizers() -> dict:
    cfg = {'layer_decay': 0.75, 'backbone_lr_scale': 0.1, 'weight_decay': 0.05, 'num_layers': NUM_LAYERS,
           'base_lrs': [1e-2, 8e-3, 5e-3], 'betas': [0.9, 0.999], 'eps': 1e-8, 'momentum': 0.9}
    rng = np.random.default_rng(3)
    params = {}
    for name, shape, layer, decay in PARAMS:
        n = int(np.prod(shape))
        scale = cfg['layer_decay'] ** (NUM_LAYERS - layer) * (cfg['backbone_lr_scale'] if layer < NUM_LAYERS
                                                             else 1.0)
        params[name] = {'shape': shape, 'layer': layer, 'decay': decay, 'scale': scale,
                        'init': [float(x) for x in np.round(rng.normal(size=n), 6)],
                        'grads': [[float(x) for x in np.round(rng.normal(size=n), 6)] for _ in cfg['base_lrs']]}
    results = {}
    for opt_name in ('adamw', 'adam', 'sgd'):
        tensors = {name: torch.nn.Parameter(torch.tensor(p['init'], dtype=torch.float64).reshape(p['shape']))
                   for name, p in params.items()}
        groups = [{'params': [tensors[name]], 'lr': cfg['base_lrs'][0] * p['scale'],
                   'weight_decay': cfg['weight_decay'] if p['decay'] else 0.0} for name, p in params.items()]
        if opt_name == 'adamw':
            opt = torch.optim.AdamW(groups, betas=tuple(cfg['betas']), eps=cfg['eps'])
        elif opt_name == 'adam':
            opt = torch.optim.Adam(groups, betas=tuple(cfg['betas']), eps=cfg['eps'])
        else:
            opt = torch.optim.SGD(groups, momentum=cfg['momentum'], dampening=0.0, nesterov=False)
        steps = {name: [] for name in params}
        for t, base_lr in enumerate(cfg['base_lrs']):
            for group, (name, p) in zip(opt.param_groups, params.items()):
                group['lr'] = base_lr * p['scale']
                tensors[name].grad = torch.tensor(p['grads'][t], dtype=torch.float64).reshape(p['shape'])
            opt.step()
            for name in params:
                steps[name].append([float(x) for x in tensors[name].detach().numpy().ravel()])
        results[opt_name] = steps
    return {'config': cfg, 'params': params, 'results': results}


def main() -> None:
    data = {
        'generated_by': 'tools/make_sched_fixture.py (TORCH_PYTHON tools/make_sched_fixture.py)',
        'torch': torch.__version__, 'numpy': np.__version__, 'python': platform.python_version(),
        'schedules': schedules(),
        'optimizers': optimizers(),
    }
    with open(OUT, 'w', encoding='utf8') as f:
        json.dump(data, f, allow_nan=False)
        f.write('\n')
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == '__main__':
    main()
