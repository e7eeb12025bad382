"""Tensors, storages and numpy values of a network pickle, rebuilt from data only, as frozen stand-ins.

These are the reconstructors that `safe_pickle`'s allow-list maps torch's and numpy's globals to. They return
`Frozen` stand-ins, which refuse BUILD and attribute assignment, so that a pickle cannot alter them (nor,
through them, a later load); `safe_pickle` swaps them for numpy arrays once the load is done.

A tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`; its storage a legacy
`torch.save` blob (`torch.storage._load_from_bytes(bytes)`, `load_storage_blob`), always a flat 1-D array
viewed, not copied, from the blob. Before a tensor reads any element, its (offset, size, stride) is checked
against its storage's element count, and what it expands to is charged to the load's `Budget`.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from kdjax.importers.pickle_stream import Budget, NetworkPickleError, describe, refuse_global, restricted_load

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C   # first pickle of a legacy torch.save file
MAX_DIMS = 32
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class Frozen:
    """Base of the stand-ins: fields are set once, at construction; setattr, delattr and BUILD are refused."""
    __slots__ = ()

    def __init__(self, **fields: Any):
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise NetworkPickleError(f"setting {describe(name)} on a {type(self).__name__} is refused.")

    def __delattr__(self, name):
        raise NetworkPickleError(f"deleting {describe(name)} of a {type(self).__name__} is refused.")

    def __setstate__(self, state):   # BUILD calls this
        raise NetworkPickleError(f"BUILD on a {type(self).__name__} is refused (the pickle may not alter it).")


class Global(Frozen):
    """An allowed global as the pickle sees it: calling it calls `fn` (None: a marker, not callable)."""
    __slots__ = ("qualname", "fn")

    def __call__(self, *args):
        if self.fn is None:
            raise NetworkPickleError(f"{self.qualname} cannot be called.")
        return self.fn(*args)


class ArrayValue(Frozen):
    """A tensor or numpy array built during the load (`array`)."""
    __slots__ = ("array",)


class Storage(Frozen):
    """A torch storage: `array`, flat and 1-D."""
    __slots__ = ("array",)


class StorageType(Frozen):
    """`torch.FloatStorage` & co inside a storage blob (made fresh for each blob)."""
    __slots__ = ("name", "dtype")


class StorageRef(Frozen):
    """A persistent id inside a storage blob: which storage (`key`) and an optional `view` of it."""
    __slots__ = ("key", "view")


class DtypeSpec(Frozen):
    """`numpy.dtype(name, align, copy)`, to be followed by one BUILD(state) that sets the byte order."""
    __slots__ = ("dtype", "built")

    def __setstate__(self, state):
        if self.built or not (isinstance(state, tuple) and len(state) >= 3 and isinstance(state[1], str)
                              and state[1] in "<>=|" and len(state[1]) == 1 and state[2] is None):
            raise NetworkPickleError(f"numpy.dtype: unsupported state {describe(state)} (structured dtypes "
                                     f"are not supported).")
        dtype = self.dtype.newbyteorder(state[1]) if state[1] in "<>" else self.dtype
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "built", True)


class NdarraySpec(Frozen):
    """`numpy.core.multiarray._reconstruct(ndarray, ...)`, to be followed by one BUILD(state) with the data."""
    __slots__ = ("array",)

    def __setstate__(self, state):
        if self.array is not None or not (isinstance(state, tuple) and len(state) == 5):
            raise NetworkPickleError(f"numpy array: unsupported state {describe(state)}.")
        _, shape, dtype, fortran, raw = state
        array = _array_from_buffer(raw, dtype, shape, "F" if fortran is True else "C")
        object.__setattr__(self, "array", array)


# --- numpy values ------------------------------------------------------------------------------------------

def numpy_dtype(name, align=False, copy=False) -> DtypeSpec:
    """`numpy.dtype(name, ...)` for plain numeric dtypes only (no objects, strings, records or subarrays)."""
    if not isinstance(name, str) or len(name) > 32:
        raise NetworkPickleError(f"numpy.dtype: unsupported argument {describe(name)}.")
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise NetworkPickleError(f"numpy.dtype: unknown dtype {describe(name)}.") from None
    if dtype.kind not in "biufc" or dtype.subdtype is not None or dtype.fields is not None:
        raise NetworkPickleError(f"numpy.dtype: {describe(name)} is not a plain numeric dtype (object arrays "
                                 f"could hold arbitrary objects).")
    return DtypeSpec(dtype=dtype, built=False)


def _to_dtype(spec) -> np.dtype:
    if not isinstance(spec, DtypeSpec):
        raise NetworkPickleError(f"numpy: expected a dtype, got {describe(spec)}.")
    return spec.dtype


def _shape(value, what: str) -> tuple[int, ...]:
    """A shape (or stride) from the file: a tuple/list of at most MAX_DIMS non-negative ints < 2**40."""
    if (not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS
            or not all(type(n) is int and 0 <= n < 1 << 40 for n in value)):
        raise NetworkPickleError(f"{what} {describe(value)} is not a tuple of at most {MAX_DIMS} non-negative "
                                 f"integers.")
    return tuple(value)


def _array_from_buffer(buf, dtype_spec, shape, order: str) -> np.ndarray:
    """A read-only view of `buf` as an array; the buffer must hold exactly the shape's elements."""
    dtype, shape = _to_dtype(dtype_spec), _shape(shape, "numpy shape")
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise NetworkPickleError(f"numpy: array data is {describe(buf)}, not a raw buffer.")
    nbytes = memoryview(buf).nbytes
    if math.prod(shape) * dtype.itemsize != nbytes:
        raise NetworkPickleError(f"numpy: {nbytes} bytes of data for shape {shape} of {dtype}.")
    array = np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)
    array.flags.writeable = False
    return array


def numpy_scalar(dtype_spec, data=b"") -> np.generic:
    """`numpy.core.multiarray.scalar(dtype, bytes)`."""
    dtype = _to_dtype(dtype_spec)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise NetworkPickleError(f"numpy scalar: {describe(data)} is not {dtype.itemsize} bytes of {dtype}.")
    return np.frombuffer(data, dtype=dtype)[0]


def numpy_reconstruct(ndarray_marker: Global, subtype, shape, dtype_code) -> NdarraySpec:
    """`numpy.core.multiarray._reconstruct(numpy.ndarray, ...)`: plain ndarrays only."""
    if subtype is not ndarray_marker:
        raise NetworkPickleError("numpy: only plain ndarrays are supported.")
    return NdarraySpec(array=None)


def numpy_frombuffer(buf, dtype_spec, shape, order) -> ArrayValue:
    """`numpy.core.numeric._frombuffer(buffer, dtype, shape, order)` (pickle protocol 5)."""
    if order not in ("C", "F"):
        raise NetworkPickleError(f"numpy: unsupported order {describe(order)}.")
    return ArrayValue(array=_array_from_buffer(buf, dtype_spec, shape, order))


# --- torch tensors -----------------------------------------------------------------------------------------

def rebuild_tensor(budget: Budget, storage, offset, size, stride, *unused) -> ArrayValue:
    """`torch._utils._rebuild_tensor_v2`: a copy of the strided view, checked to lie inside the storage."""
    if not isinstance(storage, Storage):
        raise NetworkPickleError(f"tensor: the storage is {describe(storage)}, not a rebuilt storage.")
    size, stride = _shape(size, "tensor size"), _shape(stride, "tensor stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise NetworkPickleError(f"tensor: offset {describe(offset)}, size {size}, stride {stride} do not fit.")
    array = storage.array
    numel = math.prod(size)
    budget.spend("tensor bytes", math.prod(max(n, 1) for n in size) * array.itemsize,
                 f"a tensor of size {size} and stride {stride}")
    if numel == 0:
        return ArrayValue(array=np.zeros(size, array.dtype))
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= array.size:
        raise NetworkPickleError(f"tensor: offset {offset}, size {size}, stride {stride} reach element {last} "
                                 f"of a storage of {array.size}.")
    byte_strides = [s * array.itemsize if n > 1 else 0 for n, s in zip(size, stride)]
    view = np.lib.stride_tricks.as_strided(array[offset:], size, byte_strides, writeable=False)
    return ArrayValue(array=view.copy())       # safe: every index is checked above


def rebuild_parameter(data, *unused) -> ArrayValue:
    """`torch._utils._rebuild_parameter(_with_state)`: the tensor itself."""
    if not isinstance(data, ArrayValue):
        raise NetworkPickleError(f"parameter: {describe(data)} is not a tensor.")
    return data


def _storage_dtype(name: str) -> np.dtype:
    dtype = _STORAGE_DTYPES[name]
    if dtype == "bfloat16":
        import ml_dtypes  # a jax dependency
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _no_globals(module: str, name: str):
    refuse_global(module, name)


class _BlobReader:
    """The storage pickle of one blob (its `torch.XStorage` globals and persistent ids), then its raw data."""

    def __init__(self):
        # Made as the blob names them: BFloat16Storage's dtype imports ml_dtypes (5.5 MiB of allocations with
        # ml_dtypes 0.7), which a file without bfloat16 tensors should not pay for.
        self.types: dict[tuple[str, str], StorageType] = {}
        self.records: dict[str, tuple[StorageType, int]] = {}

    def find_class(self, module: str, name: str) -> StorageType:
        if module != "torch" or name not in _STORAGE_DTYPES:
            refuse_global(module, name)
        if (module, name) not in self.types:
            self.types[(module, name)] = StorageType(name=name, dtype=_storage_dtype(name))
        return self.types[(module, name)]

    def persistent_load(self, pid) -> StorageRef:
        """('storage', torch.XStorage, key, location, numel[, view]) -> a StorageRef."""
        ok = (isinstance(pid, tuple) and len(pid) in (5, 6) and isinstance(pid[0], str) and pid[0] == "storage"
              and isinstance(pid[1], StorageType) and type(pid[2]) in (str, int) and type(pid[4]) is int
              and pid[4] >= 0 and (len(pid) == 5 or pid[5] is None or _is_view(pid[5])))
        if not ok:
            raise NetworkPickleError(f"tensor storage: unexpected persistent id {describe(pid)}.")
        self.records[str(pid[2])] = (pid[1], pid[4])
        return StorageRef(key=str(pid[2]), view=pid[5] if len(pid) == 6 else None)

    def read_data(self, blob: bytes, pos: int, keys) -> dict[str, np.ndarray]:
        """Per key: an int64 element count and the raw little-endian elements, viewed in place."""
        if not isinstance(keys, list) or not all(type(k) in (str, int) for k in keys):
            raise NetworkPickleError(f"tensor storage: the key list is {describe(keys)}.")
        arrays = {}
        for key in map(str, keys):
            if key not in self.records or pos + 8 > len(blob):
                raise NetworkPickleError(f"tensor storage: no record or data for key {describe(key)}.")
            stype, numel = self.records[key]
            (count,) = struct.unpack_from("<q", blob, pos)
            nbytes = count * stype.dtype.itemsize
            if count != numel or pos + 8 + nbytes > len(blob):
                raise NetworkPickleError(f"tensor storage {describe(key)}: {count} elements declared, {numel} "
                                         f"recorded, {len(blob) - pos - 8} bytes left.")
            arrays[key] = np.frombuffer(blob, dtype=stype.dtype, count=count, offset=pos + 8)
            pos += 8 + nbytes
        return arrays


def _is_view(view) -> bool:
    return (isinstance(view, tuple) and len(view) == 3 and type(view[0]) in (str, int)
            and all(type(n) is int and n >= 0 for n in view[1:]))


def load_storage_blob(budget: Budget, blob) -> Storage:
    """`torch.storage._load_from_bytes`: reads the legacy `torch.save` format of one storage.

    Layout: pickle(magic), pickle(protocol), pickle(sys_info), pickle(storage, with a persistent id
    ('storage', <torch.XStorage>, key, location, numel[, view])), pickle([keys]), then per key an int64
    element count and the raw little-endian data.
    """
    if not isinstance(blob, bytes):
        raise NetworkPickleError(f"tensor storage: {describe(blob)} is not a bytes blob.")
    magic, pos = restricted_load(blob, 0, budget, _no_globals)
    if type(magic) is not int or magic != LEGACY_MAGIC:
        raise NetworkPickleError("tensor storage: not a legacy torch.save blob (bad magic number).")
    _, pos = restricted_load(blob, pos, budget, _no_globals)                # protocol version
    sys_info, pos = restricted_load(blob, pos, budget, _no_globals)
    if isinstance(sys_info, dict) and sys_info.get("little_endian", True) is not True:
        raise NetworkPickleError("tensor storage: big-endian storages are not supported.")
    reader = _BlobReader()
    ref, pos = restricted_load(blob, pos, budget, reader.find_class, reader.persistent_load)
    keys, pos = restricted_load(blob, pos, budget, _no_globals)
    arrays = reader.read_data(blob, pos, keys)
    if not isinstance(ref, StorageRef) or ref.key not in arrays:
        raise NetworkPickleError(f"tensor storage: the blob holds {describe(ref)}, not one of its storages.")
    array = arrays[ref.key]
    if ref.view is not None:                    # (view_key, offset, size) in old torch versions
        _, offset, size = ref.view
        if offset + size > array.size:
            raise NetworkPickleError(f"tensor storage: view {ref.view} outside a storage of {array.size}.")
        array = array[offset:offset + size]
    return Storage(array=array)
