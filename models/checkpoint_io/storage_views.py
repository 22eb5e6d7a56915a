"""Checkpoint tensor data as numpy arrays: byte ranges of a file, viewed in place where possible.

A reader describes each tensor as a ``_TensorRef`` (storage key, element offset, shape, element strides)
over a ``_StorageRef`` (storage key, dtype, element count); a ``_StorageSource`` turns a storage into a
1-D numpy array and ``_tensor_array`` cuts the tensor out of it. Sources: ``_ZipStorages`` (entries of a
``torch.save`` zip, located through their local headers) and ``_OffsetStorages`` (known byte ranges of
a plain file: the legacy torch layout, safetensors).

The file is memory-mapped copy-on-write and a storage is a view at its offset, so an array costs page
cache only when it is read (zip storages are read once to check their CRC-32 against the zip directory); without mmap (or for a compressed zip entry) each storage is read once.
Non-contiguous tensors are copied once into C order; bfloat16 (``_BFLOAT16``, stored as uint16 bit
patterns) is widened to float32; big-endian data is swapped to native order.

References: PyTorch ``torch/serialization.py`` (storage records, zip entry layout) and
``torch/_utils.py`` (tensor = storage + offset + size + stride).
"""
from __future__ import annotations

import abc
import mmap
import os
import struct
import zipfile
import zlib
from typing import Any

import numpy as np

from util.errors import UserError

_BFLOAT16 = 'bfloat16'  # marker: stored as uint16 bit patterns, widened to float32 on read


class _StorageRef:
    def __init__(self, key: str, dtype: Any, numel: int | None):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """A tensor to be built later: storage + element offset, shape, element strides."""

    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple, dtype: Any = None):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.dtype = storage.dtype if dtype is None else dtype


class _StorageSource(abc.ABC):
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

    @abc.abstractmethod
    def locate(self, key: str) -> tuple[int, int]:
        """(byte offset, byte length) of storage ``key`` in the file."""

    def read_raw(self, key: str) -> np.ndarray | None:
        return None

    def verify(self, key: str, start: int, nbytes: int) -> None:  # noqa: B027 (a hook: no check by default)
        """Check the bytes of storage ``key`` against what the file says they are (no check by default)."""

    def _crc32(self, start: int, nbytes: int) -> int:
        crc, pos, end = 0, start, start + nbytes
        if self._mm is not None:
            view = memoryview(self._mm)
            try:
                while pos < end:  # in chunks, so at most a chunk of the mapping is touched at a time
                    step = min(end - pos, 1 << 24)
                    crc = zlib.crc32(view[pos:pos + step], crc)
                    pos += step
            finally:
                view.release()
            return crc
        self._file.seek(start)
        while pos < end:
            chunk = self._file.read(min(end - pos, 1 << 24))
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            pos += len(chunk)
        return crc

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
            self.verify(ref.key, start, nbytes)
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

    def verify(self, key: str, start: int, nbytes: int) -> None:
        # zip entries carry a CRC-32: a flipped bit in the weights must not load silently
        info = self._info(key)
        if self._crc32(start, nbytes) != info.CRC:
            raise UserError(f'{self.path}: zip entry {info.filename!r} (storage {key!r}) fails its CRC-32 check; '
                            f'the file is corrupt: download or copy it again')

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
