"""How much of a pretrained model a run trains (``--adaptation finetune|lp|lora``), and the runs of a
``--dataratio`` list.

* ``finetune`` (default): every parameter trains, as before.
* ``lp``, the RETFound reference's linear probe: only the parameters of ``model.head`` train; every other
  parameter gets ``stop_gradient`` and so is left out of the optimizer and of weight decay
  (``util.lr_decay.param_groups_lrd`` skips it). That is the reference's rule (``requires_grad`` only for
  parameter names containing ``head``), which for the ViT freezes ``fc_norm`` too (it stays at its
  ones/zeros initialisation after an MAE checkpoint). Everything else is the fine-tuning recipe, as in the
  reference: the same transforms and augmentation, the same AdamW with ``--blr``/``--weight_decay`` (the head
  weight decays, its bias does not) and layer decay (the head's scale is 1), the model in train mode (so the
  frozen backbone still applies stochastic depth and a CNN's BatchNorm statistics still follow the data).
  MAE's own linear probe (a BatchNorm without affine before the head, LARS, no weight decay) is *not* what the
  RETFound reference does and is not done here. ``--lp_cached_features`` is a different protocol, see
  ``util/lp_features.py``.
* ``lora``: low-rank adapters (Hu et al. 2022) on the q and v parts of every ViT block's fused ``attn.qkv``
  Linear; the adapters and the head train, everything else is frozen as for ``lp``. For an input ``x`` the
  layer computes ``x W + b + (alpha / rank) * [drop(x) A_q B_q, 0, drop(x) A_v B_v]`` (Paddle's Linear weight
  is ``[in, out]``, so ``A`` is ``[in, rank]`` and ``B`` is ``[rank, dim]``: the transpose of the paper's
  ``B A``), with ``A`` Kaiming-uniform (bound ``1/sqrt(in)``, as PEFT and ``nn.Linear``) and ``B`` zero, so
  at step 0 the model computes exactly the base model's outputs; ``drop`` is ``--lora_dropout`` on the
  adapter's input. The adapter is a forward post-hook plus four parameters registered on the qkv Linear
  itself (``blocks.3.attn.qkv.lora_a_q``, ...): the base keys keep their names, the layer keeps its class,
  and layer-wise LR decay puts each adapter in its block's group. ``merge_lora`` adds the deltas into
  ``qkv.weight`` and removes the adapters, leaving a plain model.

  Checkpoints: ``checkpoint-last`` keeps the adapters unmerged (base weights + adapter keys + their optimizer
  state), so a LoRA run resumes exactly (``prepare`` adds the adapters before the resumed weights are
  loaded); ``checkpoint-best`` is always written merged (``util.training.fit``), a plain model that
  ``--eval``, ``predict.py`` and ``export.py`` load with no adapter code. Weight decay applies to the
  adapter matrices as to any matrix. CNNs have no qkv projection: ``lora`` on them is a ``UserError``.

Dual-eye models: ``lp`` and ``lora`` train ``model.head`` only, as for every model; their eye branches,
cross-attention and fusion layers then keep the weights they start with (said in a warning), and
``--freeze_backbone`` (which trains everything above the backbone) is the mode that trains those layers.

``--dataratio 0.1,0.3,1.0``: the reference takes one ratio per run (its ``build_dataset`` reads a single
float, so a list there fails). Here a list means one complete run per ratio, run by the evaluation-protocol
driver as ``--seeds`` runs are (``util.protocol.ratios.run_ratio_sweep``): each ratio's run in ``<output_dir>/<task>/<task>_ratio<r>``
(``<task>``: the run folder name the command would have without the list) with its own config.yaml holding
that one ratio, so each is resumed or evaluated as any run; running the same command again keeps finished
ratios and resumes a stopped one; ``<task>/dataratio_summary.csv`` has one row of test metrics per ratio. A
single value is one ordinary run in ``<task>``. ``util/datasets/subsample.py`` draws the subset.

References: rmaphoh/RETFound ``main_finetune.py`` (``--adaptation lp``, ``--dataratio``); Hu et al., "LoRA:
Low-Rank Adaptation of Large Language Models", ICLR 2022; huggingface/peft ``tuners/lora`` (initialisation,
dropout on the adapter input, merging by adding the delta).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from util.errors import UserError

ADAPTATIONS = ("finetune", "lp", "lora")
LORA_TARGET = "attn.qkv"  # the fused q/k/v projection of a ViT block (timm naming)
LORA_KEYS = ("lora_a_q", "lora_b_q", "lora_a_v", "lora_b_v")


# ----------------------------------------------------------------------------------------------- flags
def parse_dataratio(text) -> list[float]:
    """``'0.1,0.3,1.0'`` -> ``[0.1, 0.3, 1.0]``; each value in (0, 1], none repeated (else ``UserError``)."""
    tokens = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        ratios = [float(t) for t in tokens]
    except ValueError:
        ratios = []
    if not ratios or not all(0.0 < r <= 1.0 for r in ratios):
        raise UserError(f"--dataratio {text!r}: not a fraction or comma-separated fractions in (0, 1] (the share "
                        "of the training split to train on; 1.0: all of it); pass e.g. --dataratio 0.1 or "
                        "--dataratio 0.1,0.3,1.0")
    if len(set(ratios)) != len(ratios):
        raise UserError(f"--dataratio {text!r}: a ratio is given twice (each ratio is one run); list each once")
    return ratios


def ratio_name(ratio: float) -> str:
    """The suffix of a sub-run's folder: ``0.1`` -> ``ratio0.1``, ``1.0`` -> ``ratio1``."""
    return f"ratio{ratio:g}"


def is_ratio_sweep(cfg) -> bool:
    """A ``--dataratio`` list on a training command: one run per ratio (``run_ratio_sweep``)."""
    return len(parse_dataratio(cfg.dataratio)) > 1 and not cfg.eval


def check_adaptation_flags(cfg) -> None:
    """The checks of the 'adaptation' flags that argparse cannot make (``util.config.validate_config``)."""
    if cfg.lora_rank < 1:
        raise UserError(f"--lora_rank {cfg.lora_rank}: out of range (expected 1 or more); pass e.g. --lora_rank 8")
    if not (math.isfinite(cfg.lora_alpha) and cfg.lora_alpha > 0):
        raise UserError(f"--lora_alpha {cfg.lora_alpha}: out of range (expected a finite number > 0; the adapter "
                        "is scaled by alpha / rank); pass e.g. --lora_alpha 16")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise UserError(f"--lora_dropout {cfg.lora_dropout}: out of range (expected 0 <= p < 1); pass e.g. "
                        "--lora_dropout 0.1")
    if cfg.lp_cached_features and cfg.adaptation != "lp":
        raise UserError(f"--lp_cached_features with --adaptation {cfg.adaptation}: cached features train the head "
                        "of a frozen model (expected --adaptation lp); add --adaptation lp or drop "
                        "--lp_cached_features")
    if cfg.freeze_backbone and cfg.adaptation != "finetune":
        raise UserError(f"--freeze_backbone with --adaptation {cfg.adaptation}: two different ways of choosing what "
                        "trains (expected one of them); --adaptation lp trains the head only, --freeze_backbone "
                        "everything above the backbone: drop one")
    ratios = parse_dataratio(cfg.dataratio)
    if len(ratios) > 1 and cfg.resume and not cfg.eval:
        raise UserError(f"--dataratio {cfg.dataratio} with --resume: a list starts one run per ratio, but --resume "
                        "continues one run (expected one ratio); resume the sub-run's own folder "
                        "(<task>_ratio<r>), whose config holds its ratio")


def _head_parameters(model) -> list:
    head = getattr(model, "head", None)
    params = list(head.parameters()) if head is not None else []
    if not params:
        raise UserError(f"{type(model).__name__}: no head parameters (model.head is missing or has none, e.g. "
                        "a headless model); --adaptation lp and lora train the head, so the model needs one "
                        "(check --nb_classes)")
    return params


def freeze_all_but(model, keep: list) -> tuple[int, int]:
    """``stop_gradient`` on every parameter of ``model`` not in ``keep``; returns (frozen, kept) tensor counts."""
    keep_ids = {id(p) for p in keep}
    frozen = 0
    for p in model.parameters():
        if id(p) in keep_ids:
            p.stop_gradient = False
        else:
            p.stop_gradient = True
            frozen += 1
    return frozen, len(keep_ids)


def _untrained_above_backbone(model, head_params: list) -> list[str]:
    """Weight matrices above the backbone (``layer_id == num_layers``) outside the head: a dual-eye model's
    branches and fusion layers, which lp/lora leave frozen (1-D norms such as the ViT's fc_norm not listed)."""
    if not hasattr(model, "layer_id"):
        return []
    head_ids = {id(p) for p in head_params}
    top = int(model.num_layers)
    return [n for n, p in model.named_parameters()
            if id(p) not in head_ids and p.ndim > 1 and int(model.layer_id(n)) == top]


# ----------------------------------------------------------------------------------------------- LoRA
class LoRAHook:
    """The forward post-hook of an adapted qkv Linear: adds ``scale * [h A_q B_q, 0, h A_v B_v]``, ``h`` the
    layer's input after dropout (only in train mode). The matrices are parameters of the layer itself."""

    def __init__(self, rank: int, alpha: float, dropout: float):
        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        self.scale = self.alpha / self.rank

    def __call__(self, layer, inputs, output):
        import paddle
        import paddle.nn.functional as F

        h = inputs[0]
        if self.dropout > 0:
            h = F.dropout(h, p=self.dropout, training=layer.training)
        dq = paddle.matmul(paddle.matmul(h, layer.lora_a_q) * self.scale, layer.lora_b_q)
        dv = paddle.matmul(paddle.matmul(h, layer.lora_a_v) * self.scale, layer.lora_b_v)
        return output + paddle.concat([dq, paddle.zeros_like(dq), dv], axis=-1)


def lora_targets(model) -> list[tuple[str, object]]:
    """``[(name, layer)]``: the fused qkv Linears LoRA adapts (``*.attn.qkv``, weight ``[dim, 3 * dim]``);
    ``UserError`` when the model has none (a CNN)."""
    import paddle

    found = [(n, m) for n, m in model.named_sublayers()
             if (n == LORA_TARGET or n.endswith("." + LORA_TARGET)) and isinstance(m, paddle.nn.Linear)
             and m.weight.shape[1] == 3 * m.weight.shape[0]]
    if not found:
        raise UserError(f"--adaptation lora: {type(model).__name__} has no attention qkv projection (expected ViT "
                        f"blocks with a fused '{LORA_TARGET}' Linear, where LoRA adapts the q and v parts); use "
                        "--adaptation finetune or lp with this model, or a ViT model (retfound_mae, vit_*)")
    return found


def add_lora(model, rank: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Attach LoRA adapters (``LoRAHook`` + four parameters) to every qkv Linear of ``model``; returns the
    adapted layers' names. The draws of ``A`` use Paddle's global generator (``paddle.seed``)."""
    import paddle

    names = []
    for name, layer in lora_targets(model):
        if hasattr(layer, "_lora_hook"):
            raise ValueError(f"add_lora: {name} already has adapters")
        dim_in, dim_out = layer.weight.shape[0], layer.weight.shape[1] // 3
        bound = 1.0 / math.sqrt(dim_in)  # kaiming_uniform(a=sqrt(5)) of a [rank, in] matrix, as PEFT's lora_A
        for key, shape in (("lora_a_q", [dim_in, rank]), ("lora_b_q", [rank, dim_out]),
                           ("lora_a_v", [dim_in, rank]), ("lora_b_v", [rank, dim_out])):
            init = (paddle.nn.initializer.Uniform(-bound, bound) if key.startswith("lora_a")
                    else paddle.nn.initializer.Constant(0.0))
            param = layer.create_parameter(shape, dtype=layer.weight.dtype, default_initializer=init)
            layer.add_parameter(key, param)
        layer._lora_hook = layer.register_forward_post_hook(LoRAHook(rank, alpha, dropout))
        layer._lora_scale = alpha / rank
        names.append(name)
    return names


def _adapted(model) -> list[tuple[str, object]]:
    return [(n, m) for n, m in model.named_sublayers() if hasattr(m, "_lora_hook")]


def has_lora(model) -> bool:
    return bool(_adapted(model))


def lora_delta(layer):
    """``scale * [A_q B_q, 0, A_v B_v]``: what the adapters add to the layer's ``[in, 3 * dim]`` weight."""
    import paddle

    dq = paddle.matmul(layer.lora_a_q, layer.lora_b_q) * layer._lora_scale
    dv = paddle.matmul(layer.lora_a_v, layer.lora_b_v) * layer._lora_scale
    return paddle.concat([dq, paddle.zeros_like(dq), dv], axis=-1)


def merged_state_dict(model) -> dict:
    """``model.state_dict()`` with every adapter merged into its ``qkv.weight`` and the adapter keys left out:
    the state of the plain model that computes what the adapted one does. The model is not changed."""
    import paddle

    state = model.state_dict()
    with paddle.no_grad():
        for name, layer in _adapted(model):
            state[f"{name}.weight"] = layer.weight + lora_delta(layer)
            for key in LORA_KEYS:
                state.pop(f"{name}.{key}", None)
    return state


def merge_lora(model) -> int:
    """Add every adapter's delta into its ``qkv.weight`` and remove the adapter (hook and parameters), in place;
    returns the number of layers merged. The model is then a plain model of its architecture."""
    import paddle

    adapted = _adapted(model)
    with paddle.no_grad():
        for _, layer in adapted:
            layer.weight.set_value(layer.weight + lora_delta(layer))
            layer._lora_hook.remove()
            for key in LORA_KEYS:
                delattr(layer, key)
            del layer._lora_hook, layer._lora_scale
    return len(adapted)


# ----------------------------------------------------------------------------------------------- the run
def _load_with_hint(load: Callable[[], dict | None]) -> dict | None:
    """``load()``; a key error about LoRA adapter keys gets the explanation of the two checkpoints."""
    try:
        return load()
    except UserError as exc:
        if "lora_" not in str(exc):
            raise
        raise UserError(f"{exc} (a LoRA run's checkpoint-last keeps the adapters, to resume it with --resume; "
                        "its checkpoint-best has them merged into the weights, a plain model: evaluate, predict or "
                        "export that one, or start a new run from it with --finetune)") from None


@dataclass(frozen=True)
class Adaptation:
    """What a run trains (the flags of the same names); ``prepare`` applies it to the model. ``lp_cached_features``
    is only checked here (``lp`` freezing); ``util.training.fit`` trains on the cached features."""
    adaptation: str = "finetune"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    freeze_backbone: bool = False
    lp_cached_features: bool = False

    def prepare(self, model, load: Callable[[], dict | None], resume: str, eval_only: bool, say) -> dict | None:
        """Load the weights (``load()``, returning the resumed checkpoint or ``None``) and adapt ``model``
        (``--eval``: only load; every checkpoint this toolkit evaluates is a plain model).

        LoRA adapters are added after pretrained weights are loaded, and before a resumed LoRA run's weights
        are (its checkpoint-last holds them). Returns what ``load`` returned."""
        if eval_only:
            return _load_with_hint(load)
        method, resuming = self.adaptation, bool(resume)
        if method not in ADAPTATIONS:
            raise UserError(f"--adaptation {method!r}: unknown (expected one of {', '.join(ADAPTATIONS)}); "
                            "fix the value")
        lora = method == "lora"
        if lora:
            lora_targets(model)  # a CNN fails here, before any weights are read
        if lora and resuming:
            add_lora(model, self.lora_rank, self.lora_alpha, self.lora_dropout)
        state = _load_with_hint(load)
        if lora and not resuming:
            add_lora(model, self.lora_rank, self.lora_alpha, self.lora_dropout)
        if self.freeze_backbone:
            from util.lr_decay import freeze_backbone

            say(f"--freeze_backbone: {freeze_backbone(model)} backbone parameter tensors frozen; training the head "
                "only")
        if method == "finetune":
            return state
        head = _head_parameters(model)
        adapters = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in LORA_KEYS]
        frozen, _ = freeze_all_but(model, head + adapters)
        n_head = sum(int(math.prod(p.shape)) for p in head)
        n_adapt = sum(int(math.prod(p.shape)) for p in adapters)
        n_base = sum(int(math.prod(p.shape)) for p in model.parameters()) - n_adapt
        share = f"{100 * (n_head + n_adapt) / max(n_base, 1):.2f}% of the model's {n_base / 1e6:.2f} M"
        if lora:
            say(f"adaptation lora: rank {self.lora_rank}, alpha {self.lora_alpha:g} (scale "
                f"{self.lora_alpha / self.lora_rank:g}), dropout {self.lora_dropout:g} on q and v of "
                f"{len(_adapted(model))} attention qkv projections; trainable: {n_adapt:,} adapter + {n_head:,} "
                f"head parameters ({share}); {frozen} tensors frozen; checkpoint-best is saved merged")
        else:
            say(f"adaptation lp (linear probe): only the head trains, {n_head:,} parameters ({share}); {frozen} "
                "tensors frozen (left out of the optimizer and of weight decay)")
        left = _untrained_above_backbone(model, head)
        if left:
            say(f"warning: --adaptation {method} trains only the head of {type(model).__name__}: the layers "
                f"between its backbone and head ({', '.join(left[:4])}{', ...' if len(left) > 4 else ''}) keep "
                "their initial weights; --freeze_backbone trains them with the head")
        return state
