"""Checkpoint conversion to Paddle layout: pure functions on dicts of numpy arrays, plus a one-off CLI.

Parameter names stay those of the PyTorch reference (timm / MAE), so the torch -> Paddle mapping is one
rule: ``torch.nn.Linear`` stores its weight as ``[out, in]`` and ``paddle.nn.Linear`` as ``[in, out]``, so
the 2-D ``*.weight`` arrays of Linear layers are transposed; everything else (conv kernels, norms,
biases, ``pos_embed``, ``cls_token``, ``mask_token``, LayerScale ``gamma``) is copied unchanged.

Self-supervised teachers (DINOv2, as the RETFound_dinov2 checkpoints keep them; iBOT, as VisionFM's do) are
unwrapped first: the ``teacher`` entry is taken, a DDP ``module.`` prefix removed, the ``backbone.`` part kept
without its prefix and the projection heads next to it (``dino_head.*``, ``ibot_head.*``, iBOT's ``head.*``)
dropped; DINOv2's chunked blocks (``blocks.<chunk>.<i>.``) become ``blocks.<i>.``. Every checkpoint gets the
renames RETFound applies to all of them, ``mlp.w12.`` -> ``mlp.fc1.`` and ``mlp.w3.`` -> ``mlp.fc2.``.

    python -m models.convert RETFound_mae_natureCFP.pth retfound_mae_natureCFP.pdparams [--keep-decoder]
    python -m models.convert RETFound_dinov2_meh.pth RETFound_dinov2_meh.pdparams

References: MAE / RETFound checkpoints (``ckpt['model']`` holds encoder and decoder, next to
``optimizer``, ``epoch``, ``scaler``, ``args``); rmaphoh/RETFound ``main_finetune.py`` (``checkpoint['teacher']``,
the ``backbone.`` / ``w12`` / ``w3`` key renames); facebookresearch/dinov2 (teacher checkpoints, ``BlockChunk``);
ABILab-CUHK/VisionFM ``utils.load_pretrained_weights``; timm ``VisionTransformer`` parameter names;
``torch.nn.Linear`` vs ``paddle.nn.Linear`` weight layouts.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
import types
from typing import Any, Callable

import numpy as np

from models.checkpoint_io import (
    PADDLE_EXTENSIONS,
    SAFETENSORS_EXTENSIONS,
    SUPPORTED_EXTENSIONS,
    TORCH_EXTENSIONS,
    read_checkpoint,
)
from util.errors import UserError
from util.fileio import atomic_path

# Where a state dict sits inside a training checkpoint, in order of precedence: the raw weights
# ('model', as MAE/RETFound and timm's train script save them) win over an EMA copy; a self-supervised
# checkpoint's 'teacher' (DINOv2, iBOT) comes last (its 'student' is never read).
STATE_DICT_KEYS = ('model', 'state_dict', 'model_ema', 'state_dict_ema', 'teacher')
TEACHER_KEY = 'teacher'
DDP_PREFIX = 'module.'
BACKBONE_PREFIX = 'backbone.'
# RETFound's main_finetune renames these in every checkpoint (DINOv2's SwiGLU names -> timm's Mlp names)
MLP_RENAMES = (('mlp.w12.', 'mlp.fc1.'), ('mlp.w3.', 'mlp.fc2.'))
_CHUNKED_BLOCK = re.compile(r'^blocks\.\d+\.(\d+)\.')


def _is_paddle_meta_key(name: str) -> bool:
    # paddle.save adds bookkeeping entries such as 'StructuredToParameterName@@'
    return isinstance(name, str) and name.endswith('@@')


def _as_state_dict(value: Any) -> dict[str, np.ndarray] | None:
    """``value`` as a name -> array dict if every (non-bookkeeping) entry is an array, else None."""
    if not isinstance(value, dict):
        return None
    out = {}
    for k, v in value.items():
        if _is_paddle_meta_key(k):
            continue
        if not isinstance(k, str) or not isinstance(v, np.ndarray):
            return None
        out[k] = v
    return out or None


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        n = sum(isinstance(v, np.ndarray) for v in value.values())
        return f'dict of {len(value)} ({n} arrays)'
    if isinstance(value, np.ndarray):
        return f'array{tuple(value.shape)}'
    return type(value).__name__


def find_state_dict(obj: Any) -> tuple[dict[str, np.ndarray], str | None, str]:
    """Locate the weights in a loaded checkpoint.

    Returns ``(state_dict, wrapper_key, stripped_prefix)``: the first of ``STATE_DICT_KEYS`` holding a
    dict of arrays (``wrapper_key``), or the object itself when it is a bare state dict (``None``); a
    ``'module.'`` prefix shared by every name (DDP) is removed and returned as ``stripped_prefix``.
    """
    if isinstance(obj, types.SimpleNamespace):
        obj = vars(obj)
    if not isinstance(obj, dict):
        raise UserError(f'checkpoint: top level is a {type(obj).__name__} (expected a dict of arrays or a dict '
                        f'with one of {", ".join(STATE_DICT_KEYS)}); save model.state_dict() instead')
    sd, where = None, None
    for key in STATE_DICT_KEYS:
        if key in obj:
            sd = _as_state_dict(obj[key])
            if sd is not None:
                where = key
                break
    if sd is None:
        sd = _as_state_dict(obj)
    if sd is None:
        listing = ', '.join(f'{k!r}: {_describe(v)}' for k, v in list(obj.items())[:20])
        more = f' (+{len(obj) - 20} more)' if len(obj) > 20 else ''
        raise UserError(f'checkpoint: no state dict found (expected a dict of name -> tensor, or one under '
                        f'{", ".join(repr(k) for k in STATE_DICT_KEYS)}); top-level keys are {{{listing}}}{more}; '
                        f're-save the weights with torch.save(model.state_dict(), path)')
    prefix = ''
    if all(k.startswith(DDP_PREFIX) for k in sd):
        prefix = DDP_PREFIX
        sd = {k[len(DDP_PREFIX):]: v for k, v in sd.items()}
    return sd, where, prefix


def unwrap_teacher(sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str], str]:
    """The encoder of a self-supervised teacher state dict: ``(backbone_sd, dropped_names, stripped_prefix)``.

    The ``backbone.`` entries are kept without the prefix (an optional DDP ``module.`` in front was removed by
    ``find_state_dict``, or is removed here when only some names carry it); everything else is the projection
    heads of DINO/iBOT and is dropped. DINOv2's chunked blocks (``blocks.<chunk>.<i>.``, where ``i`` counts from
    the first block, the earlier places of a chunk being empty) become ``blocks.<i>.``. A teacher without
    ``backbone.`` names is returned as it is.
    """
    names = {k[len(DDP_PREFIX):] if k.startswith(DDP_PREFIX) else k: k for k in sd}
    if not any(k.startswith(BACKBONE_PREFIX) for k in names):
        return dict(sd), [], ''
    out: dict[str, np.ndarray] = {}
    dropped = []
    for name, original in names.items():
        if name.startswith(BACKBONE_PREFIX):
            new = _CHUNKED_BLOCK.sub(r'blocks.\1.', name[len(BACKBONE_PREFIX):])
            if new in out:
                raise UserError(f'checkpoint: teacher entry {original!r} and another both become {new!r} (expected '
                                f'one backbone entry per name); the checkpoint is not a single DINOv2/iBOT teacher')
            out[new] = sd[original]
        else:
            dropped.append(original)
    return out, dropped, BACKBONE_PREFIX


def rename_mlp_keys(sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """RETFound's ``mlp.w12.`` -> ``mlp.fc1.``, ``mlp.w3.`` -> ``mlp.fc2.``: ``(renamed_sd, old_names_renamed)``.

    A SwiGLU MLP renamed so keeps its own shapes: the model's shape check then says it does not fit (timm's
    Mlp has no gate), instead of loading a wrong layer.
    """
    out: dict[str, np.ndarray] = {}
    renamed = []
    for k, v in sd.items():
        new = k
        for old, repl in MLP_RENAMES:
            new = new.replace(old, repl)
        if new != k:
            renamed.append(k)
        if new in out:
            raise UserError(f'checkpoint: {k!r} and another entry both become {new!r} after the renames '
                            f'mlp.w12. -> mlp.fc1., mlp.w3. -> mlp.fc2. (expected one of them); the checkpoint mixes '
                            f'two MLP layouts, re-save it with one')
        out[new] = v
    return out, renamed


def is_linear_weight(name: str, array: np.ndarray) -> bool:
    """True for the weight of a Linear layer: a 2-D ``*.weight`` that is not an embedding table.

    In the ViT/MAE these are ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``head``,
    ``decoder_embed``, ``decoder_pred`` and the decoder blocks' linears. ``nn.Embedding`` tables
    (``[num, dim]`` in both frameworks) must not be transposed; they are recognised by a module name
    containing ``embedding`` (``token_embedding``, ``word_embeddings``), which the ViT does not use.
    """
    if not (name == 'weight' or name.endswith('.weight')) or array.ndim != 2:
        return False
    module = name[:-len('.weight')].rsplit('.', 1)[-1]
    return 'embedding' not in module.lower()


def torch_to_paddle(sd: dict[str, np.ndarray],
                    is_linear: Callable[[str, np.ndarray], bool] = is_linear_weight,
                    copy: bool = True) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Torch-layout state dict -> Paddle layout (same names, Linear weights transposed).

    Args:
        sd: name -> array, PyTorch layout.
        is_linear: which entries are Linear weights to transpose (default ``is_linear_weight``).
        copy: return transposed weights as C-contiguous copies (default); ``False`` returns transposed
            views, which saves memory when the result is only written to a file.

    Returns:
        ``(paddle_sd, report)`` with ``report = {'kept': [...], 'transposed': [...], 'unchanged': [...]}``
        (names in input order; ``kept`` is every name, the union of the other two).
    """
    out: dict[str, np.ndarray] = {}
    transposed, unchanged = [], []
    for name, array in sd.items():
        if not isinstance(array, np.ndarray):
            raise UserError(f'state dict entry {name!r}: {type(array).__name__} (expected a numpy array); '
                            f'pass the state dict found by find_state_dict')
        if is_linear(name, array):
            out[name] = np.ascontiguousarray(array.T) if copy else array.T
            transposed.append(name)
        else:
            out[name] = array
            unchanged.append(name)
    return out, {'kept': list(out), 'transposed': transposed, 'unchanged': unchanged}


def drop_keys(sd: dict[str, np.ndarray], predicate: Callable[[str], bool]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Split off the entries whose name satisfies ``predicate``: returns ``(kept_sd, dropped_names)``."""
    kept = {k: v for k, v in sd.items() if not predicate(k)}
    return kept, [k for k in sd if k not in kept]


def is_mae_decoder_key(name: str) -> bool:
    """MAE pretraining-only parameters: the decoder (``decoder_*``) and ``mask_token``."""
    return name.startswith('decoder_') or name == 'mask_token'


def source_format_for(path: str) -> str:
    """``'torch'`` for .pth/.pt/.bin/.safetensors (PyTorch layout), ``'paddle'`` for .pdparams."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext in TORCH_EXTENSIONS or ext in SAFETENSORS_EXTENSIONS:
        return 'torch'
    if ext in PADDLE_EXTENSIONS:
        return 'paddle'
    raise UserError(f'{path}: unsupported checkpoint extension {ext or "(none)"!r} (expected one of '
                    f'{", ".join(SUPPORTED_EXTENSIONS)}); rename the file if it is one of these formats')


def to_paddle_state_dict(obj: Any, source_format: str, copy: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Extract the weights of a loaded checkpoint and bring them to Paddle layout.

    Args:
        obj: what ``read_checkpoint`` returned.
        source_format: ``'torch'`` (Linear weights are transposed) or ``'paddle'`` (copied as is);
            ``source_format_for(path)`` picks it from the file name.
        copy: see ``torch_to_paddle``.

    Returns:
        ``(paddle_sd, report)``; report keys: ``source_format``, ``source_key`` (the wrapper entry used,
        e.g. ``'model'`` or ``'teacher'``, or None), ``stripped_prefix``, ``kept``, ``transposed``,
        ``unchanged``, ``renamed`` (the original names of the renamed MLP entries) and ``dropped_heads`` (the
        self-supervised projection heads left out of a teacher), all name lists.
    """
    if source_format not in ('torch', 'paddle'):
        raise UserError(f'source_format {source_format!r} is not supported (expected torch or paddle)')
    sd, where, prefix = find_state_dict(obj)
    dropped_heads: list[str] = []
    if where == TEACHER_KEY:
        sd, dropped_heads, stripped = unwrap_teacher(sd)
        prefix += stripped
    sd, renamed = rename_mlp_keys(sd)
    if source_format == 'torch':
        out, report = torch_to_paddle(sd, copy=copy)
    else:
        out, report = dict(sd), {'kept': list(sd), 'transposed': [], 'unchanged': list(sd)}
    report.update(source_format=source_format, source_key=where, stripped_prefix=prefix, renamed=renamed,
                  dropped_heads=dropped_heads)
    return out, report


class _ContiguousPickler(pickle.Pickler):
    """Pickles every array in C order, so transposed views load back as ordinary C-contiguous arrays."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray) and type(obj) is np.ndarray and not obj.flags.c_contiguous:
            return np.ascontiguousarray(obj).__reduce_ex__(4)
        return NotImplemented


def save_pdparams(sd: dict[str, np.ndarray], path: str) -> None:
    """Write ``sd`` as a pickle of numpy arrays that ``paddle.load`` reads back, atomically (tmp + os.replace).

    Pickled without the memo (``fast`` mode) and with non-contiguous arrays made contiguous one at a
    time, so peak memory stays at about one array instead of the whole file.
    """
    with atomic_path(os.fspath(path), suffix='.pdparams') as tmp:
        with open(tmp, 'wb') as f:
            pickler = _ContiguousPickler(f, protocol=4)
            pickler.fast = True  # a flat dict of arrays has no shared or recursive references
            pickler.dump({k: v for k, v in sd.items()})
            f.flush()
            os.fsync(f.fileno())


def _names(names: list[str], n: int = 4) -> str:
    shown = ', '.join(names[:n])
    return shown + (f', ... (+{len(names) - n} more)' if len(names) > n else '')


def convert_file(src: str, dst: str, keep_decoder: bool = False) -> dict:
    """Read ``src``, convert to Paddle layout, optionally drop the MAE decoder, write ``dst`` (.pdparams).

    Returns the report of ``to_paddle_state_dict`` plus ``dropped`` (names) and ``metadata`` (epoch,
    args.model when the checkpoint has them).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.isdir(dst):
        raise UserError(f'{dst}: is a directory (expected the output file name); pass a file path such as '
                        f'{os.path.join(dst, os.path.splitext(os.path.basename(src))[0] + ".pdparams")}')
    if os.path.splitext(dst)[1].lower() != '.pdparams':
        raise UserError(f'{dst}: output must end in .pdparams (paddle.load reads it); choose a name like '
                        f'{os.path.splitext(dst)[0]}.pdparams')
    out_dir = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(out_dir):
        raise UserError(f'{dst}: output folder {out_dir} does not exist; create it first')
    fmt = source_format_for(src)
    obj = read_checkpoint(src, keys=STATE_DICT_KEYS + ('epoch', 'args'))  # never reads 'optimizer'
    sd, report = to_paddle_state_dict(obj, fmt, copy=False)  # views: the pickler copies one array at a time
    dropped: list[str] = []
    if not keep_decoder:
        sd, dropped = drop_keys(sd, is_mae_decoder_key)
        report['kept'] = [k for k in report['kept'] if k in sd]
        report['transposed'] = [k for k in report['transposed'] if k in sd]
        report['unchanged'] = [k for k in report['unchanged'] if k in sd]
    if not sd:
        raise UserError(f'{src}: nothing left to write after dropping {len(dropped)} MAE decoder keys '
                        f'(expected encoder weights too); pass --keep-decoder to keep them')
    save_pdparams(sd, dst)
    meta = {}
    if isinstance(obj, dict):
        if isinstance(obj.get('epoch'), (int, np.integer)):
            meta['epoch'] = int(obj['epoch'])
        args = obj.get('args')
        if isinstance(args, types.SimpleNamespace) and isinstance(getattr(args, 'model', None), str):
            meta['args.model'] = args.model
    report.update(dropped=dropped, metadata=meta,
                  num_parameters=int(sum(v.size for v in sd.values())))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m models.convert',
        description='Convert a PyTorch (.pth/.pt/.bin/.safetensors) or Paddle (.pdparams) checkpoint into a '
                    'Paddle-layout .pdparams holding only the model weights (no optimizer state).')
    parser.add_argument('src', help='checkpoint to read')
    parser.add_argument('dst', help='output .pdparams (written atomically)')
    parser.add_argument('--keep-decoder', action='store_true',
                        help='keep the MAE decoder (decoder_*) and mask_token (dropped by default: fine-tuning '
                             'uses only the encoder)')
    args = parser.parse_args(argv)
    try:
        report = convert_file(args.src, args.dst, keep_decoder=args.keep_decoder)
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    except OSError as exc:  # read-only folder, full disk: the previous output (if any) is left intact
        print(f'error: {exc.filename or args.dst}: {exc.strerror or exc} (while writing the converted weights); '
              f'free some space or pick a writable destination', file=sys.stderr)
        return 2
    where = f"entry '{report['source_key']}'" if report['source_key'] else 'a bare state dict'
    meta = ''.join(f', {k} {v}' for k, v in report['metadata'].items())
    print(f'read {args.src}: {report["source_format"]} layout, {where}{meta}'
          + (f", stripped prefix '{report['stripped_prefix']}'" if report['stripped_prefix'] else ''))
    print(f'kept {len(report["kept"])} arrays ({report["num_parameters"] / 1e6:.2f}M parameters)')
    print(f'transposed {len(report["transposed"])} Linear weights: {_names(report["transposed"])}')
    print(f'unchanged {len(report["unchanged"])}: {_names(report["unchanged"])}')
    if report['renamed']:
        print(f'renamed {len(report["renamed"])} MLP keys (mlp.w12. -> mlp.fc1., mlp.w3. -> mlp.fc2.): '
              f'{_names(report["renamed"])}')
    if report['dropped_heads']:
        print(f'dropped {len(report["dropped_heads"])} self-supervised head keys (outside the teacher\'s '
              f'backbone): {_names(report["dropped_heads"])}')
    if report['dropped']:
        n = len(report['dropped'])
        what = 'MAE decoder keys' if any(k.startswith('decoder_') for k in report['dropped']) else \
            'mask token' + ('s' if n > 1 else '')
        print(f'dropped {n} {what} (--keep-decoder keeps them): {_names(report["dropped"])}')
    elif not report['dropped_heads']:
        print('dropped 0 keys')
    print(f'wrote {args.dst} ({os.path.getsize(args.dst) / 2**20:.1f} MiB)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
