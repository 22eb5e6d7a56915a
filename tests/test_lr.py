"""Layer-wise LR decay groups and the LR schedule, measured on what Paddle's AdamW really applies.

A tiny ViT-shaped layer (cls_token, pos_embed, patch_embed, blocks.i, fc_norm, head) implements the model
contract with the reference layer-id rule. With a constant gradient of 1 on every weight, Adam's
bias-corrected step is m_hat / (sqrt(v_hat) + eps) = 1 / (1 + 1e-8) at every step, so a parameter reset to
0 before a step moves by exactly the LR its group receives -- including its weight decay term, which is
0 at p = 0.
"""
import math

import numpy as np
import paddle
import pytest

from util.lr_decay import build_optimizer, group_learning_rates, param_groups_lrd
from util.lr_sched import adjust_learning_rate, effective_lr, lr_at

DIM, DEPTH = 4, 2


class _Block(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.norm1 = paddle.nn.LayerNorm(DIM)
        self.fc = paddle.nn.Linear(DIM, DIM)

    def forward(self, x):
        return x + self.fc(self.norm1(x))


class TinyViT(paddle.nn.Layer):
    """Parameter names as in timm's VisionTransformer; layer ids by the RETFound reference rule."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.cls_token = self.create_parameter([1, 1, DIM], default_initializer=paddle.nn.initializer.Constant(0.))
        self.pos_embed = self.create_parameter([1, 3, DIM], default_initializer=paddle.nn.initializer.Constant(0.))
        self.patch_embed = paddle.nn.Layer()
        self.patch_embed.proj = paddle.nn.Conv2D(3, DIM, 2, stride=2)
        self.blocks = paddle.nn.LayerList([_Block() for _ in range(DEPTH)])
        self.fc_norm = paddle.nn.LayerNorm(DIM)
        self.head = paddle.nn.Linear(DIM, num_classes)
        self.num_layers = DEPTH + 1

    def layer_id(self, name):
        if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed'):
            return 0
        if name.startswith('blocks.'):
            return int(name.split('.')[1]) + 1
        return self.num_layers

    def no_weight_decay(self):
        return {'pos_embed', 'cls_token'}

    def forward(self, x):  # [B, 3, 4, 4] -> 4 patches... kept simple: mean tokens
        t = self.patch_embed.proj(x).flatten(2).transpose([0, 2, 1])
        t = paddle.concat([self.cls_token.expand([x.shape[0], -1, -1]), t[:, :2]], axis=1) + self.pos_embed
        for blk in self.blocks:
            t = blk(t)
        return self.head(self.fc_norm(t[:, 1:].mean(1)))


# Expected (layer id, weight decay?) per parameter, written out from the reference rule.
EXPECTED = {
    'cls_token': (0, False), 'pos_embed': (0, False),
    'patch_embed.proj.weight': (0, True), 'patch_embed.proj.bias': (0, False),
    'blocks.0.norm1.weight': (1, False), 'blocks.0.norm1.bias': (1, False),
    'blocks.0.fc.weight': (1, True), 'blocks.0.fc.bias': (1, False),
    'blocks.1.norm1.weight': (2, False), 'blocks.1.norm1.bias': (2, False),
    'blocks.1.fc.weight': (2, True), 'blocks.1.fc.bias': (2, False),
    'fc_norm.weight': (3, False), 'fc_norm.bias': (3, False),
    'head.weight': (3, True), 'head.bias': (3, False),
}


def _name_to_group(groups):
    return {n: g for g in groups for n in g['param_names']}


def test_groups_follow_reference_rule():
    model = TinyViT()
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.65)
    by_name = _name_to_group(groups)
    assert set(by_name) == set(EXPECTED)
    for name, (layer, decay) in EXPECTED.items():
        g = by_name[name]
        assert g['name'] == f"layer_{layer}_{'decay' if decay else 'no_decay'}"
        assert g['weight_decay'] == (0.05 if decay else 0.0)
        assert g['learning_rate'] == pytest.approx(0.65 ** (3 - layer), rel=1e-15)
    assert len(groups) == 8
    params = [p for g in groups for p in g['params']]
    assert len(params) == len({id(p) for p in params}) == len(EXPECTED)


def test_frozen_params_are_left_out():
    model = TinyViT()
    model.patch_embed.proj.weight.stop_gradient = True
    names = set(_name_to_group(param_groups_lrd(model)))
    assert 'patch_embed.proj.weight' not in names and 'patch_embed.proj.bias' in names


def test_contract_errors():
    with pytest.raises(TypeError, match='layer_id'):
        param_groups_lrd(paddle.nn.Linear(2, 2))
    model = TinyViT()
    model.layer_id = lambda name: 7
    with pytest.raises(ValueError, match='outside'):
        param_groups_lrd(model)


def _set_all(model, value):
    for p in model.parameters():
        p.set_value(paddle.full_like(p, value))


def _step(model, opt, grad_scale):
    loss = sum((p * grad_scale).sum() for p in model.parameters())
    loss.backward()
    opt.step()
    opt.clear_grad()


@pytest.fixture
def default_dtype(request):
    old = paddle.get_default_dtype()
    paddle.set_default_dtype(request.param)
    yield request.param
    paddle.set_default_dtype(old)


# float64: exact check of the LR plumbing. float32 (what training uses): Paddle's float32 bias-correction
# arithmetic (1 - beta2^t against v accumulated in float32) alone is off by up to ~4e-6 relative.
@pytest.mark.parametrize('default_dtype,rtol', [('float64', 1e-9), ('float32', 2e-5)],
                         indirect=['default_dtype'])
def test_applied_group_lr_follows_schedule(default_dtype, rtol):
    """Every iteration: the update each parameter really receives == lr_at(e) * layer scale."""
    paddle.seed(0)
    model = TinyViT()
    assert model.head.weight.dtype == getattr(paddle, default_dtype)
    peak, min_lr, warmup, epochs, steps_per_epoch = 1e-3, 1e-5, 2, 6, 4
    opt = build_optimizer(model, lr=peak, weight_decay=0.05, layer_decay=0.75)
    scales = {n: 0.75 ** (3 - EXPECTED[n][0]) for n in EXPECTED}
    checked = set()
    for it in range(epochs * steps_per_epoch):
        e = it / steps_per_epoch
        lr = adjust_learning_rate(opt, e, peak, min_lr, warmup, epochs)
        assert lr == lr_at(e, peak, min_lr, warmup, epochs)
        assert opt.get_lr() == pytest.approx(lr, rel=1e-7)
        _set_all(model, 0.0)
        _step(model, opt, 1.0)
        for name, p in model.named_parameters():
            expected = -lr * scales[name] / (1 + 1e-8)
            np.testing.assert_allclose(p.numpy(), expected, rtol=rtol, atol=1e-15, err_msg=f'{name} it {it}')
        reported = dict(group_learning_rates(opt))
        for name in EXPECTED:
            g = f"layer_{EXPECTED[name][0]}_{'decay' if EXPECTED[name][1] else 'no_decay'}"
            assert reported[g] == pytest.approx(lr * scales[name], rel=1e-7)
        checked.add('warmup' if e < warmup else ('peak' if e == warmup else 'cosine'))
    assert checked == {'warmup', 'peak', 'cosine'}
    # the schedule really moved the applied LR: last cosine step is far below the peak
    assert lr < 0.2 * peak


def test_weight_decay_applied_only_where_due():
    """Zero gradient: Adam's step is 0, so only decoupled decay moves a weight: p *= 1 - lr*scale*wd."""
    model = TinyViT()
    lr, wd, ld = 0.1, 0.05, 0.5
    opt = build_optimizer(model, lr=lr, weight_decay=wd, layer_decay=ld)
    _set_all(model, 1.0)
    for step in range(1, 3):
        _step(model, opt, 0.0)
        for name, p in model.named_parameters():
            layer, decay = EXPECTED[name]
            factor = (1 - lr * ld ** (3 - layer) * wd) ** step if decay else 1.0
            np.testing.assert_allclose(p.numpy(), factor, rtol=1e-6, err_msg=name)
    assert model.pos_embed.numpy().min() == 1.0 and model.cls_token.numpy().min() == 1.0


def test_adamw_matches_torch_formula_on_varying_gradients():
    """Paddle AdamW == torch AdamW (decoupled decay with the un-bias-corrected group LR, eps on sqrt(v_hat)),
    written out in numpy, with a layer scale, weight decay and a changing LR."""
    model = TinyViT()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, layer_decay=0.5)
    p = model.head.weight
    scale = 1.0                                            # head is in the last layer
    rng = np.random.default_rng(0)
    x = rng.normal(size=p.shape).astype('float32')
    p.set_value(x)
    ref, m, v = x.astype(np.float64), 0.0, 0.0
    b1, b2, eps, wd = 0.9, 0.999, 1e-8, 0.1
    for t in range(1, 6):
        lr = 1e-2 * (0.5 + 0.1 * t)
        opt.set_lr(lr)
        g = rng.normal(size=p.shape).astype('float32')
        (p * paddle.to_tensor(g)).sum().backward()
        opt.step()
        opt.clear_grad()
        glr = lr * scale
        ref = ref * (1 - glr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g.astype(np.float64) ** 2
        ref = ref - glr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        np.testing.assert_allclose(p.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_build_optimizer_options():
    model = TinyViT()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    # no per-group clipping by Paddle: the engine clips the global norm (tests/test_engine.py)
    assert opt._grad_clip is None
    assert opt._beta1 == 0.9 and opt._beta2 == 0.999 and opt._epsilon == 1e-8
    # the extra keys in the group dicts do not break saving the optimizer state
    _step(model, opt, 1.0)
    state = opt.state_dict()
    opt2 = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    opt2.set_state_dict(state)


def test_lr_at_values():
    # RETFound recipe: peak 1e-3 (say), min 1e-6, 10 warmup of 100 epochs
    args = dict(lr=1e-3, min_lr=1e-6, warmup_epochs=10, epochs=100)
    assert lr_at(0.0, **args) == 0.0
    assert lr_at(5.0, **args) == pytest.approx(5e-4, rel=1e-15)
    assert lr_at(9.75, **args) == pytest.approx(9.75e-4, rel=1e-15)
    assert lr_at(10.0, **args) == pytest.approx(1e-3, rel=1e-15)
    assert lr_at(55.0, **args) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5, rel=1e-12)
    assert lr_at(32.5, **args) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(100.0, **args) == 1e-6
    assert lr_at(120.0, **args) == 1e-6                     # no rise after the end
    assert lr_at(3.0, lr=1e-3, min_lr=0.0, warmup_epochs=0, epochs=10) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.3)) * 1e-3)
    assert lr_at(1.0, lr=1e-3, min_lr=1e-6, warmup_epochs=2, epochs=2) == 5e-4   # warmup == epochs
    assert lr_at(2.0, lr=1e-3, min_lr=1e-6, warmup_epochs=2, epochs=2) == 1e-6


def test_effective_lr():
    assert effective_lr(5e-3, None, 16, 1, 1) == pytest.approx(3.125e-4, rel=1e-15)
    assert effective_lr(5e-3, None, 16, 2, 4) == pytest.approx(2.5e-3, rel=1e-15)
    assert effective_lr(5e-3, 5e-4, 16, 2, 4) == 5e-4
