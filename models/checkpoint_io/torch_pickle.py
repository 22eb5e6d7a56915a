"""The restricted unpickler for checkpoints: what a pickle may name, and what each name becomes.

Checkpoint pickles (``torch.save`` zip and legacy layouts, Paddle ``.pdparams``) are read by
``_restricted_load``: only the globals a checkpoint needs resolve (tensor rebuild functions, storage
types and torch dtypes, ``OrderedDict``, ``argparse.Namespace`` (rebuilt as ``SimpleNamespace``), numpy
scalars/arrays/dtypes, a few builtins); any other global makes the whole file refused with a
``UserError``, so nothing named by the file is ever called.

Torch tensors and storages unpickle to placeholders (``_TensorRef`` / ``_StorageRef`` from
``models.checkpoint_io.storage_views``); ``_materialise`` later replaces them by numpy arrays, only for the entries
a caller keeps.

References: PyTorch ``torch/_utils.py`` (``_rebuild_tensor_v2`` argument order) and
``torch/serialization.py`` (storage types, persistent ids); Python's ``_compat_pickle`` (protocol-2 names).
"""
from __future__ import annotations

import _compat_pickle
import builtins
import collections
import io
import pickle
import types
from typing import Any, Callable

import numpy as np

from models.checkpoint_io.storage_views import _BFLOAT16, _StorageRef, _StorageSource, _tensor_array, _TensorRef
from util.errors import UserError

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


# ----------------------------------------------------------------------------------------------------
# Placeholders built while unpickling; arrays are made afterwards, only for the entries that are kept.

class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co. (or a ``torch.float32`` dtype): just a dtype."""

    def __init__(self, name: str, dtype: Any):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f'torch.{self.name}'


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
# After unpickling: placeholders -> numpy arrays

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
