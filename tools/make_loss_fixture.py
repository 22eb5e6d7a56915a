"""Write tests/fixtures/loss_reference.npz: loss values and gradients computed by PyTorch (dev-only).

Every output comes from PyTorch / torchvision code, in float64 (the exact values the float32 Paddle losses
are compared to):

* ``ce_*``: ``torch.nn.functional.cross_entropy(logits, target, weight=w, label_smoothing=s,
  reduction=r)`` for w in {None, ``ce_weight``}, s in {0, 0.1}, r in {mean, none, sum}; gradients of the
  mean with respect to the logits.
* ``bce_*``: ``binary_cross_entropy_with_logits(..., pos_weight=pw)`` on hard and soft targets,
  reduction none (per element; the toolkit's 'none' is its mean over labels) and mean.
* ``focal_*``: ``torchvision.ops.sigmoid_focal_loss`` for (alpha, gamma) in ``focal_params``, reduction
  none and mean. ``hybrid_*``: ``0.5 * bce(pos_weight) + 0.5 * sigmoid_focal_loss(alpha 0.3, gamma 2.5)``.
* ``smooth_l1_*`` (beta 1) and ``mse_*``: reduction none and mean.

The logits include values up to +-50 so the numerically stable formulations are checked where naive
ones overflow. Inputs are stored alongside the outputs.

Regenerate with the PyTorch environment (torch + torchvision), not the Paddle one:

    TORCH_PYTHON tools/make_loss_fixture.py     # from the repository root

TORCH_PYTHON: the Python interpreter of that environment.

References: PyTorch ``torch.nn.functional`` losses; torchvision ``ops/focal_loss.py``.
"""
from __future__ import annotations

import os
import sys
import types

# torchvision's compiled ops do not load in this environment; sigmoid_focal_loss is pure Python.
sys.modules['torchvision._meta_registrations'] = types.ModuleType('torchvision._meta_registrations')

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torchvision.ops import sigmoid_focal_loss  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', 'fixtures',
                   'loss_reference.npz')
FOCAL_PARAMS = [(0.25, 2.0), (0.3, 2.5), (-1.0, 2.0), (0.25, 0.0), (0.5, 0.5)]


def _t(a):
    return torch.tensor(a, dtype=torch.float64)


def _grad(fn, logits):
    x = _t(logits).requires_grad_(True)
    fn(x).backward()
    return x.grad.numpy()


def main() -> None:
    rng = np.random.default_rng(20240611)
    out: dict[str, np.ndarray] = {}

    # --- single-label cross-entropy -----------------------------------------------------------------
    B, K = 12, 5
    ce_logits = (rng.normal(size=(B, K)) * 3).astype(np.float32)
    ce_logits[0] = [50, -50, 0, 10, -10]                     # extreme rows: stability
    ce_logits[1] = [-50, 50, -50, 50, 0]
    ce_target = rng.integers(0, K, B).astype(np.int64)
    ce_target[:2] = [1, 0]                                   # the confident row is wrong, the other right-ish
    ce_weight = np.array([0.5, 2.0, 1.0, 3.0, 0.25], dtype=np.float32)
    out.update(ce_logits=ce_logits, ce_target=ce_target, ce_weight=ce_weight)
    tgt = torch.tensor(ce_target)
    for wname, w in (('noweight', None), ('weight', _t(ce_weight))):
        for s in (0.0, 0.1):
            tag = f"ce_{wname}_s{int(s * 10)}"
            for red in ('mean', 'none', 'sum'):
                out[f"{tag}_{red}"] = F.cross_entropy(_t(ce_logits), tgt, weight=w, label_smoothing=s,
                                                      reduction=red).numpy()
            out[f"{tag}_grad"] = _grad(lambda x: F.cross_entropy(x, tgt, weight=w, label_smoothing=s), ce_logits)

    # --- multi-label ---------------------------------------------------------------------------------
    B, L = 10, 4
    ml_logits = (rng.normal(size=(B, L)) * 3).astype(np.float32)
    ml_logits[0] = [50, -50, 30, -30]
    ml_logits[1] = [-50, 50, -30, 30]
    ml_target = (rng.random((B, L)) < 0.4).astype(np.float32)
    ml_target[0] = [1, 1, 0, 0]                              # right / wrong at +-50 and +-30
    ml_target[1] = [1, 1, 0, 0]
    ml_soft = rng.random((B, L)).astype(np.float32)
    pos_weight = np.array([3.0, 0.5, 1.0, 7.5], dtype=np.float32)
    out.update(ml_logits=ml_logits, ml_target=ml_target, ml_soft=ml_soft, pos_weight=pos_weight)
    x = _t(ml_logits)
    for tname, target in (('hard', ml_target), ('soft', ml_soft)):
        t = _t(target)
        for pname, pw in (('nopw', None), ('pw', _t(pos_weight))):
            tag = f"bce_{tname}_{pname}"
            out[f"{tag}_none"] = F.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction='none').numpy()
            out[f"{tag}_mean"] = F.binary_cross_entropy_with_logits(x, t, pos_weight=pw).numpy()
            out[f"{tag}_grad"] = _grad(lambda z: F.binary_cross_entropy_with_logits(z, t, pos_weight=pw),
                                       ml_logits)
        for i, (a, g) in enumerate(FOCAL_PARAMS):
            tag = f"focal_{tname}_{i}"
            out[f"{tag}_none"] = sigmoid_focal_loss(x, t, alpha=a, gamma=g, reduction='none').numpy()
            out[f"{tag}_mean"] = sigmoid_focal_loss(x, t, alpha=a, gamma=g, reduction='mean').numpy()
            if g == 0 or g >= 1:  # torchvision's (1 - p_t) ** g has an infinite slope at 0 for 0 < g < 1
                out[f"{tag}_grad"] = _grad(lambda z: sigmoid_focal_loss(z, t, alpha=a, gamma=g, reduction='mean'),
                                           ml_logits)

        def hybrid(z, t=t):
            bce = F.binary_cross_entropy_with_logits(z, t, pos_weight=_t(pos_weight), reduction='none')
            return 0.5 * bce + 0.5 * sigmoid_focal_loss(z, t, alpha=0.3, gamma=2.5, reduction='none')
        out[f"hybrid_{tname}_none"] = hybrid(x).detach().numpy()
        out[f"hybrid_{tname}_mean"] = hybrid(x).mean().detach().numpy()
        out[f"hybrid_{tname}_grad"] = _grad(lambda z: hybrid(z).mean(), ml_logits)
    out['focal_params'] = np.array(FOCAL_PARAMS, dtype=np.float64)

    # --- regression ----------------------------------------------------------------------------------
    B = 11
    reg_logits = (rng.normal(size=(B, 1)) * 2 + 2).astype(np.float32)
    reg_logits[0, 0], reg_logits[1, 0] = 50.0, -50.0
    reg_target = rng.integers(0, 5, B).astype(np.float32)
    reg_target[2] = reg_logits[2, 0] + 0.999                 # just inside / outside beta = 1
    reg_target[3] = reg_logits[3, 0] - 1.001
    out.update(reg_logits=reg_logits, reg_target=reg_target)
    xr, tr = _t(reg_logits).reshape(-1), _t(reg_target)
    for name, fn in (('smooth_l1', lambda a, b, **kw: F.smooth_l1_loss(a, b, beta=1.0, **kw)),
                     ('mse', F.mse_loss)):
        out[f"{name}_none"] = fn(xr, tr, reduction='none').numpy()
        out[f"{name}_mean"] = fn(xr, tr, reduction='mean').numpy()
        out[f"{name}_grad"] = _grad(lambda z: fn(z.reshape(-1), tr), reg_logits)

    out['versions'] = np.array(f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT}: {len(out)} arrays ({os.path.getsize(OUT)} bytes)")


if __name__ == '__main__':
    main()
