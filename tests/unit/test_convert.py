"""Checkpoint reading (no torch) and torch -> Paddle conversion.

Expected values come from PyTorch itself: tools/make_convert_fixtures.py saved the fixtures with torch.save
and stored ``tensor.numpy()`` of every tensor in expected.npz (regenerate with the torch dev venv).
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

from helpers import FIXTURES, ROOT
from models.checkpoint_io import read_checkpoint, storage_views
from models.convert import (
    STATE_DICT_KEYS,
    drop_keys,
    find_state_dict,
    is_mae_decoder_key,
    main,
    save_pdparams,
    source_format_for,
    to_paddle_state_dict,
    torch_to_paddle,
)
from util.errors import UserError

FIX = os.path.join(FIXTURES, 'convert')
EXPECTED = dict(np.load(os.path.join(FIX, 'expected.npz')))
META = json.load(open(os.path.join(FIX, 'expected.json')))


def fixture(name: str) -> str:
    return os.path.join(FIX, name)


def expected_for(fname: str) -> dict[str, np.ndarray]:
    prefix = f'{fname}::'
    return {k[len(prefix):]: v for k, v in EXPECTED.items() if k.startswith(prefix)}


def flatten(obj, prefix: str = '') -> dict[str, np.ndarray]:
    """Arrays of a nested dict keyed like the generator's ``collect`` ('/a/b')."""
    out = {}
    if isinstance(obj, np.ndarray):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f'{prefix}/{k}'))
    return out


def assert_same_arrays(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype, k
        assert g.shape == w.shape, k
        assert np.array_equal(g, w), k


# ------------------------------------------------------------------------------------------------
# reading: values identical to what torch itself reads

@pytest.mark.parametrize('fname', ['dtypes.pth', 'strided.pth', 'bare_state_dict.pth', 'legacy.pth',
                                   'tensors.safetensors'])
@pytest.mark.parametrize('use_mmap', [True, False])
def test_reader_matches_torch_values(fname, use_mmap):
    obj = read_checkpoint(fixture(fname), mmap=use_mmap)
    assert_same_arrays(flatten(obj), expected_for(fname))


def test_mae_checkpoint_model_and_optimizer_match_torch():
    obj = read_checkpoint(fixture('mae_checkpoint.pth'))
    got = flatten({'model': obj['model'], 'optimizer': obj['optimizer']['state']})
    assert_same_arrays(got, expected_for('mae_checkpoint.pth'))
    assert list(obj['model']) == META['mae_checkpoint.pth']['model_keys']  # order kept (OrderedDict)


def test_storages_torch_objects_and_numpy_values():
    obj = read_checkpoint(fixture('misc.pth'))
    assert_same_arrays({k: v for k, v in flatten(obj).items()}, expected_for('misc.pth'))
    assert obj['untyped_storage'].view(np.float32).tolist() == [0, 1, 2, 3, 4]
    assert obj['dtype'] == 'torch.float16' and obj['device'] == 'cpu' and obj['size'] == (2, 3)
    assert obj['np_float'] == 0.5 and obj['set'] == {1, 2}


def test_dtypes_and_special_shapes():
    obj = read_checkpoint(fixture('dtypes.pth'))
    assert obj['bfloat16'].dtype == np.float32  # widened: numpy has no bfloat16
    assert obj['float16'].dtype == np.float16 and obj['int64'].dtype == np.int64 and obj['bool'].dtype == bool
    assert obj['scalar'].shape == () and obj['scalar'] == 3.25
    assert obj['empty'].shape == (0, 4)
    # bf16 keeps only 8 mantissa bits: the widened values differ from the fp32 source but equal torch's
    assert not np.array_equal(obj['bfloat16'], obj['float16'].astype(np.float32))


def test_strided_tensors_are_contiguous_copies_and_contiguous_ones_are_views():
    obj = read_checkpoint(fixture('strided.pth'))
    for name in ('transposed', 'column_slice', 'block_slice', 'expanded', 'permuted', 'parameter_narrowed'):
        assert obj[name].flags.c_contiguous, name
    obj['expanded'][0, 0] = -1.0  # an expand (stride 0) became real memory: other rows unaffected
    assert obj['expanded'][1, 0] == 10.0
    off = obj['contiguous_offset']
    assert not off.flags.owndata and off[0, 0] == 40.0  # a view into the mapped file at element offset 40


def test_recompressed_zip_still_reads_torch_values(tmp_path):
    # someone re-zipped the checkpoint with deflate: storages cannot be mapped, they are decompressed once
    src, dst = fixture('strided.pth'), str(tmp_path / 'deflated.pth')
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w', zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    assert_same_arrays(flatten(read_checkpoint(dst)), expected_for('strided.pth'))


def test_mapped_arrays_survive_replacing_the_file(tmp_path):
    path = str(tmp_path / 'w.pth')
    with open(fixture('bare_state_dict.pth'), 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data)
    obj = read_checkpoint(path)
    with open(str(tmp_path / 'new.pth'), 'wb') as f:
        f.write(b'PK' + b'\0' * len(data))
    os.replace(str(tmp_path / 'new.pth'), path)
    obj['head.weight'][0, 0] = 123.0  # copy-on-write: writable, never written back
    want = expected_for('bare_state_dict.pth')
    assert np.array_equal(obj['blocks.0.attn.qkv.weight'], want['/blocks.0.attn.qkv.weight'])


def test_mae_metadata_readable():
    obj = read_checkpoint(fixture('mae_checkpoint.pth'))
    meta = META['mae_checkpoint.pth']
    assert obj['epoch'] == meta['epoch'] == 799
    assert isinstance(obj['args'], types.SimpleNamespace)
    assert vars(obj['args']) == meta['args']
    assert obj['args'].model == 'mae_vit_large_patch16' and obj['args'].norm_pix_loss is True
    assert obj['scaler'] == meta['scaler'] and obj['scaler']['scale'] == 65536.0
    groups = obj['optimizer']['param_groups']
    assert len(groups) == len(meta['param_groups'])
    for got, want in zip(groups, meta['param_groups']):
        assert got['lr'] == want['lr'] and list(got['betas']) == want['betas']
        assert got['weight_decay'] == want['weight_decay'] and got['params'] == want['params']


def test_keys_filter_never_reads_optimizer_storages(monkeypatch):
    requested = []
    real = storage_views._StorageSource.storage

    def spy(self, ref):
        requested.append(ref.key)
        return real(self, ref)

    monkeypatch.setattr(storage_views._StorageSource, 'storage', spy)
    obj = read_checkpoint(fixture('mae_checkpoint.pth'), keys=('model', 'epoch'))
    assert sorted(obj) == ['epoch', 'model']
    n_model = len(META['mae_checkpoint.pth']['model_keys'])
    assert len(requested) == n_model  # one storage per parameter, none of the optimizer's
    requested.clear()
    read_checkpoint(fixture('mae_checkpoint.pth'))
    assert len(requested) > 3 * n_model  # unfiltered: exp_avg, exp_avg_sq and step for each parameter too


def test_keys_filter_on_bare_state_dict_returns_everything():
    obj = read_checkpoint(fixture('bare_state_dict.pth'), keys=STATE_DICT_KEYS)
    assert list(obj) == META['bare_state_dict.pth']['model_keys']


def test_safetensors_agrees_with_safetensors_package():
    from safetensors import safe_open  # its numpy API cannot give bfloat16, so compare the other tensors
    ours = read_checkpoint(fixture('tensors.safetensors'))
    with safe_open(fixture('tensors.safetensors'), framework='numpy') as f:
        for name in ('blocks.0.mlp.fc1.weight', 'half'):
            ref = f.get_tensor(name)
            assert ours[name].dtype == ref.dtype and np.array_equal(ours[name], ref)


def test_pdparams_matches_paddle_load(tmp_path):
    import paddle
    layer = paddle.nn.Sequential(paddle.nn.Linear(4, 3), paddle.nn.LayerNorm(3))
    path = str(tmp_path / 'w.pdparams')
    paddle.save(layer.state_dict(), path)
    ref = paddle.load(path, return_numpy=True)
    ours = read_checkpoint(path)
    ours.pop('StructuredToParameterName@@', None)
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert np.array_equal(ours[k], ref[k])
    sd, report = to_paddle_state_dict(read_checkpoint(path), 'paddle')
    assert report['transposed'] == [] and np.array_equal(sd['0.weight'], ref['0.weight'])


# ------------------------------------------------------------------------------------------------
# refusing code in pickles

class _Payload:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: str):
    import builtins
    return {
        'os.system': _Payload(os.system, (f'touch {marker}',)),
        'builtins.eval': _Payload(builtins.eval, (f"open({marker!r}, 'w').close()",)),
        'builtins.exec': _Payload(builtins.exec, (f"open({marker!r}, 'w').close()",)),
        'subprocess.Popen': _Payload(subprocess.Popen, (['touch', marker],)),
    }


def _torch_style_zip(path: str, payload) -> None:
    data = pickle.dumps({'model': {'w': payload}, 'epoch': 1}, protocol=2)
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
        zf.writestr('archive/data.pkl', data)
        zf.writestr('archive/byteorder', 'little')
        zf.writestr('archive/version', '3\n')


@pytest.mark.parametrize('kind', ['os.system', 'builtins.eval', 'builtins.exec', 'subprocess.Popen'])
def test_malicious_pickle_in_torch_zip_is_refused_and_not_run(tmp_path, kind):
    marker = str(tmp_path / 'pwned')
    payload = _payloads(marker)[kind]
    path = str(tmp_path / 'evil.pth')
    _torch_style_zip(path, payload)
    with pytest.raises(UserError) as err:
        read_checkpoint(path)
    msg = str(err.value)
    func_module = payload.func.__module__  # os.system pickles as posix.system
    assert path in msg and 'refused' in msg and 'run code' in msg
    assert f'{func_module}.{payload.func.__name__}' in msg
    assert not os.path.exists(marker)


def test_malicious_payload_would_run_with_plain_pickle(tmp_path):
    # proves the payload used above is live: an unrestricted load runs it
    marker = str(tmp_path / 'pwned')
    pickle.loads(pickle.dumps(_payloads(marker)['os.system'], protocol=2))
    assert os.path.exists(marker)


@pytest.mark.parametrize('ext', ['.pdparams', '.pth'])
def test_malicious_plain_pickle_refused(tmp_path, ext):
    marker = str(tmp_path / 'pwned')
    path = str(tmp_path / f'evil{ext}')
    with open(path, 'wb') as f:
        pickle.dump({'w': np.ones(2), 'x': _payloads(marker)['builtins.eval']}, f, protocol=4)
    with pytest.raises(UserError, match='builtins.eval'):
        read_checkpoint(path)
    assert not os.path.exists(marker)


# ------------------------------------------------------------------------------------------------
# bad files

def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(UserError, match='not found'):
        read_checkpoint(str(tmp_path / 'nope.pth'))
    bad = tmp_path / 'weights.txt'
    bad.write_text('x')
    with pytest.raises(UserError, match=r"unsupported checkpoint extension '\.txt'.*\.pth"):
        read_checkpoint(str(bad))
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    with pytest.raises(UserError, match='empty'):
        read_checkpoint(str(empty))


def test_truncated_checkpoint_is_a_user_error(tmp_path):
    data = open(fixture('mae_checkpoint.pth'), 'rb').read()
    path = tmp_path / 'cut.pth'
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match='cut.pth'):
        read_checkpoint(str(path))


def test_torchscript_archive_is_explained(tmp_path):
    path = str(tmp_path / 'scripted.pt')
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr('scripted/data.pkl', pickle.dumps({}))
        zf.writestr('scripted/constants.pkl', pickle.dumps(()))
        zf.writestr('scripted/code/__torch__.py', '')
    with pytest.raises(UserError, match='TorchScript'):
        read_checkpoint(path)


# ------------------------------------------------------------------------------------------------
# conversion rules

def _arrays(*names, shape=(2, 3)):
    return {n: np.arange(np.prod(shape), dtype=np.float32).reshape(shape) for n in names}


def test_find_state_dict_precedence_and_ddp_prefix():
    a, b, c = _arrays('x.weight'), _arrays('y.weight'), _arrays('z.weight')
    assert list(find_state_dict({'model': a, 'state_dict': b, 'model_ema': c})[0]) == ['x.weight']
    assert list(find_state_dict({'state_dict': b, 'model_ema': c, 'epoch': 3})[0]) == ['y.weight']
    assert list(find_state_dict({'model_ema': c, 'optimizer': {}})[0]) == ['z.weight']
    assert list(find_state_dict(a)[0]) == ['x.weight']  # bare
    ddp = {'module.blocks.0.attn.qkv.weight': np.zeros((6, 2)), 'module.cls_token': np.zeros((1, 1, 2))}
    sd, where, prefix = find_state_dict({'model': ddp})
    assert where == 'model' and prefix == 'module.' and sorted(sd) == ['blocks.0.attn.qkv.weight', 'cls_token']
    # a mixed prefix is not DDP's: names are kept
    assert 'module.x' in find_state_dict({'module.x': np.zeros(1), 'y': np.zeros(1)})[0]
    # paddle bookkeeping entries are ignored
    assert list(find_state_dict({'w': np.zeros(1), 'StructuredToParameterName@@': {'w': 'linear_0.w_0'}})[0]) == ['w']


def test_find_state_dict_error_lists_top_level_keys():
    with pytest.raises(UserError) as err:
        find_state_dict({'epoch': 3, 'optimizer': {'state': {}}, 'args': types.SimpleNamespace()})
    msg = str(err.value)
    assert "'epoch'" in msg and "'optimizer'" in msg and "'args'" in msg and "'model'" in msg
    with pytest.raises(UserError, match='list'):
        find_state_dict([np.zeros(2)])


@pytest.mark.parametrize('fname', ['mae_checkpoint.pth', 'bare_state_dict.pth'])
def test_torch_to_paddle_transposes_exactly_the_linear_weights(fname):
    want = expected_for(fname)
    model = {k[len('/model/'):] if k.startswith('/model/') else k[1:]: v for k, v in want.items()
             if not k.startswith('/optimizer')}
    sd, report = to_paddle_state_dict(read_checkpoint(fixture(fname)), source_format_for(fname))
    linear = META[fname]['linear_weights']  # names of torch.nn.Linear modules in the torch model
    assert sorted(report['transposed']) == sorted(linear)
    assert sorted(report['kept']) == sorted(model)
    assert sorted(report['unchanged'] + report['transposed']) == sorted(model)
    for name, ref in model.items():
        if name in linear:
            assert sd[name].shape == ref.shape[::-1] and np.array_equal(sd[name], ref.T), name
            assert sd[name].flags.c_contiguous
        else:
            assert sd[name].shape == ref.shape and np.array_equal(sd[name], ref), name
    for name in ('patch_embed.proj.weight', 'pos_embed', 'cls_token', 'blocks.0.norm1.weight'):
        assert name in report['unchanged']
    if fname == 'mae_checkpoint.pth':
        assert {'mask_token', 'decoder_pos_embed', 'decoder_norm.weight'} <= set(report['unchanged'])
        assert {'decoder_embed.weight', 'decoder_pred.weight', 'decoder_blocks.0.attn.qkv.weight'} <= set(linear)
        assert report['source_key'] == 'model'
    else:
        assert 'head.weight' in linear and report['source_key'] is None


def test_transposed_weight_gives_the_same_linear_output_in_paddle():
    import paddle
    rng = np.random.default_rng(0)
    w_torch, b = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    sd, _ = torch_to_paddle({'fc.weight': w_torch, 'fc.bias': b})
    layer = paddle.nn.Linear(3, 5)
    layer.set_state_dict({'weight': sd['fc.weight'], 'bias': sd['fc.bias']})
    x = rng.standard_normal((4, 3)).astype(np.float32)
    ref = x @ w_torch.T + b  # torch.nn.functional.linear
    np.testing.assert_allclose(layer(paddle.to_tensor(x)).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_embedding_tables_and_non_weights_are_not_transposed():
    sd = {'text.token_embedding.weight': np.zeros((10, 4)), 'embeddings.word_embeddings.weight': np.zeros((10, 4)),
          'blocks.0.attn.relative_position_bias_table': np.zeros((9, 2)), 'conv1d.weight': np.zeros((4, 2, 3)),
          'weight': np.zeros((2, 3))}
    out, report = torch_to_paddle(sd)
    assert report['transposed'] == ['weight']  # a bare nn.Linear state dict
    assert out['text.token_embedding.weight'].shape == (10, 4)


def test_copy_false_returns_views_with_equal_values():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    out, _ = torch_to_paddle({'fc.weight': w}, copy=False)
    assert np.shares_memory(out['fc.weight'], w) and np.array_equal(out['fc.weight'], w.T)


def test_to_paddle_state_dict_paddle_source_and_bad_format():
    sd, report = to_paddle_state_dict({'model': _arrays('fc.weight')}, 'paddle')
    assert report['transposed'] == [] and sd['fc.weight'].shape == (2, 3)
    with pytest.raises(UserError, match='source_format'):
        to_paddle_state_dict({'w': np.zeros(1)}, 'jax')


def test_source_format_for():
    assert [source_format_for(p) for p in ('a.pth', 'b.PT', 'c.bin', 'd.safetensors', 'e.pdparams')] == \
        ['torch', 'torch', 'torch', 'torch', 'paddle']
    with pytest.raises(UserError, match='.npz'):
        source_format_for('w.npz')


def test_drop_keys():
    sd = {**_arrays('blocks.0.mlp.fc1.weight', 'decoder_embed.weight'), 'mask_token': np.zeros((1, 1, 2))}
    kept, dropped = drop_keys(sd, is_mae_decoder_key)
    assert list(kept) == ['blocks.0.mlp.fc1.weight'] and dropped == ['decoder_embed.weight', 'mask_token']


# ------------------------------------------------------------------------------------------------
# CLI

def _paddle_encoder(dim=16, depth=2, patch=4, n_tokens=5):
    """A Paddle layer with the tiny MAE encoder's parameter names (timm names)."""
    import paddle
    nn = paddle.nn

    class Attn(nn.Layer):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    class Mlp(nn.Layer):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    class Block(nn.Layer):
        def __init__(self):
            super().__init__()
            self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(dim), Attn(), nn.LayerNorm(dim), Mlp()

    class PatchEmbed(nn.Layer):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2D(3, dim, patch, stride=patch)

    class Encoder(nn.Layer):
        def __init__(self):
            super().__init__()
            self.cls_token = self.create_parameter([1, 1, dim])
            self.pos_embed = self.create_parameter([1, n_tokens, dim])
            self.patch_embed = PatchEmbed()
            self.blocks = nn.LayerList([Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(dim)

    return Encoder()


def test_cli_round_trip_into_paddle_layer(tmp_path, capsys):
    import paddle
    dst = str(tmp_path / 'retfound_tiny.pdparams')
    assert main([fixture('mae_checkpoint.pth'), dst]) == 0
    out = capsys.readouterr().out
    n_model = len(META['mae_checkpoint.pth']['model_keys'])
    dropped = [k for k in META['mae_checkpoint.pth']['model_keys'] if is_mae_decoder_key(k)]
    enc_linear = [k for k in META['mae_checkpoint.pth']['linear_weights'] if not is_mae_decoder_key(k)]
    assert "entry 'model', epoch 799, args.model mae_vit_large_patch16" in out
    assert f'kept {n_model - len(dropped)} arrays' in out
    assert f'transposed {len(enc_linear)} Linear weights: blocks.0.attn.qkv.weight' in out
    assert f'dropped {len(dropped)} MAE decoder keys' in out and 'mask_token' in out
    assert os.listdir(tmp_path) == ['retfound_tiny.pdparams']  # no temporary file left behind

    loaded = paddle.load(dst, return_numpy=True)
    want = {k[len('/model/'):]: v for k, v in expected_for('mae_checkpoint.pth').items() if k.startswith('/model/')}
    assert sorted(loaded) == sorted(k for k in want if not is_mae_decoder_key(k))
    enc = _paddle_encoder()
    missing, unexpected = enc.set_state_dict(paddle.load(dst))
    assert not missing and not unexpected
    for name, p in enc.state_dict().items():
        ref = want[name].T if name in enc_linear else want[name]
        assert np.array_equal(p.numpy(), ref), name


def test_cli_keep_decoder_and_safetensors_source(tmp_path, capsys):
    import paddle
    dst = str(tmp_path / 'full.pdparams')
    assert main([fixture('mae_checkpoint.pth'), dst, '--keep-decoder']) == 0
    assert 'dropped 0 keys' in capsys.readouterr().out
    assert sorted(paddle.load(dst, return_numpy=True)) == sorted(META['mae_checkpoint.pth']['model_keys'])
    dst2 = str(tmp_path / 'st.pdparams')
    assert main([fixture('tensors.safetensors'), dst2]) == 0
    got = paddle.load(dst2, return_numpy=True)
    want = expected_for('tensors.safetensors')
    assert np.array_equal(got['blocks.0.mlp.fc1.weight'], want['/blocks.0.mlp.fc1.weight'].T)
    assert got['bf16'].dtype == np.float32 and np.array_equal(got['bf16'], want['/bf16'])


def test_cli_errors_exit_2_with_one_paragraph(tmp_path, capsys):
    evil = str(tmp_path / 'evil.pth')
    marker = str(tmp_path / 'pwned')
    _torch_style_zip(evil, _payloads(marker)['os.system'])
    txt = tmp_path / 'w.txt'
    txt.write_text('x')
    cases = [
        ([str(tmp_path / 'missing.pth'), str(tmp_path / 'o.pdparams')], 'not found'),
        ([str(txt), str(tmp_path / 'o.pdparams')], 'unsupported checkpoint extension'),
        ([fixture('bare_state_dict.pth'), str(tmp_path / 'o.pth')], 'must end in .pdparams'),
        ([evil, str(tmp_path / 'o.pdparams')], 'refused'),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith('error: ') and needle in err and err.count('\n') == 1 and 'Traceback' not in err
    assert not os.path.exists(marker) and not os.path.exists(tmp_path / 'o.pdparams')


def test_cli_module_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'models.convert', str(tmp_path / 'nope.pth'),
                           str(tmp_path / 'o.pdparams')], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert 'nope.pth: checkpoint file not found' in proc.stderr and 'Traceback' not in proc.stderr


def test_save_pdparams_is_atomic(tmp_path):
    dst = tmp_path / 'w.pdparams'
    dst.write_bytes(b'old')
    with pytest.raises(Exception):  # noqa: B017 (whatever the pickler raises half way)
        save_pdparams({'a': np.zeros(3), 'b': lambda: None}, str(dst))  # unpicklable half way
    assert dst.read_bytes() == b'old' and os.listdir(tmp_path) == ['w.pdparams']
    save_pdparams({'a': np.arange(6.).reshape(2, 3).T}, str(dst))
    back = read_checkpoint(str(dst))
    assert back['a'].flags.c_contiguous and np.array_equal(back['a'], np.arange(6.).reshape(2, 3).T)
