"""A restricted unpickler for network pickles of the PyTorch era, which runs no code from the file.

A pickle is a program. The official StyleGAN2 pickles (stylegan2-ada-pytorch, stylegan3) reduce networks
to `torch_utils.persistence._reconstruct_persistent_obj(meta)`, whose real implementation `exec`s the class
source in `meta['module_src']`, and tensors to `torch._utils._rebuild_tensor_v2(storage, ...)` with the
storage a legacy `torch.save` blob (`torch.storage._load_from_bytes`). `SafeUnpickler.find_class` resolves
only an explicit allow-list of such names, each to our own re-implementation that builds plain data:
numpy arrays for tensors, `PersistentObject` dicts for networks (the source text is never executed), plain
dicts/sets for containers. Any other global (`os.system`, `builtins.eval`, ...) raises
`UnsafePickleError` when the pickle names it, before it could be called. Neither torch nor the official
code is imported.

`load_network_pickle(path)` reads a file; `state_dict(network)` flattens a network's parameters and
buffers to {"dotted.name": numpy array}. The StyleGAN2 name mapping lives in `kdjax.stylegan2_import`.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside the allow-list."""


class PersistentObject(dict):
    """An official `torch_utils.persistence` network as plain data.

    Keys: `class_name` (e.g. 'Generator'), `version`, `state` (the torch module's __dict__ as plain data:
    `_parameters`, `_buffers`, `_modules`, `_init_kwargs`, ...). The class source is dropped, unread.
    """


class EasyDict(dict):
    """Stand-in for `dnnlib.util.EasyDict`: a plain dict."""


def _reconstruct_persistent_obj(meta: Mapping[str, Any]) -> PersistentObject:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UnsafePickleError("persistent object: unexpected meta record.")
    return PersistentObject(class_name=meta.get("class_name"), version=meta.get("version"),
                            state=meta.get("state") or {})


# --- numpy objects, rebuilt from data only -------------------------------------------------------------

class _DtypeSpec:
    """Stand-in for `numpy.dtype(name, align, copy)` followed by BUILD(state)."""

    def __init__(self, name, align=False, copy=False):
        if not isinstance(name, str):
            raise UnsafePickleError(f"numpy.dtype: unsupported argument {name!r}.")
        self.name, self.byteorder = name, "="

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 3 or state[2] is not None:
            raise UnsafePickleError("numpy.dtype: structured dtypes are not supported.")
        self.byteorder = state[1]

    def to_numpy(self) -> np.dtype:
        dt = np.dtype(self.name)
        if dt.hasobject:
            raise UnsafePickleError("numpy: object arrays are refused (they can hold arbitrary objects).")
        return dt.newbyteorder(self.byteorder) if self.byteorder in "<>" else dt


def _to_dtype(d) -> np.dtype:
    if isinstance(d, _DtypeSpec):
        return d.to_numpy()
    raise UnsafePickleError(f"numpy: unexpected dtype {d!r}.")


def _np_scalar(dtype, data: bytes = b""):
    return np.frombuffer(data, dtype=_to_dtype(dtype))[0]


class _NdarraySpec:
    """Stand-in for `numpy.core.multiarray._reconstruct(ndarray, ...)` followed by BUILD(state)."""
    array = None

    def __setstate__(self, state):
        _, shape, dtype, fortran, raw = state
        if not isinstance(raw, (bytes, bytearray)):
            raise UnsafePickleError("numpy: only raw-buffer arrays are supported.")
        self.array = np.frombuffer(raw, dtype=_to_dtype(dtype)).reshape(shape, order="F" if fortran else "C")


def _np_reconstruct(subtype, shape, dtype_code):
    if subtype is not _NDARRAY_MARKER:
        raise UnsafePickleError("numpy: only plain ndarrays are supported.")
    return _NdarraySpec()


def _np_frombuffer(buf, dtype, shape, order):
    return np.frombuffer(buf, dtype=_to_dtype(dtype)).reshape(shape, order=order)


_NDARRAY_MARKER = object()

# --- torch tensors, rebuilt as numpy arrays ---------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def _storage_dtype(name: str) -> np.dtype:
    dt = _STORAGE_DTYPES[name]
    if dt == "bfloat16":
        import ml_dtypes  # a jax dependency
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dt)


class _StorageType:
    def __init__(self, name: str):
        self.name = name


def _load_storage_bytes(blob: bytes) -> np.ndarray:
    """Reads the legacy `torch.save` format of one storage (what `torch.storage._load_from_bytes` gets).

    Layout: pickle(magic), pickle(protocol), pickle(sys_info), pickle(storage, with a persistent id
    ('storage', <torch.XStorage>, key, location, numel[, view])), pickle([keys]), then per key an int64
    element count and the raw little-endian data.
    """
    f = io.BytesIO(blob)
    if _restricted_load(f, {}) != _LEGACY_MAGIC:
        raise UnsafePickleError("tensor storage: not a legacy torch.save blob (bad magic number).")
    _restricted_load(f, {})                 # protocol version
    sys_info = _restricted_load(f, {})
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise UnsafePickleError("tensor storage: big-endian storages are not supported.")
    records: dict[str, tuple] = {}

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafePickleError(f"tensor storage: unexpected persistent id {pid!r}.")
        stype, key, _, numel = pid[1], str(pid[2]), pid[3], pid[4]
        view = pid[5] if len(pid) > 5 else None
        if not isinstance(stype, _StorageType):
            raise UnsafePickleError("tensor storage: unexpected storage type.")
        records[key] = (stype, numel)
        return ("storage_ref", key, view)

    ref = _restricted_load(f, _STORAGE_GLOBALS, persistent_load)
    keys = _restricted_load(f, {})
    data = {}
    for key in keys:
        (numel,) = struct.unpack("<q", f.read(8))
        dt = _storage_dtype(records[str(key)][0].name)
        data[str(key)] = np.frombuffer(f.read(numel * dt.itemsize), dtype=dt, count=numel)
    _, key, view = ref
    arr = data[key]
    if view is not None:                   # (view_key, offset, size) in old torch versions
        _, offset, size = view
        arr = arr[offset:offset + size]
    return arr


def _rebuild_tensor(storage, offset, size, stride, *unused) -> np.ndarray:
    if not isinstance(storage, np.ndarray):
        raise UnsafePickleError("tensor: storage is not a rebuilt storage.")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if any(s == 0 for s in size):
        return np.zeros(size, storage.dtype)
    last = int(offset) + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= storage.size or any(s < 0 for s in stride):
        raise UnsafePickleError("tensor: size/stride out of the storage's bounds.")
    base = storage[int(offset):]
    view = np.lib.stride_tricks.as_strided(base, size, [s * storage.itemsize for s in stride],
                                           writeable=False)
    return np.array(view)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *state):
    return data


# (module, name) -> our re-implementation. Nothing else resolves.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("numpy", "dtype"): _DtypeSpec,
    ("numpy", "ndarray"): _NDARRAY_MARKER,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_frombuffer,
}
# Inside a storage blob: only the storage type names.
_STORAGE_GLOBALS = {("torch", name): _StorageType(name) for name in _STORAGE_DTYPES}


class SafeUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves globals only from an allow-list of safe re-implementations."""

    def __init__(self, file: BinaryIO, allowed: Mapping[tuple[str, str], Any],
                 persistent_load: Callable | None = None):
        super().__init__(file)
        self._allowed = allowed
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"Refusing to load the pickle: it references the global '{module}.{name}', which is not "
                f"on the allow-list of tensor and container types (nothing from it was run).") from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:
            raise UnsafePickleError(f"Refusing to load the pickle: unexpected persistent id {pid!r}.")
        return self._persistent_load(pid)


def _restricted_load(f: BinaryIO, allowed, persistent_load=None) -> Any:
    return SafeUnpickler(f, allowed, persistent_load).load()


def _finalize(obj: Any) -> Any:
    """Replaces numpy stand-ins by arrays, recursively."""
    if isinstance(obj, _NdarraySpec):
        return obj.array
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _finalize(obj[k])
        return obj
    if isinstance(obj, list):
        return [_finalize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_finalize(v) for v in obj)
    return obj


def load_network_pickle(path_or_file: str | os.PathLike | BinaryIO) -> dict:
    """Reads an official network pickle as plain data (numpy arrays, dicts, `PersistentObject`s).

    Raises:
      UnsafePickleError: the pickle references anything outside the allow-list (named in the message).
    """
    if hasattr(path_or_file, "read"):
        return _finalize(_restricted_load(path_or_file, _ALLOWED_GLOBALS))
    with open(path_or_file, "rb") as f:
        return _finalize(_restricted_load(f, _ALLOWED_GLOBALS))


def state_dict(obj: PersistentObject, prefix: str = "") -> dict[str, np.ndarray]:
    """Flat {'mapping.fc0.weight': array, ...} of a network's parameters and buffers (torch naming)."""
    out = {}
    state = obj["state"]
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is not None:
                out[prefix + name] = np.asarray(value)
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, PersistentObject):
            raise ValueError(f"{prefix + name}: submodule is not a persistent network object.")
        out.update(state_dict(child, prefix + name + "."))
    return out
