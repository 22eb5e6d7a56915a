"""Read model checkpoints into numpy arrays, without PyTorch and without running code from the file.

Formats (picked by extension, then checked by content):

* PyTorch zip files written by ``torch.save`` >= 1.6 (``.pth``, ``.pt``, ``.bin``): a zip holding
  ``<prefix>/data.pkl`` (the pickled object tree), ``<prefix>/data/<key>`` (one raw storage per key),
  ``<prefix>/byteorder``. Files written with ``_use_new_zipfile_serialization=False`` (the pre-1.6
  layout) are read too.
* Paddle ``.pdparams`` (a pickle of numpy arrays, as ``paddle.save`` writes it; a Tensor saved inside a
  container is the pair (name, array) and comes back as the array).
* ``.safetensors`` (8-byte header length, JSON header, raw little-endian data).

Pickles are read by a restricted unpickler (``models.checkpoint_io.torch_pickle``): only the globals a checkpoint
needs resolve; any other global makes the whole file refused with a ``UserError``, so nothing named by
the file is ever called.

Tensor data is not duplicated (``models.checkpoint_io.storage_views``): the file is memory-mapped copy-on-write and
each array is a view at its storage's offset inside the (uncompressed) zip, so an array costs page
cache only when it is touched. Non-contiguous tensors are copied once into C order; bfloat16 is widened
to float32 (numpy has no bfloat16). ``keys=('model',)`` keeps only the named top-level entries, so e.g.
optimizer state in a RETFound/MAE checkpoint is never read.

This module holds the public ``read_checkpoint`` (pick the format, then read it) and the per-format
readers: torch zip, torch legacy, pickle (``.pdparams``), safetensors.

References: PyTorch ``torch/serialization.py`` (zip and legacy layouts, persistent ids) and
``torch/_utils.py`` (``_rebuild_tensor_v2`` argument order); the safetensors format description;
Paddle ``paddle/framework/io.py`` (pdparams layout, big-parameter slices).
"""
from __future__ import annotations

import io
import json
import os
import struct
import types
import zipfile
from typing import Any, Iterable

import numpy as np

from models.checkpoint_io.storage_views import (
    _BFLOAT16,
    _contiguous_strides,
    _OffsetStorages,
    _StorageRef,
    _tensor_array,
    _TensorRef,
    _ZipStorages,
)
from models.checkpoint_io.torch_pickle import _materialise, _restricted_load, _storage_type_dtype
from util.errors import UserError

TORCH_EXTENSIONS = ('.pth', '.pt', '.bin')
PADDLE_EXTENSIONS = ('.pdparams',)
SAFETENSORS_EXTENSIONS = ('.safetensors',)
SUPPORTED_EXTENSIONS = TORCH_EXTENSIONS + PADDLE_EXTENSIONS + SAFETENSORS_EXTENSIONS

_TORCH_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


def _select(obj: Any, keys: Iterable[str] | None) -> Any:
    if keys is None or not isinstance(obj, dict):
        return obj
    keys = list(keys)
    if not any(k in obj for k in keys):
        return obj  # a bare state dict: nothing to select among
    return {k: v for k, v in obj.items() if k in keys}


# ----------------------------------------------------------------------------------------------------
# Format readers

def _read_torch_zip(path: str, keys: Iterable[str] | None, use_mmap: bool) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise UserError(f'{path}: not a readable zip ({exc}); the file is corrupt or truncated') from None
    names = zf.namelist()
    if any(n.endswith('/constants.pkl') for n in names) or any('/code/' in n for n in names):
        raise UserError(f'{path}: this is a TorchScript archive (torch.jit.save), not a torch.save checkpoint '
                        f'(expected a state dict); re-save the weights with torch.save(model.state_dict(), path)')
    pkls = [n for n in names if n.count('/') == 1 and n.endswith('/data.pkl')]
    if not pkls:
        raise UserError(f'{path}: zip file without <prefix>/data.pkl (expected a torch.save checkpoint); '
                        f're-save it with torch.save')
    prefix = pkls[0][:-len('/data.pkl')]
    big_endian = False
    if f'{prefix}/byteorder' in names:
        order = zf.read(f'{prefix}/byteorder').decode('ascii', 'replace').strip()
        if order not in ('little', 'big'):
            raise UserError(f'{path}: unknown byteorder {order!r} (expected little or big); the file is corrupt')
        big_endian = order == 'big'

    def persistent_load(pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 4 and pid[0] == 'storage'):
            raise ValueError(f'unsupported persistent id {pid!r}')
        dtype = _storage_type_dtype(pid[1])
        return _StorageRef(str(pid[2]), dtype, pid[4] if len(pid) > 4 else None)

    obj = _restricted_load(io.BytesIO(zf.read(pkls[0])), path, persistent_load)
    obj = _select(obj, keys)
    source = _ZipStorages(path, zf, prefix, use_mmap, big_endian)
    try:
        return _materialise(obj, source, {})
    finally:
        source.close()
        zf.close()


def _read_torch_legacy(path: str, keys: Iterable[str] | None, use_mmap: bool) -> Any:
    """The pre-1.6 layout: pickles of magic, protocol, sys_info, the object, the storage keys, then raw storages."""
    def persistent_load(pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage'):
            raise ValueError(f'unsupported persistent id {pid!r}')
        _, storage_type, root_key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:  # old-style storage views (torch < 1.0)
            raise ValueError('storage views of torch < 1.0 files are not supported')
        return _StorageRef(str(root_key), _storage_type_dtype(storage_type), numel)

    with open(path, 'rb') as f:
        magic = _restricted_load(f, path)
        if not (isinstance(magic, int) and magic == _TORCH_LEGACY_MAGIC):
            return _tensors_as_arrays(_select(_pack_paddle_big_params(magic), keys))  # a plain pickle (e.g. Paddle's) named .pth
        _restricted_load(f, path)  # protocol version
        sys_info = _restricted_load(f, path)
        big_endian = isinstance(sys_info, dict) and sys_info.get('little_endian') is False
        obj = _restricted_load(f, path, persistent_load)
        storage_keys = _restricted_load(f, path)
        dtypes: dict[str, Any] = {}

        def collect(o: Any) -> None:
            if isinstance(o, _TensorRef):
                dtypes[o.storage.key] = o.storage.dtype
            elif isinstance(o, dict):
                for v in o.values():
                    collect(v)
            elif isinstance(o, (list, tuple)):
                for v in o:
                    collect(v)
            elif isinstance(o, types.SimpleNamespace):
                collect(vars(o))
        collect(obj)
        ranges: dict[str, tuple[int, int]] = {}
        file_size = os.path.getsize(path)
        for key in storage_keys:
            header = f.read(8)
            if len(header) != 8 or str(key) not in dtypes:
                raise UserError(f'{path}: legacy torch file with an unreadable storage {key!r}; re-save it with '
                                f'a recent PyTorch (torch.save(torch.load(path), new_path))')
            numel = struct.unpack('<q', header)[0]
            base = np.dtype(np.uint16 if dtypes[str(key)] == _BFLOAT16 else dtypes[str(key)])
            nbytes = numel * base.itemsize
            ranges[str(key)] = (f.tell(), nbytes)
            if f.tell() + nbytes > file_size:
                raise UserError(f'{path}: storage {key!r} runs past the end of the file; the file is truncated')
            f.seek(nbytes, os.SEEK_CUR)
    obj = _select(obj, keys)
    source = _OffsetStorages(path, ranges, use_mmap, big_endian)
    try:
        return _materialise(obj, source, {})
    finally:
        source.close()


def _pack_paddle_big_params(obj: Any) -> Any:
    """paddle.save splits huge arrays into slices described by 'UnpackBigParamInfor@@'; join them back."""
    if isinstance(obj, dict) and 'UnpackBigParamInfor@@' in obj:
        info = obj.pop('UnpackBigParamInfor@@')
        for key, meta in info.items():
            parts = [obj.pop(part) for part in meta['slices']]
            obj[key] = np.concatenate([np.ravel(p) for p in parts]).reshape(meta['OriginShape'])
    return obj


def _tensors_as_arrays(obj: Any) -> Any:
    """``paddle.save`` pickles a Tensor as the pair (name, ndarray); give back the array, as ``paddle.load`` does."""
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], np.ndarray):
        return obj[1]
    if isinstance(obj, dict):
        return type(obj)((k, _tensors_as_arrays(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors_as_arrays(v) for v in obj)
    return obj


def _read_pickle(path: str, keys: Iterable[str] | None) -> Any:
    with open(path, 'rb') as f:
        obj = _restricted_load(f, path)
    return _tensors_as_arrays(_select(_pack_paddle_big_params(obj), keys))


_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': _BFLOAT16, 'I64': np.int64,
    'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U64': np.uint64, 'U32': np.uint32, 'U16': np.uint16,
    'U8': np.uint8, 'BOOL': np.bool_,
}


def _read_safetensors(path: str, keys: Iterable[str] | None, use_mmap: bool) -> dict[str, np.ndarray]:
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(8)
        header_len = struct.unpack('<Q', head)[0] if len(head) == 8 else -1
        if header_len < 2 or 8 + header_len > size:
            raise UserError(f'{path}: not a safetensors file (bad header length); the file is corrupt or '
                            f'has the wrong extension')
        try:
            header = json.loads(f.read(header_len))
        except ValueError as exc:
            raise UserError(f'{path}: safetensors header is not valid JSON ({exc}); the file is corrupt') from None
    data_start = 8 + header_len
    if not isinstance(header, dict):
        raise UserError(f'{path}: safetensors header is a JSON {type(header).__name__} (expected an object of '
                        f'tensor name -> {{dtype, shape, data_offsets}}); the file is corrupt')
    header.pop('__metadata__', None)
    ranges, refs = {}, {}
    for name, meta in header.items():
        try:
            if not isinstance(meta, dict):
                raise TypeError(f'entry is a JSON {type(meta).__name__}, expected an object')
            dtype = _SAFETENSORS_DTYPES[meta['dtype']]
            shape = tuple(int(n) for n in meta['shape'])
            begin, end = (int(x) for x in meta['data_offsets'])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f'{path}: tensor {name!r} has an unsupported dtype or a malformed header entry '
                            f'({type(exc).__name__}: {exc}); expected {{"dtype": one of '
                            f'{", ".join(_SAFETENSORS_DTYPES)}, "shape": [...], "data_offsets": [begin, end]}}'
                            ) from None
        itemsize = 2 if dtype == _BFLOAT16 else np.dtype(dtype).itemsize
        if any(n < 0 for n in shape):
            raise UserError(f'{path}: tensor {name!r} has a negative dimension in shape {shape}; the file is corrupt')
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if end - begin != numel * itemsize or data_start + end > size or begin < 0:
            raise UserError(f'{path}: tensor {name!r} byte range {begin}..{end} does not match shape {shape} '
                            f'or runs past the end of the file; the file is corrupt')
        ranges[name] = (data_start + begin, end - begin)
        storage = _StorageRef(name, dtype, numel)
        refs[name] = _TensorRef(storage, 0, shape, _contiguous_strides(shape))
    # the format lays tensors out one after another: two byte ranges that overlap mean a corrupt (or crafted) file
    spans = sorted((start, start + n, name) for name, (start, n) in ranges.items() if n)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise UserError(f'{path}: tensors {a!r} and {b!r} have overlapping byte ranges; the file is corrupt')
    source = _OffsetStorages(path, ranges, use_mmap, big_endian=False)
    try:
        out = {}
        for name, ref in refs.items():
            if ref.storage.numel == 0:
                base = np.float32 if ref.dtype == _BFLOAT16 else ref.dtype
                out[name] = np.empty(ref.size, dtype=base)
            else:
                out[name] = _tensor_array(ref, source)
        return out
    finally:
        source.close()


def read_checkpoint(path: str, keys: Iterable[str] | None = None, mmap: bool = True) -> Any:
    """Read a checkpoint file into plain Python objects with numpy arrays in place of tensors.

    Args:
        path: a ``.pth``/``.pt``/``.bin`` (torch.save), ``.pdparams`` or ``.safetensors`` file.
        keys: top-level entries to keep when the file holds a dict with at least one of them (e.g.
            ``('model',)`` for an MAE/RETFound checkpoint; ``optimizer`` state is then never read). A dict
            with none of them (a bare state dict) is returned whole.
        mmap: map the file and return copy-on-write views into it (default); ``False`` reads each needed
            storage once into memory. Views stay valid if the file is replaced (``os.replace``) but not if
            it is truncated or rewritten in place.

    Returns:
        The checkpoint's object tree: dicts (``OrderedDict`` kept), lists, numbers, strings,
        ``types.SimpleNamespace`` for ``argparse.Namespace``, and ``numpy.ndarray`` for every tensor
        (same dtype, except bfloat16 -> float32).

    Raises:
        UserError: missing file, unsupported extension, a pickle referencing anything but the allowed
            tensor/container/numpy globals (refused before anything runs), or a corrupt file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f'{path}: checkpoint file not found; check the path (supported: '
                        f'{", ".join(SUPPORTED_EXTENSIONS)})')
    if os.path.isdir(path):
        raise UserError(f'{path}: is a directory (expected a checkpoint file: {", ".join(SUPPORTED_EXTENSIONS)}); '
                        f'pass the file inside it')
    ext = os.path.splitext(path)[1].lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise UserError(f'{path}: unsupported checkpoint extension {ext or "(none)"!r} (expected one of '
                        f'{", ".join(SUPPORTED_EXTENSIONS)}); rename the file if it is one of these formats')
    with open(path, 'rb') as f:
        head = f.read(16)
    if not head:
        raise UserError(f'{path}: the file is empty (expected a checkpoint); download or copy it again')
    if head[:4] == b'PK\x03\x04':
        return _read_torch_zip(path, keys, mmap)
    if head[:1] == b'\x80':  # a pickle: Paddle's .pdparams or the legacy torch layout
        if ext in TORCH_EXTENSIONS:
            return _read_torch_legacy(path, keys, mmap)
        return _read_pickle(path, keys)
    if ext in SAFETENSORS_EXTENSIONS or (len(head) > 8 and head[8:9] == b'{'):
        return _select(_read_safetensors(path, None, mmap), keys)
    raise UserError(f'{path}: unrecognised content (expected a torch.save zip, a pickle or safetensors for '
                    f'extension {ext!r}); the file is corrupt or not a checkpoint')
