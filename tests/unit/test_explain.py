"""Heat maps (util/explain.py): shapes and ranges for every model family, Grad-CAM and rollout against
independent computations, no side effects on the model, the files written, and ``predict.py --explain``.
Whether the maps point at the evidence is tested on trained models in tests/e2e/test_explain_lesion.py."""
from __future__ import annotations

import csv
import os

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from PIL import Image

import predict
from helpers import same_prediction_rows
from models import cpu_kernels, create_model
from models.vit import Attention, VisionTransformer
from util.errors import UserError
from util.explain import explain_batch, file_stem, resolve_target, save_explanation, unnormalise, write_explanations
from util.image_io import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from util.inference import RunIdentity
from util.outputs.checkpoint import save_checkpoint

# (model, input size, views, methods): sizes give each CNN a 2x2 (or larger) last feature map
FAMILIES = [("vit_test", 64, 1, ("rollout", "gradcam")), ("resnet_test", 64, 1, ("gradcam",)),
            ("efficientnet_test", 64, 1, ("gradcam",)), ("efficientnet_v2_test", 32, 1, ("gradcam",)),
            ("convnext_test", 64, 1, ("gradcam",)), ("dual_resnet_test", 64, 2, ("gradcam",)),
            ("dual_convnext_test", 64, 2, ("gradcam",)), ("dual_retfound_test", 32, 2, ("rollout", "gradcam"))]


def _model(name, size, num_classes=3, seed=0, **kw):
    paddle.seed(seed)
    model = create_model(name, num_classes, input_size=size, **kw)
    model.eval()
    return model


def _images(views, size, n=2, seed=0):
    shape = [n, 3, size, size] if views == 1 else [n, 2, 3, size, size]
    return paddle.to_tensor(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _upsample_minmax(grid: np.ndarray, size: int) -> np.ndarray:
    up = F.interpolate(paddle.to_tensor(grid[:, None].astype(np.float64)), size=[size, size], mode="bilinear",
                       align_corners=False).numpy()[:, 0]
    lo = up.min(axis=(1, 2), keepdims=True)
    return (up - lo) / (up.max(axis=(1, 2), keepdims=True) - lo)


@pytest.mark.parametrize("name, size, views, methods", FAMILIES)
def test_maps_have_the_input_resolution_and_span_zero_to_one(name, size, views, methods):
    model = _model(name, size)
    x = _images(views, size)
    for method in methods:
        maps = explain_batch(model, x, method)
        assert maps.shape == ((2, size, size) if views == 1 else (2, 2, size, size)), (method, maps.shape)
        assert maps.dtype == np.float32 and np.isfinite(maps).all()
        per_sample = maps.reshape(2, -1)
        assert (per_sample.min(1) == 0).all() and (per_sample.max(1) == 1).all(), method


def test_gradcam_of_a_pooled_cnn_is_its_class_activation_map():
    """For global average pooling + a linear head, Grad-CAM reduces to CAM (Zhou et al. 2016):
    ReLU(sum_k W[k, c] A_k); computed here from the feature map and the head weights, without gradients."""
    model = _model("resnet_test", 96)
    x = _images(1, 96, n=3)
    with paddle.no_grad():
        fmap = model.forward_feature_map(x).numpy()                       # [3, 512, 3, 3]
    weight = model.head.weight.numpy()                                     # [512, classes]
    targets = np.array([0, 2, 1])
    cam = np.maximum(np.einsum("nkhw,kn->nhw", fmap, weight[:, targets]), 0)
    got = explain_batch(model, x, "gradcam", target=targets)
    np.testing.assert_allclose(got, _upsample_minmax(cam, 96), atol=1e-5)
    # a different class gives a different map; the default target is the predicted class
    assert not np.allclose(explain_batch(model, x, "gradcam", target=0), explain_batch(model, x, "gradcam", target=1))
    with paddle.no_grad():
        predicted = model(x).numpy().argmax(1)
    np.testing.assert_array_equal(explain_batch(model, x, "gradcam"), explain_batch(model, x, "gradcam", predicted))


def _attention_numpy(block, tokens: np.ndarray) -> np.ndarray:
    """softmax(Q K^T / sqrt(d)) per head of ``block`` for tokens [B, T, D], in numpy."""
    ln = block.norm1
    mu, var = tokens.mean(-1, keepdims=True), tokens.var(-1, keepdims=True)
    h = (tokens - mu) / np.sqrt(var + ln._epsilon) * ln.weight.numpy() + ln.bias.numpy()
    qkv = h @ block.attn.qkv.weight.numpy() + block.attn.qkv.bias.numpy()
    b, t, _ = qkv.shape
    heads, dh = block.attn.num_heads, block.attn.head_dim
    q, k, _ = qkv.reshape(b, t, 3, heads, dh).transpose(2, 0, 3, 1, 4)
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("global_pool", [True, False])
def test_rollout_of_a_one_block_vit_follows_abnar_and_zuidema(global_pool):
    """One block: R = (mean over heads of A + I) / 2; the map is the cls row (cls-token head) or the mean of the
    patch rows (global pooling), over the patch columns, on the 4x4 grid."""
    paddle.seed(1)
    model = VisionTransformer(input_size=32, patch_size=8, num_classes=3, embed_dim=16, depth=1, num_heads=2,
                              global_pool=global_pool)
    with paddle.no_grad():   # random position embeddings make the attention vary over the grid
        model.pos_embed.set_value(paddle.randn(model.pos_embed.shape) * 2)
    model.eval()
    x = _images(1, 32, n=2)
    with paddle.no_grad():
        patches = model.patch_embed(x).numpy()
    cls = np.broadcast_to(model.cls_token.numpy(), (2, 1, 16))
    tokens = np.concatenate([cls, patches], axis=1) + model.pos_embed.numpy()
    a = _attention_numpy(model.blocks[0], tokens.astype(np.float64)).mean(axis=1)
    r = (a + np.eye(a.shape[-1])) / 2
    row = r[:, 1:, 1:].mean(axis=1) if global_pool else r[:, 0, 1:]
    want = _upsample_minmax(row.reshape(2, 4, 4), 32)
    np.testing.assert_allclose(explain_batch(model, x, "rollout"), want, atol=1e-5)
    # class-agnostic: a target changes nothing
    np.testing.assert_array_equal(explain_batch(model, x, "rollout", target=2), explain_batch(model, x, "rollout"))


def test_rollout_of_a_vit_with_register_tokens_reads_the_patch_columns_only():
    """With register tokens (RETFound-Green's layout: cls, 4 registers, then the patches) the map is the
    patch columns of the rollout, the registers left out as the cls token is; a one-block model worked by
    hand as above."""
    paddle.seed(2)
    model = create_model("retfound_green_test", num_classes=3, input_size=32)
    model.eval()
    assert model.num_prefix_tokens == 5
    x = _images(1, 32, n=2, seed=3)
    with paddle.no_grad():
        tokens = model.patch_embed(x).numpy() + model.pos_embed.numpy()          # no_embed_class: patches only
    prefix = np.concatenate([np.broadcast_to(model.cls_token.numpy(), (2, 1, tokens.shape[-1])),
                             np.broadcast_to(model.reg_token.numpy(), (2, 4, tokens.shape[-1]))], axis=1)
    h = np.concatenate([prefix, tokens], axis=1).astype(np.float64)
    r = None
    for block in model.blocks:   # the attention of each block, on its real input
        a = _attention_numpy(block, h).mean(axis=1)
        a = (a + np.eye(a.shape[-1])) / 2
        r = a if r is None else a @ r
        with paddle.no_grad():
            h = block(paddle.to_tensor(h.astype(np.float32))).numpy().astype(np.float64)
    row = r[:, 5:, 5:].mean(axis=1) if model.global_pool else r[:, 0, 5:]
    g = model.patch_embed.grid_size
    np.testing.assert_allclose(explain_batch(model, x, "rollout"), _upsample_minmax(row.reshape(2, g, g), 32),
                               atol=1e-4)
    assert explain_batch(model, x, "gradcam").shape == (2, 32, 32)


def test_vit_gradcam_weights_the_last_norm1_patch_tokens_by_their_mean_gradient():
    """Grad-CAM on a ViT: the last block's norm1 output, cls token dropped, channel weights = mean gradient over
    the patch tokens, ReLU of the weighted sum, token n at grid cell (n // g, n % g) (PatchEmbed's row-major
    flattening)."""
    paddle.seed(2)
    model = VisionTransformer(input_size=32, patch_size=8, num_classes=3, embed_dim=16, depth=2, num_heads=2)
    model.eval()
    x = _images(1, 32, n=2)
    kept = []
    handle = model.blocks[-1].norm1.register_forward_post_hook(lambda layer, inputs, output: kept.append(output))
    xg = x.detach()
    xg.stop_gradient = False
    with cpu_kernels.suspended():  # paddle.grad of one tensor: Paddle's kernels (models/cpu_kernels.py says why)
        logits = model(xg)
    handle.remove()
    cams = []
    for c in range(3):
        grad = paddle.grad(logits[:, c].sum(), kept[0], retain_graph=True)[0].numpy()[:, 1:]
        tokens = kept[0].numpy()[:, 1:]
        cams.append(np.maximum(np.einsum("bnd,bd->bn", tokens, grad.mean(axis=1)), 0).reshape(2, 4, 4))
    target = next(c for c in range(3) if (np.ptp(cams[c].reshape(2, -1), axis=1) > 0).all())   # not all zero
    np.testing.assert_allclose(explain_batch(model, x, "gradcam", target=target), _upsample_minmax(cams[target], 32),
                               atol=1e-5)


def test_explaining_leaves_the_model_as_it_was():
    """Outputs bit-identical before, during (attention kept) and after; no parameter gradients, no sink, hook or
    patched method left behind, train mode restored."""
    for name, size, views, methods in [("vit_test", 32, 1, ("rollout", "gradcam")), ("convnext_test", 64, 1,
                                                                                       ("gradcam",)),
                                       ("dual_retfound_test", 32, 2, ("rollout", "gradcam"))]:
        model = _model(name, size)
        x = _images(views, size)
        with paddle.no_grad():
            before = model(x).numpy()
        attns = [m for m in model.sublayers() if isinstance(m, Attention)]
        for layer in attns:
            layer.attn_sink = []
        with paddle.no_grad():
            during = model(x).numpy()
        assert all(len(layer.attn_sink) == 1 for layer in attns)
        for layer in attns:
            del layer.attn_sink
        for method in methods:
            explain_batch(model, x, method)
        model.train()
        explain_batch(model, x, methods[-1])
        assert model.training
        model.eval()
        with paddle.no_grad():
            after = model(x).numpy()
        np.testing.assert_array_equal(before, during)
        np.testing.assert_array_equal(before, after)
        assert all(p.grad is None for p in model.parameters()), name
        assert all("attn_sink" not in vars(layer) for layer in attns)
        assert all(not layer._forward_post_hooks for layer in model.sublayers())
        assert all("forward_feature_map" not in vars(layer) for layer in [model] + model.sublayers())


def test_dual_eye_gradcam_is_the_cam_of_each_eye_normalised_together():
    """dual_resnet_test concatenates the pooled features [left, right] before its head, so eye e's Grad-CAM is
    the CAM with its slot of the head weights; the two maps share one [0, 1] scale (the eye that drove the
    output stands out)."""
    model = _model("dual_resnet_test", 64)
    x = _images(2, 64, n=2)
    with paddle.no_grad():
        fmap = model.backbone.forward_feature_map(x.reshape([4, 3, 64, 64])).numpy().reshape(2, 2, 512, 2, 2)
    w = model.head.weight.numpy()                                   # [1024, classes]: left rows, then right
    cams = [np.stack([np.maximum(np.einsum("nkhw,k->nhw", fmap[:, e], w[e * 512:(e + 1) * 512, c]), 0)
                      for e in range(2)], axis=1) for c in range(3)]   # per class: [2 samples, 2 eyes, 2, 2]
    target = next(c for c in range(3) if (np.ptp(cams[c].reshape(2, -1), axis=1) > 0).all())   # not all zero
    cam = cams[target]
    up = F.interpolate(paddle.to_tensor(cam.reshape(4, 1, 2, 2)), size=[64, 64], mode="bilinear",
                       align_corners=False).numpy().reshape(2, 2, 64, 64)
    lo = up.min(axis=(1, 2, 3), keepdims=True)
    want = (up - lo) / (up.max(axis=(1, 2, 3), keepdims=True) - lo)
    got = explain_batch(model, x, "gradcam", target=target)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [got[i].max() for i in range(2)] == [1, 1]


def test_rollout_on_a_cnn_is_an_error_that_points_to_gradcam():
    for name in ("resnet_test", "dual_convnext_test"):
        views = 2 if name.startswith("dual") else 1
        with pytest.raises(UserError, match="use --explain gradcam"):
            explain_batch(_model(name, 64), _images(views, 64), "rollout")
    with pytest.raises(UserError, match="unknown method"):
        explain_batch(_model("vit_test", 32), _images(1, 32), "saliency")


def test_targets_regression_and_bad_input():
    model = _model("resnet_test", 64, num_classes=1)           # a regression model: one output
    maps = explain_batch(model, _images(1, 64), "gradcam")
    assert maps.shape == (2, 64, 64)
    with pytest.raises(UserError, match="outputs 0..0"):
        explain_batch(model, _images(1, 64), "gradcam", target=1)
    with pytest.raises(UserError, match="expected \\[B, 2, 3, H, W\\]"):
        explain_batch(_model("dual_resnet_test", 32), _images(1, 32), "gradcam")
    assert resolve_target(None, ["a", "b"], 2) is None
    assert resolve_target("b", ["a", "b"], 2) == 1 and resolve_target("0", ["a", "b"], 2) == 0
    with pytest.raises(UserError, match="one of a, b, or an index 0..1"):
        resolve_target("c", ["a", "b"], 2)
    with pytest.raises(UserError, match="single output"):
        resolve_target("3", ["0", "1", "2", "3", "4"], 1)
    with pytest.raises(UserError, match="does not depend on the class"):
        resolve_target("a", ["a", "b"], 2, method="rollout")


def test_save_explanation_writes_a_png_overlay_and_the_exact_map(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    heat = rng.random((20, 24)).astype(np.float32)
    save_explanation(image, heat, str(tmp_path / "a.png"), str(tmp_path / "a.npy"))
    png = np.asarray(Image.open(tmp_path / "a.png"))
    assert png.shape == (20, 24, 3) and png.dtype == np.uint8
    # hot pixels are red, cold ones blue (jet), blended with the image
    hot, cold = np.unravel_index(heat.argmax(), heat.shape), np.unravel_index(heat.argmin(), heat.shape)
    assert int(png[hot][0]) - int(image[hot][0]) // 2 > int(png[hot][2]) - int(image[hot][2]) // 2
    assert int(png[cold][2]) - int(image[cold][2]) // 2 > int(png[cold][0]) - int(image[cold][0]) // 2
    saved = np.load(tmp_path / "a.npy")
    assert saved.dtype == heat.dtype and np.array_equal(saved, heat)
    # dual-eye: the two eyes side by side
    save_explanation(np.stack([image, image]), np.stack([heat, heat]), str(tmp_path / "d.png"), str(tmp_path / "d.npy"))
    assert np.asarray(Image.open(tmp_path / "d.png")).shape == (20, 2 * 24 + 2, 3)
    assert np.load(tmp_path / "d.npy").shape == (2, 20, 24)
    with pytest.raises(UserError, match="do not fit"):
        save_explanation(image, heat[:10], str(tmp_path / "b.png"), str(tmp_path / "b.npy"))


def test_unnormalise_and_file_names():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    mean, std = np.array(IMAGENET_DEFAULT_MEAN), np.array(IMAGENET_DEFAULT_STD)
    x = ((image / 255.0 - mean) / std).transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(unnormalise(x, mean, std), image)
    assert file_stem("sub/img_1.png") == "sub__img_1"
    assert file_stem("p0_L.jpg|p0_R.JPEG") == "p0_L__p0_R"
    assert file_stem("test[3]") == "test_3_"


class _Dataset:
    class_names = ["a", "b", "c"]

    def __init__(self, x, ids):
        self.x, self.ids = x, ids

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], np.int64(0)

    def sample_id(self, i):
        return self.ids[i]


def test_write_explanations_names_files_by_sample_and_captions_the_target(tmp_path):
    model = _model("vit_test", 32)
    x = _images(1, 32, n=3).numpy()
    ds = _Dataset(x, ["a/x.png", "b/x.png", "a_x.png"])
    out = write_explanations(model, ds, str(tmp_path / "maps"), "gradcam", mean=IMAGENET_DEFAULT_MEAN,
                             std=IMAGENET_DEFAULT_STD, target=2, indices=[0, 2], batch_size=1)
    assert [os.path.basename(p) for _, p in out] == ["a__x.png", "a_x.png"]
    assert out[0][0] == "a/x.png (gradcam, c)"
    assert sorted(os.listdir(tmp_path / "maps")) == ["a__x.npy", "a__x.png", "a_x.npy", "a_x.png"]
    np.testing.assert_array_equal(np.load(tmp_path / "maps" / "a_x.npy"),
                                  explain_batch(model, x[2:3], "gradcam", target=2)[0])
    # the overlay is drawn on the un-normalised input
    png = np.asarray(Image.open(out[1][1]))
    heat = np.load(tmp_path / "maps" / "a_x.npy")
    cold = heat < 0.05
    image = unnormalise(x[2], IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert np.abs(png[cold][:, 0].astype(int) - image[cold][:, 0] // 2).max() <= 1   # red: image / 2 + 0
    # clashing names get a suffix; rollout captions say so
    ds = _Dataset(x[:2], ["x.png", "x.jpg"])
    out = write_explanations(model, ds, str(tmp_path / "r"), "rollout", mean=IMAGENET_DEFAULT_MEAN,
                             std=IMAGENET_DEFAULT_STD)
    assert [os.path.basename(p) for _, p in out] == ["x.png", "x-2.png"]
    assert out[0][0] == "x.png (attention rollout)"


# ----------------------------------------------------------------------------------------------- predict.py
def _checkpoint(tmp_path, model_name="vit_test", size=32, classes=("normal", "glaucoma", "cataract")):
    model = _model(model_name, size, num_classes=len(classes))
    identity = RunIdentity(model=model_name, num_classes=len(classes), class_names=tuple(classes), input_size=size,
                           global_pool=True, data_path=str(tmp_path), task_type="single_label",
                           mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD), crop_pct=1.0)
    path = str(tmp_path / f"{model_name}.pdparams")
    save_checkpoint(path, model=model, epoch=0, best_score=0.0, meta=identity.meta())
    return path


def _images_folder(root, n=3, size=40):
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / ("sub" if i == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    return str(root)


def _rows(path):
    with open(path, newline="", encoding="utf8") as f:
        return list(csv.DictReader(f))


def test_predict_explain_writes_a_map_per_image_and_the_column(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    images = _images_folder(tmp_path / "images")
    plain, explained = tmp_path / "plain.csv", tmp_path / "out" / "result.csv"
    assert predict.main(["--resume", ckpt, "--input", images, "--output", str(plain)]) == 0
    assert predict.main(["--resume", ckpt, "--input", images, "--output", str(explained), "--explain", "gradcam",
                         "--explain_class", "glaucoma", "--batch_size", "2"]) == 0
    assert "heat maps" in capsys.readouterr().out
    base, rows = _rows(plain), _rows(explained)
    assert "explanation" not in base[0]
    assert list(rows[0]) == list(base[0]) + ["explanation"]
    # the predictions are unchanged (to the last printed decimal: --batch_size 2 here, the default there)
    assert same_prediction_rows([{k: r[k] for k in base[0]} for r in rows], base)
    folder = tmp_path / "out" / "result_explain"
    assert sorted(os.listdir(folder)) == sorted(f"{s}.{e}" for s in ("img_1", "img_2", "sub__img_0")
                                                for e in ("png", "npy"))
    by_file = {r["file"]: r["explanation"] for r in rows}
    assert by_file["sub/img_0.png"] == str(folder / "sub__img_0.png")
    for r in rows:
        png = np.asarray(Image.open(r["explanation"]))
        heat = np.load(r["explanation"][:-4] + ".npy")
        assert png.shape == (32, 32, 3) and heat.shape == (32, 32) and heat.max() == 1 and heat.min() == 0


def test_predict_explain_errors(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    images = _images_folder(tmp_path / "images", n=1)
    out = str(tmp_path / "r.csv")
    assert predict.main(["--resume", ckpt, "--input", images, "--output", out, "--explain", "gradcam",
                         "--explain_class", "glaucom"]) == 2
    assert "one of normal, glaucoma, cataract" in capsys.readouterr().err
    assert predict.main(["--resume", ckpt, "--input", images, "--output", out, "--explain_class", "glaucoma"]) == 2
    assert "without --explain" in capsys.readouterr().err
    cnn = _checkpoint(tmp_path, "resnet_test", 64)
    assert predict.main(["--resume", cnn, "--input", images, "--output", out, "--explain", "rollout"]) == 2
    assert "use --explain gradcam" in capsys.readouterr().err
    assert not os.path.exists(out)
    # rollout on the ViT, into a folder of one's choice
    assert predict.main(["--resume", ckpt, "--input", images, "--output", out, "--explain", "rollout",
                         "--explain_dir", str(tmp_path / "maps")]) == 0
    assert sorted(os.listdir(tmp_path / "maps")) == ["sub__img_0.npy", "sub__img_0.png"]
