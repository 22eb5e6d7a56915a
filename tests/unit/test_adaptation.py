"""--adaptation lp / lora (util/adaptation.py), the cached-feature contract (util/lp_features.py) and the
--dataratio subsets (util/datasets/subsample.py), on tiny models and synthetic labels.

What is frozen and what trains is read from the parameters themselves (names, ``stop_gradient``, values
before and after a few optimizer steps); LoRA's arithmetic is checked against numpy; subset sizes against
counts worked out by hand from the reference's rounding rules."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from models import create_model, default_input_size, list_models
from models.pretrained import load_state_dict_strict
from util.adaptation import (
    Adaptation,
    add_lora,
    has_lora,
    lora_delta,
    merge_lora,
    merged_state_dict,
    parse_dataratio,
)
from util.config import resolve_config
from util.datasets.subsample import SubsetDataset, subsample_indices, subsample_split
from util.errors import UserError
from util.lr_decay import build_optimizer, param_groups_lrd

HEAD = {"head.weight", "head.bias"}


def _vit(seed=0, **kw):
    paddle.seed(seed)
    return create_model("vit_test", num_classes=3, input_size=32, **kw)


def _images(n=4, seed=1, size=32):
    return paddle.to_tensor(np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype("float32"))


def _prepare(model, method, resume="", load=lambda: None, **kw):
    said = []
    Adaptation(adaptation=method, **kw).prepare(model, load, resume, False, said.append)
    return said


def _state(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _train_steps(model, steps=3, lr=1e-2):
    """A few AdamW steps of the toolkit's optimizer (layer decay, weight decay) on random images."""
    opt = build_optimizer(model, lr, weight_decay=0.05, layer_decay=0.65)
    model.train()
    for i in range(steps):
        loss = F.cross_entropy(model(_images(seed=10 + i)), paddle.to_tensor(np.array([0, 1, 2, 0])))
        loss.backward()
        opt.step()
        opt.clear_grad()
    return opt


def _changed(before, after):
    return {k for k in before if not np.array_equal(before[k], after[k])}


# ----------------------------------------------------------------------------------------------- lp
def test_lp_trains_the_head_only_and_the_optimizer_holds_only_it():
    model = _vit(drop_path_rate=0.1)  # stochastic depth still runs in the frozen backbone, as in the reference
    said = _prepare(model, "lp")
    trainable = {n for n, p in model.named_parameters() if not p.stop_gradient}
    assert trainable == HEAD  # fc_norm frozen too: the reference's rule is "head" in the parameter name
    assert "only the head trains, 99 parameters" in said[0]  # 32 x 3 + 3
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.65)
    assert [(g["name"], g["param_names"], g["weight_decay"], g["learning_rate"]) for g in groups] == [
        ("layer_3_decay", ["head.weight"], 0.05, 1.0), ("layer_3_no_decay", ["head.bias"], 0.0, 1.0)]
    before = _state(model)
    opt = _train_steps(model)
    assert [p.name for g in opt._param_groups for p in g["params"]] == [model.head.weight.name, model.head.bias.name]
    assert _changed(before, _state(model)) == HEAD


def test_lp_on_a_dual_eye_model_warns_that_the_fusion_layers_stay_as_they_are():
    paddle.seed(0)
    model = create_model("dual_retfound_test", num_classes=3, input_size=32)
    said = _prepare(model, "lp")
    assert {n for n, p in model.named_parameters() if not p.stop_gradient} == HEAD
    assert said[-1].startswith("warning: --adaptation lp trains only the head of DualEyeCrossAttention")
    assert "proj_left.0.weight" in said[-1] and "--freeze_backbone" in said[-1]


# ----------------------------------------------------------------------------------------------- LoRA
def test_lora_at_step_zero_computes_the_base_model_exactly():
    x = _images()
    base = _vit()
    base.eval()
    expected = base(x).numpy()
    model = _vit()
    add_lora(model, rank=4, alpha=8.0, dropout=0.5)
    model.eval()
    np.testing.assert_array_equal(model(x).numpy(), expected)
    model.train()  # B = 0: the adapter adds nothing whatever the dropout draws
    np.testing.assert_array_equal(model(x).numpy(), expected)


def test_lora_adds_scaled_low_rank_updates_to_q_and_v_only():
    model = _vit()
    add_lora(model, rank=2, alpha=6.0)
    layer = model.blocks[0].attn.qkv
    rng = np.random.default_rng(0)
    for key in ("lora_b_q", "lora_b_v"):
        getattr(layer, key).set_value(rng.normal(size=(2, 32)).astype("float32"))
    a_q, b_q = layer.lora_a_q.numpy(), layer.lora_b_q.numpy()
    a_v, b_v = layer.lora_a_v.numpy(), layer.lora_b_v.numpy()
    assert a_q.shape == (32, 2) and np.abs(a_q).max() <= 1 / np.sqrt(32)  # Kaiming-uniform bound 1/sqrt(in)
    w, b = layer.weight.numpy().astype(np.float64), layer.bias.numpy().astype(np.float64)
    w_new = w.copy()
    w_new[:, :32] += 3.0 * a_q @ b_q   # Paddle's weight is [in, out]: q = columns 0..31, k 32..63, v 64..95
    w_new[:, 64:] += 3.0 * a_v @ b_v
    x = rng.normal(size=(2, 5, 32)).astype("float32")
    layer.eval()
    np.testing.assert_allclose(layer(paddle.to_tensor(x)).numpy(), x @ w_new + b, rtol=1e-5, atol=1e-5)
    delta = lora_delta(layer).numpy()
    assert np.abs(delta[:, 32:64]).max() == 0 and np.abs(delta[:, :32]).min() > 0


def test_lora_merged_and_unmerged_agree_and_the_merged_state_loads_into_a_plain_model():
    model = _vit()
    _prepare(model, "lora", lora_rank=4, lora_alpha=8.0)
    _train_steps(model, steps=3, lr=5e-2)
    x = _images(seed=7)
    model.eval()
    unmerged = model(x).numpy()
    state = merged_state_dict(model)
    assert not [k for k in state if "lora" in k]
    plain = _vit(seed=5)
    load_state_dict_strict(plain, state, "merged")  # strict: every key of the plain model, nothing else
    plain.eval()
    np.testing.assert_allclose(plain(x).numpy(), unmerged, atol=1e-5)
    assert merge_lora(model) == 2 and not has_lora(model)
    assert set(model.state_dict()) == set(plain.state_dict())
    np.testing.assert_allclose(model(x).numpy(), unmerged, atol=1e-5)
    # the adapters did move the model: the merged qkv weights are not the base ones
    assert np.abs(plain.blocks[1].attn.qkv.weight.numpy() - _vit().blocks[1].attn.qkv.weight.numpy()).max() > 1e-4


def test_lora_trains_only_the_adapters_and_the_head_with_the_layer_groups_of_their_blocks():
    model = _vit()
    said = _prepare(model, "lora", lora_rank=2, lora_alpha=4.0)
    assert "trainable: 512 adapter + 99 head parameters" in said[0]  # 2 blocks x 4 x (32 x 2)
    groups = {g["name"]: (g["param_names"], g["learning_rate"]) for g in param_groups_lrd(model, layer_decay=0.5)}
    adapters = ["attn.qkv.lora_a_q", "attn.qkv.lora_b_q", "attn.qkv.lora_a_v", "attn.qkv.lora_b_v"]
    assert groups == {"layer_1_decay": ([f"blocks.0.{a}" for a in adapters], 0.25),
                      "layer_2_decay": ([f"blocks.1.{a}" for a in adapters], 0.5),
                      "layer_3_decay": (["head.weight"], 1.0), "layer_3_no_decay": (["head.bias"], 1.0)}
    before = _state(model)
    _train_steps(model)
    assert _changed(before, _state(model)) == HEAD | {f"blocks.{i}.{a}" for i in (0, 1) for a in adapters}


def test_lora_resume_adds_the_adapters_before_the_weights_are_loaded():
    seen = []
    model = _vit()
    _prepare(model, "lora", resume="ckpt", load=lambda: seen.append(has_lora(model)))
    fresh = _vit()
    _prepare(fresh, "lora", load=lambda: seen.append(has_lora(fresh)))
    assert seen == [True, False]  # resumed: its checkpoint-last holds adapters; new: pretrained weights first


def _inputs(model, size, seed=0):
    shape = (2, 2, 3, size, size) if getattr(model, "num_views", 1) == 2 else (2, 3, size, size)
    return paddle.to_tensor(np.random.default_rng(seed).normal(size=shape).astype("float32"))


TEST_MODELS = [m for m in list_models() if m.endswith("_test")]


@pytest.mark.parametrize("name", TEST_MODELS)
def test_lora_on_every_registered_model_or_a_user_error(name):
    """Every ViT-family model: step 0 is the base model, and the merged state (random B) is a plain model of the
    architecture computing the adapted outputs; a model without a qkv projection (CNNs) refuses."""
    size = min(default_input_size(name), 64)
    paddle.seed(0)
    model = create_model(name, num_classes=3, input_size=size)
    model.eval()
    x = _inputs(model, size)
    with paddle.no_grad():
        base = model(x).numpy()
        try:
            adapted = add_lora(model, rank=2, alpha=4.0)
        except UserError as exc:
            assert "no attention qkv projection" in str(exc) and not [n for n, _ in model.named_sublayers()
                                                                      if n.endswith("attn.qkv")]
            return
        assert adapted and all(n.endswith("attn.qkv") for n in adapted)
        np.testing.assert_array_equal(model(x).numpy(), base)
        rng = np.random.default_rng(1)
        for n, p in model.named_parameters():
            if "lora_b" in n:
                p.set_value(rng.normal(scale=0.5, size=p.shape).astype("float32"))
        out = model(x).numpy()
        assert not np.array_equal(out, base)  # small where a layer scale damps the branch (DINOv2: 1e-5)
        merged = merged_state_dict(model)
        for n in adapted:
            assert np.abs(merged[f"{n}.weight"].numpy() - model.state_dict()[f"{n}.weight"].numpy()).max() > 0.1
        plain = create_model(name, num_classes=3, input_size=size)
        load_state_dict_strict(plain, merged, name)
        plain.eval()
        np.testing.assert_allclose(plain(x).numpy(), out, atol=1e-5)


def test_resuming_a_lora_run_from_its_merged_best_checkpoint_says_what_to_do():
    def load():
        raise UserError("ckpt: checkpoint does not fit the model (missing from the checkpoint "
                        "[blocks.0.attn.qkv.lora_a_q])")
    with pytest.raises(UserError, match="checkpoint-best has them merged"):
        _prepare(_vit(), "lora", resume="ckpt", load=load)


# ----------------------------------------------------------------------------------------------- cached lp
@pytest.mark.parametrize("name", TEST_MODELS)
def test_the_head_of_the_features_is_the_model_for_every_registered_model(name):
    """--lp_cached_features trains ``model.head`` on ``model.forward_features``: that must be the model."""
    size = min(default_input_size(name), 64)
    paddle.seed(0)
    model = create_model(name, num_classes=3, input_size=size)
    model.eval()
    x = _inputs(model, size)
    with paddle.no_grad():
        np.testing.assert_allclose(model.head(model.forward_features(x)).numpy(), model(x).numpy(), atol=1e-5)


# ----------------------------------------------------------------------------------------------- dataratio
def test_uniform_subset_sizes_round_down_as_the_reference():
    assert len(subsample_indices(np.zeros(1080, int), "single_label", 0.1, False, 0)) == 108
    assert len(subsample_indices(np.zeros(103, int), "single_label", 0.3, False, 0)) == 30
    # the reference's int(n * ratio) on floats: 100 * 0.29 = 28.999999999999996 -> 28
    assert len(subsample_indices(np.zeros(100, int), "single_label", 0.29, False, 0)) == 28
    assert len(subsample_indices(np.zeros(5, int), "single_label", 0.01, False, 0)) == 1  # at least one
    assert len(subsample_indices(np.zeros(7, int), "single_label", 1.0, False, 0)) == 7


def test_stratified_subset_keeps_every_class_with_round_half_even_counts():
    targets = np.repeat([0, 1, 2, 3], [50, 25, 5, 1])
    keep = subsample_indices(targets, "single_label", 0.1, True, 0)
    # per class max(1, round(n * 0.1)): round(5.0) = 5, round(2.5) = 2 (half to even), 0.5 -> 0 -> 1, 0.1 -> 1
    assert np.bincount(targets[keep], minlength=4).tolist() == [5, 2, 1, 1]
    grades = np.repeat([0.0, 1.0, 2.0], [40, 20, 10]).astype(np.float32)  # regression: by grade
    assert np.bincount(grades[subsample_indices(grades, "regression", 0.25, True, 3)].astype(int)).tolist() == \
        [10, 5, 2]  # round(2.5) = 2


def test_subsets_are_seeded_sorted_and_nested_across_ratios():
    targets = np.random.default_rng(0).integers(0, 3, 200)
    for stratified in (False, True):
        a = subsample_indices(targets, "single_label", 0.1, stratified, 7)
        assert np.array_equal(a, subsample_indices(targets, "single_label", 0.1, stratified, 7))
        assert not np.array_equal(a, subsample_indices(targets, "single_label", 0.1, stratified, 8))
        assert np.all(np.diff(a) > 0)
        assert set(a) <= set(subsample_indices(targets, "single_label", 0.3, stratified, 7))


def test_subset_dataset_reads_the_kept_samples_through_the_base_reader(tmp_path):
    from util.datasets import build_dataset

    path = tmp_path / "d.npz"
    images = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((10, 4, 4, 3), np.uint8)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    np.savez(path, **{f"{s}_images": images for s in ("train", "val", "test")},
             **{f"{s}_labels": labels for s in ("train", "val", "test")})
    base = build_dataset("train", str(path), None)
    said = []
    sub = subsample_split(base, "0.5", True, 0, said.append)
    assert isinstance(sub, SubsetDataset) and len(sub) == 5
    assert sub.class_counts().tolist() == [2, 2, 1] and said[0].endswith("0 2, 1 2, 2 1")
    for i, j in enumerate(sub.indices):
        assert int(np.asarray(sub[i][0]).max() * 255 + 0.5) == j and sub[i][1] == labels[j]  # pixel value = index

    class Reader:
        calls = 0

        def process(self, img):
            Reader.calls += 1
            return img

    sub.reader = Reader()
    assert base.reader is sub.reader and sub[0][1] == labels[sub.indices[0]] and Reader.calls == 1
    assert subsample_split(base, 1.0, False, 0) is base


def test_dataratio_and_adaptation_flags_are_checked():
    assert parse_dataratio("0.1, 0.3,1") == [0.1, 0.3, 1.0]
    for bad, match in [(["--dataratio", "0"], "in \\(0, 1\\]"), (["--dataratio", "a"], "fractions"),
                       (["--dataratio", "0.5,0.5"], "twice"), (["--lora_alpha", "0"], "> 0"),
                       (["--lora_dropout", "1"], "0 <= p < 1"), (["--lp_cached_features"], "--adaptation lp"),
                       (["--adaptation", "lora", "--freeze_backbone"], "drop one"),
                       (["--dataratio", "0.1,1", "--resume", "x.pdparams"], "sub-run")]:
        with pytest.raises(UserError, match=match):
            resolve_config(["--data_path", "d", *bad])
