"""Regenerate tests/fixtures/convert/ with PyTorch itself (dev only; the tests never import torch).

    TORCH_PYTHON tools/make_convert_fixtures.py     # from the repository root

TORCH_PYTHON: the Python interpreter of an environment with PyTorch (and safetensors, timm); the toolkit's
own environment needs none of them.

Writes small files the way real checkpoints are written, and the values PyTorch itself reads back:

* ``mae_checkpoint.pth``: an MAE/RETFound-layout training checkpoint of a tiny MAE (patch 4, width 16):
  ``{'model', 'optimizer' (AdamW after one step), 'epoch', 'scaler' (GradScaler.state_dict()), 'args'
  (argparse.Namespace)}``, as MAE's ``misc.save_model`` builds it.
* ``bare_state_dict.pth``: a fine-tuned tiny ViT classifier's ``state_dict()`` (fc_norm + head).
* ``dtypes.pth``: one tensor per dtype (float16, bfloat16, float64, int64, int32, int16, int8, uint8,
  bool), a 0-d tensor and an empty tensor.
* ``strided.pth``: tensors that are views sharing one storage: a transpose, a column slice with an
  offset, an expand (stride 0), a permuted 3-D view, a narrowed Parameter.
* ``legacy.pth``: the pre-1.6 layout (``_use_new_zipfile_serialization=False``).
* ``tensors.safetensors``: float32/float16/bfloat16 tensors written by ``safetensors.torch``.
* ``misc.pth``: a bare untyped storage, a torch dtype, device and Size, numpy scalar/array, a set.
* ``expected.npz``: every tensor as ``tensor.numpy()`` (bfloat16 via ``.float()``), keyed
  ``<file>::<path>``; ``expected.json``: the checkpoint's non-tensor metadata and the names of the
  modules that are ``torch.nn.Linear`` in the tiny MAE and ViT.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types

sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('torchvision._meta_registrations'))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from timm.models.vision_transformer import Block, PatchEmbed  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', 'fixtures', 'convert')


class TinyMAE(torch.nn.Module):
    """The parameter layout of MAE's MaskedAutoencoderViT at a toy size (forward is not needed)."""

    def __init__(self, img=8, patch=4, dim=16, depth=2, heads=2, ddim=8, ddepth=1):
        super().__init__()
        self.patch_embed = PatchEmbed(img, patch, 3, dim)
        n = self.patch_embed.num_patches
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim) * .02)
        self.pos_embed = torch.nn.Parameter(torch.randn(1, n + 1, dim) * .02)
        self.blocks = torch.nn.ModuleList([Block(dim, heads, 4., qkv_bias=True) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = torch.nn.Linear(dim, ddim)
        self.mask_token = torch.nn.Parameter(torch.randn(1, 1, ddim) * .02)
        self.decoder_pos_embed = torch.nn.Parameter(torch.randn(1, n + 1, ddim) * .02)
        self.decoder_blocks = torch.nn.ModuleList([Block(ddim, heads, 4., qkv_bias=True) for _ in range(ddepth)])
        self.decoder_norm = torch.nn.LayerNorm(ddim, eps=1e-6)
        self.decoder_pred = torch.nn.Linear(ddim, patch * patch * 3)


class TinyViT(torch.nn.Module):
    """A fine-tuned classifier's layout in global-pool mode (fc_norm + head, no final norm)."""

    def __init__(self, img=8, patch=4, dim=16, depth=1, heads=2, classes=3):
        super().__init__()
        self.patch_embed = PatchEmbed(img, patch, 3, dim)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = torch.nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, dim))
        self.blocks = torch.nn.ModuleList([Block(dim, heads, 4., qkv_bias=True) for _ in range(depth)])
        self.fc_norm = torch.nn.LayerNorm(dim, eps=1e-6)
        self.head = torch.nn.Linear(dim, classes)


def mae_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument('--batch_size', type=int, default=64)
    p.add_argument('--epochs', type=int, default=800)
    p.add_argument('--accum_iter', type=int, default=1)
    p.add_argument('--model', default='mae_vit_large_patch16')
    p.add_argument('--input_size', type=int, default=224)
    p.add_argument('--mask_ratio', type=float, default=0.75)
    p.add_argument('--norm_pix_loss', action='store_true')
    p.add_argument('--weight_decay', type=float, default=0.05)
    p.add_argument('--lr', type=float, default=None)
    p.add_argument('--blr', type=float, default=1.5e-4)
    p.add_argument('--data_path', default='/data/retina/')
    p.add_argument('--device', default='cuda')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--dist_url', default='env://')
    args = p.parse_args(['--norm_pix_loss'])
    args.lr = args.blr * args.batch_size / 256  # MAE writes the effective LR back into args
    args.distributed = False
    return args


def tensor_value(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return t.float().numpy().copy() if t.dtype == torch.bfloat16 else t.numpy().copy()


def collect(prefix: str, obj, out: dict) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = tensor_value(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            collect(f'{prefix}/{k}', v, out)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    expected: dict[str, np.ndarray] = {}
    meta: dict = {}

    mae = TinyMAE()
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    sum(p.square().sum() for p in mae.parameters()).backward()
    opt.step()
    scaler = torch.amp.GradScaler('cpu')
    args = mae_args()
    ckpt = {'model': mae.state_dict(), 'optimizer': opt.state_dict(), 'epoch': 799,
            'scaler': scaler.state_dict(), 'args': args}
    torch.save(ckpt, os.path.join(OUT, 'mae_checkpoint.pth'))
    collect('mae_checkpoint.pth::', {'model': ckpt['model'], 'optimizer': ckpt['optimizer']['state']}, expected)
    meta['mae_checkpoint.pth'] = {
        'epoch': 799, 'scaler': ckpt['scaler'], 'args': vars(args),
        'param_groups': [{k: v for k, v in g.items() if isinstance(v, (int, float, str, tuple, list, bool))}
                         for g in ckpt['optimizer']['param_groups']],
        'model_keys': list(ckpt['model'].keys()),
        'linear_weights': [f'{n}.weight' for n, m in mae.named_modules() if isinstance(m, torch.nn.Linear)],
    }

    vit = TinyViT()
    torch.save(vit.state_dict(), os.path.join(OUT, 'bare_state_dict.pth'))
    collect('bare_state_dict.pth::', vit.state_dict(), expected)
    meta['bare_state_dict.pth'] = {
        'model_keys': list(vit.state_dict().keys()),
        'linear_weights': [f'{n}.weight' for n, m in vit.named_modules() if isinstance(m, torch.nn.Linear)],
    }

    g = torch.Generator().manual_seed(1)
    base = torch.randn(5, 7, generator=g)
    dtypes = {
        'float16': (base * 3).half(), 'bfloat16': (base * 3).bfloat16(), 'float64': base.double() / 3,
        'int64': torch.arange(-6, 6).reshape(3, 4) * (2 ** 40), 'int32': torch.arange(-6, 6, dtype=torch.int32),
        'int16': torch.tensor([-300, 0, 300], dtype=torch.int16), 'int8': torch.tensor([-128, 0, 127], dtype=torch.int8),
        'uint8': torch.tensor([0, 7, 255], dtype=torch.uint8), 'bool': base > 0,
        'scalar': torch.tensor(3.25), 'empty': torch.zeros(0, 4),
    }
    torch.save(dtypes, os.path.join(OUT, 'dtypes.pth'))
    collect('dtypes.pth::', dtypes, expected)

    storage = torch.arange(60, dtype=torch.float32)
    grid = storage.view(6, 10)
    strided = {
        'transposed': grid.t(),
        'column_slice': grid[1:5, 3],
        'block_slice': grid[2:4, 4:9],
        'expanded': storage[10:13].expand(4, 3),
        'permuted': storage.view(3, 4, 5).permute(2, 0, 1),
        'parameter_narrowed': torch.nn.Parameter(grid[:, 2:6], requires_grad=False),
        'contiguous_offset': storage[40:50].view(2, 5),
    }
    assert not strided['transposed'].is_contiguous() and strided['contiguous_offset'].storage_offset() == 40
    torch.save(strided, os.path.join(OUT, 'strided.pth'))
    collect('strided.pth::', strided, expected)

    legacy = {'model': {'w': base.clone(), 'h': base.half()}, 'epoch': 3}
    torch.save(legacy, os.path.join(OUT, 'legacy.pth'), _use_new_zipfile_serialization=False)
    collect('legacy.pth::', legacy, expected)

    st = {'blocks.0.mlp.fc1.weight': base.clone(), 'half': base.half(), 'bf16': (base * 5).bfloat16()}
    save_file(st, os.path.join(OUT, 'tensors.safetensors'), metadata={'format': 'pt'})
    collect('tensors.safetensors::', st, expected)

    misc = {'untyped_storage': torch.arange(5, dtype=torch.float32).untyped_storage(), 'dtype': torch.float16,
            'device': torch.device('cpu'), 'size': torch.Size([2, 3]), 'np_float': np.float64(0.5),
            'np_array': np.arange(3), 'set': {1, 2}}
    torch.save(misc, os.path.join(OUT, 'misc.pth'))
    expected['misc.pth::/untyped_storage'] = np.frombuffer(bytes(misc['untyped_storage']), dtype=np.uint8).copy()
    expected['misc.pth::/np_array'] = misc['np_array']

    np.savez_compressed(os.path.join(OUT, 'expected.npz'), **expected)
    with open(os.path.join(OUT, 'expected.json'), 'w') as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f'wrote {len(os.listdir(OUT))} files, {total / 1024:.0f} KiB, torch {torch.__version__}, to {OUT}')


if __name__ == '__main__':
    main()
