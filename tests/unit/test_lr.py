"""Layer-wise LR decay groups, the backbone LR scale, the optimizers and the LR schedule, measured on what
Paddle's optimizers really apply (AdamW / Adam / SGD against updates recorded from torch).

A tiny ViT-shaped layer (cls_token, pos_embed, patch_embed, blocks.i, fc_norm, head) implements the model
contract with the reference layer-id rule. With a constant gradient of 1 on every weight, Adam's
bias-corrected step is m_hat / (sqrt(v_hat) + eps) = 1 / (1 + 1e-8) at every step, so a parameter reset to
0 before a step moves by exactly the LR its group receives -- including its weight decay term, which is
0 at p = 0.
"""
import json
import math
import os

import numpy as np
import paddle
import pytest

from helpers import FIXTURES
from util.errors import UserError
from util.lr_decay import OPTIMIZERS, build_optimizer, freeze_backbone, param_groups_lrd
from util.lr_sched import build_schedule, effective_lr, lr_at
from util.outputs.checkpoint import load_optimizer_state_by_name, optimizer_state_by_name

# Updates of torch's AdamW / Adam / SGD recorded by tools/make_sched_fixture.py
FIXTURE = os.path.join(FIXTURES, 'sched_reference.json')

DIM, DEPTH = 4, 2


def _group_learning_rates(optimizer):
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
    schedule = build_schedule('cosine', peak, min_lr, warmup, epochs)  # what the engine applies every iteration
    scales = {n: 0.75 ** (3 - EXPECTED[n][0]) for n in EXPECTED}
    checked = set()
    for it in range(epochs * steps_per_epoch):
        e = it / steps_per_epoch
        lr = schedule.adjust(opt, e)
        assert lr == lr_at(e, peak, min_lr, warmup, epochs)
        assert opt.get_lr() == pytest.approx(lr, rel=1e-7)
        _set_all(model, 0.0)
        _step(model, opt, 1.0)
        for name, p in model.named_parameters():
            expected = -lr * scales[name] / (1 + 1e-8)
            np.testing.assert_allclose(p.numpy(), expected, rtol=rtol, atol=1e-15, err_msg=f'{name} it {it}')
        reported = dict(_group_learning_rates(opt))
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
    # no per-group clipping by Paddle: the engine clips the global norm (tests/unit/test_engine.py)
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


# ---- backbone LR scale, optimizers (AdamW / Adam / SGD against torch), freezing the backbone ----------------


@pytest.fixture
def float64():
    old = paddle.get_default_dtype()
    paddle.set_default_dtype('float64')
    yield
    paddle.set_default_dtype(old)


def test_backbone_lr_scale_multiplies_backbone_groups_only():
    model = TinyViT()
    base = {g['name']: g for g in param_groups_lrd(model, weight_decay=0.05, layer_decay=0.65)}
    same = {g['name']: g for g in param_groups_lrd(model, weight_decay=0.05, layer_decay=0.65,
                                                   backbone_lr_scale=1.0)}
    assert {k: g['learning_rate'] for k, g in base.items()} == {k: g['learning_rate'] for k, g in same.items()}
    scaled = {g['name']: g for g in param_groups_lrd(model, weight_decay=0.05, layer_decay=0.65,
                                                     backbone_lr_scale=0.1)}
    assert scaled.keys() == base.keys()
    for key, g in scaled.items():
        layer = g['layer_id']
        want = 0.65 ** (3 - layer) * (0.1 if layer < 3 else 1.0)
        assert g['learning_rate'] == pytest.approx(want, rel=1e-15), key
        assert g['weight_decay'] == base[key]['weight_decay']
    assert scaled['layer_3_decay']['learning_rate'] == 1.0 and scaled['layer_3_no_decay']['learning_rate'] == 1.0
    with pytest.raises(UserError, match='backbone_lr_scale'):
        param_groups_lrd(model, backbone_lr_scale=-0.1)


def test_unknown_optimizer_lists_the_choices():
    with pytest.raises(UserError) as err:
        build_optimizer(TinyViT(), lr=1e-3, opt='adamww')
    msg = str(err.value)
    assert "'adamww'" in msg and "did you mean 'adamw'" in msg and 'adam, adamw, sgd' in msg


def _load_optimizer_reference():
    with open(FIXTURE, encoding='utf8') as f:
        return json.load(f)['optimizers']


@pytest.mark.parametrize('opt,rtol', [('adamw', 1e-10), ('adam', 1e-10),
                                      # Paddle's momentum kernel takes mu = 0.9 as float32 (0.89999998)
                                      ('sgd', 1e-7)])
def test_optimizer_matches_torch(float64, opt, rtol):
    """Three steps with a changing LR, layer decay x backbone_lr_scale per group, decay-exempt groups:
    every parameter after every step equals torch's (float64, tests/fixtures/sched_reference.json)."""
    ref = _load_optimizer_reference()
    cfg, params = ref['config'], ref['params']
    model = TinyViT()
    named = dict(model.named_parameters())
    assert {n: list(p.shape) for n, p in named.items()} == {n: p['shape'] for n, p in params.items()}
    for name, p in named.items():
        p.set_value(np.asarray(params[name]['init'], dtype=np.float64).reshape(params[name]['shape']))
    optimizer = build_optimizer(model, lr=cfg['base_lrs'][0], weight_decay=cfg['weight_decay'],
                                layer_decay=cfg['layer_decay'], betas=tuple(cfg['betas']), eps=cfg['eps'],
                                opt=opt, momentum=cfg['momentum'], backbone_lr_scale=cfg['backbone_lr_scale'])
    assert isinstance(optimizer, {'adamw': paddle.optimizer.AdamW, 'adam': paddle.optimizer.Adam,
                                  'sgd': paddle.optimizer.Momentum}[opt])
    reported = dict(_group_learning_rates(optimizer))
    for p in params.values():
        group = f"layer_{p['layer']}_{'decay' if p['decay'] else 'no_decay'}"
        assert reported[group] == pytest.approx(cfg['base_lrs'][0] * p['scale'], rel=1e-7)
    for t, base_lr in enumerate(cfg['base_lrs']):
        optimizer.set_lr(base_lr)
        loss = sum((p * paddle.to_tensor(np.asarray(params[n]['grads'][t]).reshape(params[n]['shape']))).sum()
                   for n, p in named.items())
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        for name, p in named.items():
            want = np.asarray(ref['results'][opt][name][t]).reshape(params[name]['shape'])
            np.testing.assert_allclose(p.numpy(), want, rtol=rtol, atol=1e-13, err_msg=f'{opt} {name} step {t}')
    # the steps were big enough for a wrong scale or a missing decay term to show
    moved = max(np.abs(np.asarray(ref['results'][opt][n][-1]) - np.asarray(params[n]['init'])).max()
                for n in params)
    assert moved > 1e-3


def test_adamw_after_adam_has_no_stale_l2():
    """Paddle's Adam leaves param.regularizer = L2Decay(wd) behind and AdamW would add it to the gradient;
    build_optimizer resets it. Zero gradient: only the decoupled decay of 'decay' groups may move a weight."""
    model = TinyViT()
    build_optimizer(model, lr=0.1, weight_decay=0.5, layer_decay=1.0, opt='adam')
    assert type(model.head.weight.regularizer).__name__ == 'L2Decay'
    opt = build_optimizer(model, lr=0.1, weight_decay=0.05, layer_decay=1.0, opt='adamw')
    _set_all(model, 1.0)
    _step(model, opt, 0.0)
    for name, p in model.named_parameters():
        want = 1 - 0.1 * 0.05 if EXPECTED[name][1] else 1.0
        np.testing.assert_allclose(p.numpy(), want, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize('opt', sorted(OPTIMIZERS))
def test_optimizer_state_resumes_by_name(opt, tmp_path):
    """The optimizer state saved by structured names (through a file, as a checkpoint) restores each
    optimizer's moments / velocity. (In memory the state would share its tensors with the first optimizer.)"""
    paddle.seed(1)
    model_a, model_b = TinyViT(), TinyViT()
    opt_a = build_optimizer(model_a, lr=1e-2, opt=opt, backbone_lr_scale=0.5)
    rng = np.random.default_rng(0)
    grads = [{n: rng.normal(size=p.shape).astype('float32') for n, p in model_a.named_parameters()}
             for _ in range(3)]

    def step(model, optimizer, g):
        sum((p * paddle.to_tensor(g[n])).sum() for n, p in model.named_parameters()).backward()
        optimizer.step()
        optimizer.clear_grad()

    step(model_a, opt_a, grads[0])
    step(model_a, opt_a, grads[1])
    model_b.set_state_dict(model_a.state_dict())
    opt_b = build_optimizer(model_b, lr=1e-2, opt=opt, backbone_lr_scale=0.5)
    fresh = TinyViT()
    fresh.set_state_dict(model_a.state_dict())
    opt_fresh = build_optimizer(fresh, lr=1e-2, opt=opt, backbone_lr_scale=0.5)
    paddle.save(optimizer_state_by_name(opt_a, model_a), str(tmp_path / 'opt.pdopt'))
    load_optimizer_state_by_name(opt_b, model_b, paddle.load(str(tmp_path / 'opt.pdopt')))
    for m, o in ((model_a, opt_a), (model_b, opt_b), (fresh, opt_fresh)):
        step(m, o, grads[2])
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        np.testing.assert_array_equal(pb.numpy(), pa.numpy(), err_msg=name)
    # without the state the third step differs: the check above could fail
    assert any(not np.allclose(pf.numpy(), pa.numpy(), rtol=1e-6, atol=0)
               for pa, pf in zip(model_a.parameters(), fresh.parameters()))


@pytest.mark.parametrize('opt', sorted(OPTIMIZERS))
def test_frozen_backbone_trains_only_the_head(opt):
    paddle.seed(0)
    model = TinyViT()
    assert freeze_backbone(model) == sum(1 for n in EXPECTED if EXPECTED[n][0] < 3) == 12
    assert freeze_backbone(model) == 12                       # idempotent
    groups = param_groups_lrd(model, backbone_lr_scale=0.1)
    assert {g['name'] for g in groups} == {'layer_3_decay', 'layer_3_no_decay'}
    assert all(g['learning_rate'] == 1.0 for g in groups)
    optimizer = build_optimizer(model, lr=0.05, weight_decay=0.01, opt=opt)
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    x = paddle.randn([8, 3, 4, 4])
    y = paddle.to_tensor(np.eye(3, dtype='float32')[np.arange(8) % 3])
    losses = []
    for _ in range(25):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
    for name, p in model.named_parameters():
        changed = not np.array_equal(p.numpy(), before[name])
        assert changed == (EXPECTED[name][0] == 3), name


def test_freeze_backbone_without_head_is_an_error():
    model = TinyViT()
    model.layer_id = lambda name: 0
    with pytest.raises(UserError, match='no head parameters'):
        freeze_backbone(model)
    assert not model.head.weight.stop_gradient
