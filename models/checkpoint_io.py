"""Read model checkpoints into numpy arrays, without PyTorch and without running code from the file.

Formats (picked by extension, then checked by content):

* PyTorch zip files written by ``torch.save`` >= 1.6 (``.pth``, ``.pt``, ``.bin``): a zip holding
  ``<prefix>/data.pkl`` (the pickled object tree), ``<prefix>/data/<key>`` (one raw storage per key),
  ``<prefix>/byteorder``. Files written with ``_use_new_zipfile_serialization=False`` (the pre-1.6
  layout) are read too.
* Paddle ``.pdparams`` (a pickle of numpy arrays, as ``paddle.save`` writes it).
* ``.safetensors`` (8-byte header length, JSON header, raw little-endian data).

Pickles are read by a restricted unpickler: only the globals a checkpoint needs (tensor rebuild
functions, storage types, ``OrderedDict``, ``argparse.Namespace`` (rebuilt as ``SimpleNamespace``),
numpy scalars/arrays/dtypes, a few builtins) resolve; any other global makes the whole file refused with
a ``UserError``, so nothing named by the file is ever called.

Tensor data is not duplicated: the file is memory-mapped copy-on-write and each array is a view at its
storage's offset inside the (uncompressed) zip, so an array costs page cache only when it is touched.
Non-contiguous tensors are copied once into C order; bfloat16 is widened to float32 (numpy has no
bfloat16). ``keys=('model',)`` keeps only the named top-level entries, so e.g. optimizer state in a
RETFound/MAE checkpoint is never read.

References: PyTorch ``torch/serialization.py`` (zip and legacy layouts, persistent ids) and
``torch/_utils.py`` (``_rebuild_tensor_v2`` argument order); the safetensors format description;
Paddle ``paddle/framework/io.py`` (pdparams layout, big-parameter slices).
"""
from __future__ import annotations

import _compat_pickle
import builtins
import collections
import io
import json
import mmap
import os
import pickle
import struct
import types
import zipfile
from typing import Any, Callable, Iterable

import numpy as np

from util.errors import UserError

TORCH_EXTENSIONS = ('.pth', '.pt', '.bin')
PADDLE_EXTENSIONS = ('.pdparams',)
SAFETENSORS_EXTENSIONS = ('.safetensors',)
SUPPORTED_EXTENSIONS = TORCH_EXTENSIONS + PADDLE_EXTENSIONS + SAFETENSORS_EXTENSIONS

_BFLOAT16 = 'bfloat16'  # marker: stored as uint16 bit patterns, widened to float32 on read

# torch storage class name -> numpy dtype (or the bfloat16 marker)
_STORAGE_DTYPES: dict[str, Any] = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': _BFLOAT16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
    'ComplexFloatStorage': np.complex64, 'ComplexDoubleStorage': np.complex128,
    'UntypedStorage': np.uint8,
}
# torch dtype attribute name -> numpy dtype (or the bfloat16 marker)
_TORCH_DTYPES: dict[str, Any] = {
    'float32': np.float32, 'float': np.float32, 'float64': np.float64, 'double': np.float64,
    'float16': np.float16, 'half': np.float16, 'bfloat16': _BFLOAT16,
    'int64': np.int64, 'long': np.int64, 'int32': np.int32, 'int': np.int32, 'int16': np.int16,
    'short': np.int16, 'int8': np.int8, 'uint8': np.uint8, 'bool': np.bool_,
    'complex64': np.complex64, 'cfloat': np.complex64, 'complex128': np.complex128, 'cdouble': np.complex128,
}
_TORCH_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


# ----------------------------------------------------------------------------------------------------
# Placeholders built while unpickling; arrays are made afterwards, only for the entries that are kept.

class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co. (or a ``torch.float32`` dtype): just a dtype."""

    def __init__(self, name: str, dtype: Any):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f'torch.{self.name}'


class _StorageRef:
    def __init__(self, key: str, dtype: Any, numel: int | None):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """A tensor to be built later: storage + element offset, shape, element strides."""

    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple, dtype: Any = None):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.dtype = storage.dtype if dtype is None else dtype


class _TensorClass:
    """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` as they appear in ``_rebuild_from_type_v2``."""

    def __init__(self, name: str):
        self.name = name


def _as_int_tuple(value: Any, what: str) -> tuple:
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise ValueError(f'tensor {what} must be a tuple of ints, got {value!r}')


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, _StorageRef) or not isinstance(storage_offset, int):
        raise ValueError('malformed tensor record (storage/offset)')
    return _TensorRef(storage, storage_offset, _as_int_tuple(size, 'size'), _as_int_tuple(stride, 'stride'))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    ref = _rebuild_tensor_v2(storage, storage_offset, size, stride)
    if isinstance(dtype, _StorageType):
        ref.dtype = dtype.dtype
    return ref


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, _TensorRef):
        raise ValueError('malformed parameter record')
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter):
        raise ValueError('malformed tensor subclass record')
    return func(*args)


def _torch_device(*args):
    return ':'.join(str(a) for a in args)


def _codecs_encode(obj, encoding='utf-8', errors='strict'):
    # protocol-2 pickles store bytes as _codecs.encode(str, 'latin1'); only allow plain text codecs
    if encoding.lower().replace('_', '-') not in ('latin1', 'latin-1', 'iso-8859-1', 'utf-8', 'utf8', 'ascii'):
        raise ValueError(f'codec {encoding!r} is not allowed in a checkpoint')
    return obj.encode(encoding, errors) if isinstance(obj, str) else bytes(obj)


def _build_allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('argparse', 'Namespace'): types.SimpleNamespace,
        ('_codecs', 'encode'): _codecs_encode,
        ('numpy', 'dtype'): np.dtype,
        ('numpy', 'ndarray'): np.ndarray,
        ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
        ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
        ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
        ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
        ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
        ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
        ('torch', 'Tensor'): _TensorClass('Tensor'),
        ('torch.nn.parameter', 'Parameter'): _TensorClass('Parameter'),
        ('torch', 'Size'): tuple,
        ('torch', 'device'): _torch_device,
    }
    for name in ('set', 'frozenset', 'slice', 'complex', 'bytearray', 'range', 'list', 'dict', 'tuple',
                 'int', 'float', 'bool', 'str', 'bytes'):
        allowed[('builtins', name)] = getattr(builtins, name)
    core = np.core.multiarray
    for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        allowed[(mod, 'scalar')] = core.scalar
        allowed[(mod, '_reconstruct')] = core._reconstruct
    for mod in ('numpy.core.numeric', 'numpy._core.numeric'):
        allowed[(mod, '_frombuffer')] = np.core.numeric._frombuffer
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[('torch', name)] = _StorageType(name, dtype)
    allowed[('torch.storage', 'UntypedStorage')] = _StorageType('UntypedStorage', np.uint8)
    for name, dtype in _TORCH_DTYPES.items():
        allowed[('torch', name)] = _StorageType(name, dtype)
    return allowed


_ALLOWED_GLOBALS = _build_allowed()


def _python3_name(module: str, name: str) -> tuple[str, str]:
    # protocol-2 pickles name globals the Python 2 way (__builtin__.set, commands.Popen): report and
    # match them under the names Python 3 would import
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``_ALLOWED_GLOBALS``; anything else is refused."""

    def __init__(self, file: io.IOBase, source: str, persistent_load: Callable[[Any], Any] | None = None):
        super().__init__(file, encoding='latin1')
        self._source = source
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        module, name = _python3_name(module, name)
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UserError(
                f"{self._source}: refused to load this checkpoint: its pickle references the global "
                f"'{module}.{name}', which is not one of the tensor, storage, container or numpy types a "
                f"checkpoint needs, and loading it would run code chosen by the file; nothing from the file "
                f"was executed (expected only tensors, dicts, numbers, argparse.Namespace); if you trust "
                f"the file, re-save just its weights with PyTorch, e.g. torch.save(ckpt['model'], 'w.pth'), "
                f"or export them to .safetensors") from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise pickle.UnpicklingError('persistent id found in a pickle that should have none')
        return self._persistent(pid)


def _restricted_load(file: io.IOBase, source: str, persistent_load: Callable[[Any], Any] | None = None) -> Any:
    try:
        return _RestrictedUnpickler(file, source, persistent_load).load()
    except UserError:
        raise
    except Exception as exc:  # malformed pickle, wrong argument types to an allowed callable, ...
        raise UserError(f'{source}: cannot read this checkpoint ({type(exc).__name__}: {exc}); '
                        f'the file is corrupt, truncated or in an unsupported layout') from None


def _storage_type_dtype(storage_type: Any) -> Any:
    if isinstance(storage_type, _StorageType):
        return storage_type.dtype
    raise ValueError(f'unknown storage type {storage_type!r}')


# ----------------------------------------------------------------------------------------------------
# Storage sources and array building

class _StorageSource:
    """Gives the raw bytes of a storage as a 1-D numpy array (a view of the mapped file when possible)."""

    def __init__(self, path: str, use_mmap: bool, big_endian: bool):
        self.path = path
        self.big_endian = big_endian
        self._cache: dict[str, np.ndarray] = {}
        self._file = open(path, 'rb')
        self._mm = None
        if use_mmap:
            try:
                self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError):
                self._mm = None

    def locate(self, key: str) -> tuple[int, int]:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    def read_raw(self, key: str) -> np.ndarray | None:
        return None

    def storage(self, ref: _StorageRef) -> np.ndarray:
        cache_key = f'{ref.key}/{ref.dtype}'
        if cache_key in self._cache:
            return self._cache[cache_key]
        base_dtype = np.dtype(np.uint16 if ref.dtype == _BFLOAT16 else ref.dtype)
        dtype = base_dtype.newbyteorder('>' if self.big_endian else '<')
        raw = self.read_raw(ref.key)
        if raw is not None:
            nbytes = raw.nbytes
        else:
            start, nbytes = self.locate(ref.key)
        if nbytes % dtype.itemsize:
            raise UserError(f'{self.path}: storage {ref.key!r} has {nbytes} bytes, not a multiple of '
                            f'{dtype.itemsize} ({base_dtype}); the file is corrupt')
        count = nbytes // dtype.itemsize
        if raw is not None:
            arr = raw.view(dtype)
        elif self._mm is not None:
            arr = np.frombuffer(self._mm, dtype=dtype, count=count, offset=start)
        else:
            self._file.seek(start)
            arr = np.fromfile(self._file, dtype=dtype, count=count)
            if arr.size != count:
                raise UserError(f'{self.path}: storage {ref.key!r} is truncated; the file is incomplete')
        self._cache[cache_key] = arr
        return arr

    def close(self) -> None:
        # the mmap stays alive as long as arrays view it; only the Python file object is closed
        self._file.close()


class _ZipStorages(_StorageSource):
    def __init__(self, path: str, zf: zipfile.ZipFile, prefix: str, use_mmap: bool, big_endian: bool):
        super().__init__(path, use_mmap, big_endian)
        self._zf, self._prefix = zf, prefix

    def _info(self, key: str) -> zipfile.ZipInfo:
        try:
            return self._zf.getinfo(f'{self._prefix}/data/{key}')
        except KeyError:
            raise UserError(f'{self.path}: storage {key!r} referenced by data.pkl is missing from the zip; '
                            f'the file is corrupt or truncated') from None

    def read_raw(self, key: str) -> np.ndarray | None:
        info = self._info(key)
        if info.compress_type == zipfile.ZIP_STORED:
            return None
        # someone re-zipped the file with compression: no view possible, decompress once
        return np.frombuffer(bytearray(self._zf.read(info)), dtype=np.uint8)

    def locate(self, key: str) -> tuple[int, int]:
        info = self._info(key)
        self._file.seek(info.header_offset)
        header = self._file.read(30)
        if len(header) != 30 or header[:4] != b'PK\x03\x04':
            raise UserError(f'{self.path}: bad zip entry header for storage {key!r}; the file is corrupt')
        name_len, extra_len = struct.unpack('<HH', header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > os.path.getsize(self.path):
            raise UserError(f'{self.path}: storage {key!r} runs past the end of the file; the file is truncated')
        return start, info.file_size


class _OffsetStorages(_StorageSource):
    """Storages at known byte ranges of a plain file (legacy torch layout)."""

    def __init__(self, path: str, ranges: dict[str, tuple[int, int]], use_mmap: bool, big_endian: bool):
        super().__init__(path, use_mmap, big_endian)
        self._ranges = ranges

    def locate(self, key: str) -> tuple[int, int]:
        if key not in self._ranges:
            raise UserError(f'{self.path}: storage {key!r} is missing; the file is corrupt')
        return self._ranges[key]


def _contiguous_strides(size: tuple) -> tuple:
    strides, acc = [], 1
    for n in reversed(size):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _tensor_array(ref: _TensorRef, source: _StorageSource) -> np.ndarray:
    base = source.storage(ref.storage)
    size, stride, offset = ref.size, ref.stride, ref.offset
    if len(size) != len(stride) or any(s < 0 for s in stride) or any(n < 0 for n in size) or offset < 0:
        raise UserError(f'{source.path}: malformed tensor (size {size}, stride {stride}, offset {offset})')
    numel = int(np.prod(size, dtype=np.int64)) if size else 1
    if numel == 0:
        arr = np.empty(size, dtype=base.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= base.size:
            raise UserError(f'{source.path}: tensor (size {size}, stride {stride}, offset {offset}) reads past '
                            f'the end of storage {ref.storage.key!r} ({base.size} elements); the file is corrupt')
        # torch ignores the stride of size-1 dimensions when deciding contiguity
        want = _contiguous_strides(size)
        if all(n == 1 or s == w for n, s, w in zip(size, stride, want)):
            arr = base[offset:offset + numel].reshape(size)
        else:
            view = np.lib.stride_tricks.as_strided(
                base[offset:], shape=size, strides=tuple(s * base.itemsize for s in stride), writeable=False)
            arr = np.ascontiguousarray(view)
    if ref.dtype == _BFLOAT16:
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    elif not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder('='))
    return arr


def _materialise(obj: Any, source: _StorageSource | None, memo: dict[int, Any]) -> Any:
    """Replace every ``_TensorRef`` inside containers by its numpy array (shared refs stay shared)."""
    if isinstance(obj, _TensorRef):
        if id(obj) not in memo:
            memo[id(obj)] = _tensor_array(obj, source)
        return memo[id(obj)]
    if isinstance(obj, dict):
        for k in list(obj.keys()):
            obj[k] = _materialise(obj[k], source, memo)
        return obj
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            obj[i] = _materialise(v, source, memo)
        return obj
    if isinstance(obj, tuple):
        return type(obj)(_materialise(v, source, memo) for v in obj) if type(obj) is tuple else obj
    if isinstance(obj, types.SimpleNamespace):
        for k, v in vars(obj).items():
            setattr(obj, k, _materialise(v, source, memo))
        return obj
    if isinstance(obj, _StorageRef):  # a bare storage saved on its own: its elements as a 1-D array
        if id(obj) not in memo:
            n = source.storage(obj).size
            memo[id(obj)] = _tensor_array(_TensorRef(obj, 0, (n,), (1,)), source)
        return memo[id(obj)]
    if isinstance(obj, _StorageType):
        return repr(obj)  # e.g. a torch dtype stored in args: 'torch.float16'
    if isinstance(obj, _TensorClass):
        return f'torch.{obj.name}'
    return obj


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
            return _select(_pack_paddle_big_params(magic), keys)  # a plain pickle (e.g. Paddle's) named .pth
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


def _read_pickle(path: str, keys: Iterable[str] | None) -> Any:
    with open(path, 'rb') as f:
        obj = _restricted_load(f, path)
    return _select(_pack_paddle_big_params(obj), keys)


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
    header.pop('__metadata__', None)
    ranges, refs = {}, {}
    for name, meta in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[meta['dtype']]
            shape = tuple(int(n) for n in meta['shape'])
            begin, end = (int(x) for x in meta['data_offsets'])
        except KeyError as exc:
            raise UserError(f'{path}: tensor {name!r} has an unsupported dtype or a malformed header entry '
                            f'({exc}); supported dtypes: {", ".join(_SAFETENSORS_DTYPES)}') from None
        itemsize = 2 if dtype == _BFLOAT16 else np.dtype(dtype).itemsize
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if end - begin != numel * itemsize or data_start + end > size or begin < 0:
            raise UserError(f'{path}: tensor {name!r} byte range {begin}..{end} does not match shape {shape} '
                            f'or runs past the end of the file; the file is corrupt')
        ranges[name] = (data_start + begin, end - begin)
        storage = _StorageRef(name, dtype, numel)
        refs[name] = _TensorRef(storage, 0, shape, _contiguous_strides(shape))
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
    if len(head) > 8 and head[8:9] == b'{':
        return _select(_read_safetensors(path, None, mmap), keys)
    raise UserError(f'{path}: unrecognised content (expected a torch.save zip, a pickle or safetensors for '
                    f'extension {ext!r}); the file is corrupt or not a checkpoint')
