"""A restricted unpickler for network pickles of the PyTorch era, which runs no code from the file.

A pickle is a program. The official StyleGAN2 pickles (stylegan2-ada-pytorch, stylegan3) reduce networks
to `torch_utils.persistence._reconstruct_persistent_obj(meta)`, whose real implementation `exec`s the class
source in `meta['module_src']`, and tensors to `torch._utils._rebuild_tensor_v2(storage, ...)` with the
storage a legacy `torch.save` blob (`torch.storage._load_from_bytes`). The loader resolves only an explicit
allow-list of such names, each to our own re-implementation that builds plain data: numpy arrays for
tensors, `PersistentObject` dicts for networks (the source text is never executed), plain dicts/sets for
containers. Any other global (`os.system`, `builtins.eval`, ...) raises `UnsafePickleError` when the pickle
names it, before it could be called. Neither torch nor the official code is imported.

Hostile and broken files are refused with `NetworkPickleError` (a ValueError; `UnsafePickleError` is one),
and nothing else: the stream is checked before it is unpickled (`pickle_stream`: declared sizes, memo
indexes, dict keys), tensors are bounds-checked and budgeted (`torch_storage`), every allowed global is a
fresh frozen object per load (a pickle cannot alter it for a later load), and the result is walked once
with a memo and a depth limit (shared references stay shared; cycles are refused).

NVlabs/edm's networks (SongUNet, DhariwalUNet) also keep blocks in `torch.nn.ModuleDict`s, a plain torch class
that a pickle rebuilds as NEWOBJ(ModuleDict) followed by one BUILD with the module's __dict__: `ModuleDictStandIn`
accepts exactly that (one BUILD, with a dict) and becomes a `PersistentObject(class_name='ModuleDict')`, so that
`state_dict` walks it as any other module.

`load_network_pickle(path)` reads a file; `state_dict(network)` flattens a network's parameters and
buffers to {"dotted.name": numpy array}. The StyleGAN2 name mapping lives in `kdjax.importers.stylegan2`, EDM's
in `kdjax.importers.edm`.
"""

from __future__ import annotations

import collections
import functools
import os
import pathlib
from typing import Any, BinaryIO

import numpy as np

from kdjax.importers import torch_storage as ts
from kdjax.importers.pickle_stream import (Budget, NetworkPickleError, UnsafePickleError, describe,
                                           refuse_global, restricted_load)

__all__ = ["EasyDict", "ModuleDictStandIn", "NetworkPickleError", "PersistentObject", "UnsafePickleError",
           "load_network_pickle", "state_dict"]
MAX_DEPTH = 100               # container nesting of a loaded pickle (a network pickle: ~16)
MAX_MODULE_DEPTH = 32         # submodule nesting in state_dict (StyleGAN2: 4)
MAX_NAME_CHARS = 1 << 24      # total characters of state_dict names (a 1024x1024 G: ~60 k)


class PersistentObject(dict):
    """An official `torch_utils.persistence` network as plain data.

    Keys: `class_name` (e.g. 'Generator'), `version`, `state` (the torch module's __dict__ as plain data:
    `_parameters`, `_buffers`, `_modules`, `_init_kwargs`, ...). The class source is dropped, unread.
    """

    def __setstate__(self, *state):   # BUILD (on an instance, or unbound on the class): never official
        raise NetworkPickleError("BUILD on a persistent network object is refused.")


class _FrozenType(type):
    """Metaclass of the one allowed class given to the pickle as a type: its attributes cannot be changed."""

    def __setattr__(cls, name, value):
        raise NetworkPickleError(f"setting {describe(name)} on {cls.__name__} is refused.")

    def __delattr__(cls, name):
        raise NetworkPickleError(f"deleting {describe(name)} of {cls.__name__} is refused.")


class EasyDict(dict, metaclass=_FrozenType):
    """Stand-in for `dnnlib.util.EasyDict`: a plain dict, built as dnnlib pickles it (NEWOBJ, SETITEMS)."""

    def __init__(self):
        super().__init__()

    def __setstate__(self, *state):   # BUILD, on an instance or (unbound) on the class
        raise NetworkPickleError("BUILD on an EasyDict is refused.")


class ModuleDictStandIn(ts.Frozen, metaclass=_FrozenType):
    """`torch.nn.ModuleDict` as a pickle builds it: NEWOBJ (no fields), then one BUILD with its __dict__."""
    __slots__ = ("state",)

    def __setstate__(self, state):
        if hasattr(self, "state") or not isinstance(state, dict):
            raise NetworkPickleError(f"ModuleDict: BUILD with {describe(state)} refused (one dict state only).")
        object.__setattr__(self, "state", state)


def _reconstruct_persistent_obj(meta) -> PersistentObject:
    """`torch_utils.persistence._reconstruct_persistent_obj`, minus the `exec` of meta['module_src']."""
    kind = meta.get("type") if isinstance(meta, dict) else None
    if not (isinstance(kind, str) and kind == "class"):
        raise NetworkPickleError(f"persistent object: unexpected meta record {describe(meta)}.")
    class_name, state = meta.get("class_name"), meta.get("state")
    if not isinstance(class_name, (str, type(None))) or not isinstance(state, (dict, type(None))):
        raise NetworkPickleError(f"persistent object: class name {describe(class_name)} or state "
                                 f"{describe(state)} of the wrong type.")
    return PersistentObject(class_name=class_name, version=meta.get("version"),
                            state=state if state is not None else {})


def _copied_container(budget: Budget, factory, items=()):
    """set/frozenset/OrderedDict(items): flat keys only (str, bytes, numbers, None), charged to the budget."""
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise NetworkPickleError(f"{factory.__name__}: unsupported argument {describe(items)}.")
    budget.spend("copied items", len(items), f"{factory.__name__}(...)")
    if factory is collections.OrderedDict:
        if not all(isinstance(p, tuple) and len(p) == 2 for p in items):
            raise NetworkPickleError(f"OrderedDict: {describe(items)} is not a list of (key, value) pairs.")
        keys = [p[0] for p in items]
    else:
        keys = items
    if not all(isinstance(k, (str, bytes, int, float, type(None))) for k in keys):
        raise NetworkPickleError(f"{factory.__name__}: keys {describe(list(keys))} are not str, bytes or numbers.")
    others = sum(not isinstance(k, (str, bytes)) for k in keys)
    if others:
        budget.spend("other keys", others, f"{factory.__name__}(...)")
    return factory(items)


class _Loader:
    """One load's allow-list: (module, name) -> a fresh `Global` wrapping our reconstructor, bound to this
    load's budget. Nothing else resolves, and nothing here is shared with another load."""

    def __init__(self, budget: Budget):
        ndarray = ts.Global(qualname="numpy.ndarray", fn=None)
        fns = {
            ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
            ("torch._utils", "_rebuild_tensor_v2"): functools.partial(ts.rebuild_tensor, budget),
            ("torch._utils", "_rebuild_tensor"): functools.partial(ts.rebuild_tensor, budget),
            ("torch._utils", "_rebuild_parameter"): ts.rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): ts.rebuild_parameter,
            ("torch.storage", "_load_from_bytes"): functools.partial(ts.load_storage_blob, budget),
            ("collections", "OrderedDict"): functools.partial(_copied_container, budget, collections.OrderedDict),
            ("numpy", "dtype"): ts.numpy_dtype,
        }
        for builtins in ("builtins", "__builtin__"):
            fns[(builtins, "set")] = functools.partial(_copied_container, budget, set)
            fns[(builtins, "frozenset")] = functools.partial(_copied_container, budget, frozenset)
        for core in ("numpy.core", "numpy._core"):
            fns[(f"{core}.multiarray", "scalar")] = ts.numpy_scalar
            fns[(f"{core}.multiarray", "_reconstruct")] = functools.partial(ts.numpy_reconstruct, ndarray)
            fns[(f"{core}.numeric", "_frombuffer")] = ts.numpy_frombuffer
        self.globals: dict[tuple[str, str], Any] = {key: ts.Global(qualname=".".join(key), fn=fn)
                                                    for key, fn in fns.items()}
        self.globals[("numpy", "ndarray")] = ndarray
        self.globals[("dnnlib.util", "EasyDict")] = EasyDict
        self.globals[("torch.nn.modules.container", "ModuleDict")] = ModuleDictStandIn

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.globals:
            refuse_global(module, name)
        return self.globals[(module, name)]


class _Finalizer:
    """Swaps the stand-ins of a loaded pickle for plain values (arrays, dtypes), walking it once.

    Each container is converted once (an id-keyed memo that also keeps the originals alive, so ids stay
    unique): shared references stay shared, in linear time. A reference cycle, nesting deeper than MAX_DEPTH,
    or a stand-in that no network pickle holds as a value (a bare global or class, a storage type, a ModuleDict
    never built) is an error.
    """
    _LEAVES = (str, bytes, int, float, bool, type(None), np.ndarray, np.generic)

    def __init__(self):
        self.done: dict[int, tuple[Any, Any]] = {}
        self.active: set[int] = set()

    def convert(self, obj: Any, depth: int = 0) -> Any:
        if isinstance(obj, self._LEAVES):
            return obj
        key = id(obj)
        if key in self.done:
            return self.done[key][1]
        if key in self.active:
            raise NetworkPickleError("the pickle contains itself (a reference cycle), which no network has.")
        if depth > MAX_DEPTH:
            raise NetworkPickleError(f"the pickle nests containers more than {MAX_DEPTH} deep.")
        self.active.add(key)
        result = self._convert(obj, depth + 1)
        self.active.discard(key)
        self.done[key] = (obj, result)
        return result

    def _convert(self, obj: Any, depth: int) -> Any:
        if isinstance(obj, ModuleDictStandIn):
            if not hasattr(obj, "state"):
                raise NetworkPickleError("a ModuleDict without its state (no BUILD).")
            return PersistentObject(class_name="ModuleDict", version=None, state=self.convert(obj.state, depth))
        if isinstance(obj, (ts.ArrayValue, ts.Storage, ts.NdarraySpec)) and obj.array is not None:
            return obj.array
        if isinstance(obj, ts.DtypeSpec):
            return obj.dtype
        if isinstance(obj, (ts.Frozen, type)):
            raise NetworkPickleError(f"the pickle holds a bare {type(obj).__name__} as a value.")
        if isinstance(obj, (dict, list)):       # in place: keeps the identity (and sharing) of containers
            for k in (list(obj) if isinstance(obj, dict) else range(len(obj))):
                obj[k] = self.convert(obj[k], depth)
            return obj
        if isinstance(obj, tuple):
            return tuple([self.convert(v, depth) for v in obj])
        if isinstance(obj, (set, frozenset)):
            items = [self.convert(v, depth) for v in obj]
            if any(isinstance(v, np.ndarray) for v in items):
                raise NetworkPickleError("the pickle holds an array inside a set.")
            return type(obj)(items)
        return obj


def _read(path_or_file: str | os.PathLike | BinaryIO) -> bytes:
    data = path_or_file.read() if hasattr(path_or_file, "read") else pathlib.Path(path_or_file).read_bytes()
    if not isinstance(data, bytes):
        raise NetworkPickleError("the pickle must be read in binary mode.")
    if not data:
        raise NetworkPickleError("the file is empty, not a network pickle.")
    if data.startswith(b"PK\x03\x04"):
        raise NetworkPickleError("the file is a zip archive (torch.save's format?), not a network pickle "
                                 "(stylegan2-ada-pytorch, stylegan3 and NVlabs/edm write those with pickle.dump).")
    return data


def load_network_pickle(path_or_file: str | os.PathLike | BinaryIO) -> dict:
    """Reads an official network pickle as plain data (numpy arrays, dicts, `PersistentObject`s).

    Raises:
      OSError: the path cannot be read.
      UnsafePickleError: the pickle references a global outside the allow-list (named in the message).
      NetworkPickleError: anything else wrong with the file (empty, truncated, corrupt, oversized, hostile,
        or its top level not a dict).
    """
    data = _read(path_or_file)
    budget = Budget(len(data))
    obj, _ = restricted_load(data, 0, budget, _Loader(budget).find_class)
    if not isinstance(obj, dict):
        hint = " (a legacy torch.save file)" if isinstance(obj, int) and obj == ts.LEGACY_MAGIC else ""
        raise NetworkPickleError(f"not a network pickle: it holds {describe(obj)}{hint}, not a dict of "
                                 f"networks (G, D, G_ema, ...).")
    return _Finalizer().convert(obj)


class _StateDictReader:
    """Collects one network's parameters and buffers; see `state_dict`."""

    def __init__(self):
        self.out: dict[str, np.ndarray] = {}
        self.seen: set[int] = set()
        self.chars = 0

    def read(self, module: PersistentObject, prefix: str) -> None:
        if id(module) in self.seen or prefix.count(".") > MAX_MODULE_DEPTH:
            raise NetworkPickleError(f"{describe(prefix)}: a submodule that appears twice, or nests more than "
                                     f"{MAX_MODULE_DEPTH} deep.")
        self.seen.add(id(module))
        state = module.get("state")
        for group in ("_parameters", "_buffers"):
            for name, value in self._entries(state, group, prefix):
                if value is not None:
                    self._add(self._name(prefix, name), value)
        for name, child in self._entries(state, "_modules", prefix):
            if child is None:
                continue
            name = self._name(prefix, name)
            if not isinstance(child, PersistentObject):
                raise NetworkPickleError(f"{describe(name)}: the submodule is {describe(child)}, not a "
                                         f"persistent network object.")
            self.read(child, name + ".")

    @staticmethod
    def _entries(state, group: str, prefix: str) -> list:
        entries = state.get(group) if isinstance(state, dict) else None
        if entries is None:
            return []
        if not isinstance(entries, dict):
            raise NetworkPickleError(f"{describe(prefix + group)} is {describe(entries)}, not a dict.")
        return list(entries.items())

    def _name(self, prefix: str, name) -> str:
        if not isinstance(name, str) or not 0 < len(name) <= 256 or "." in name:
            raise NetworkPickleError(f"{describe(prefix)}: {describe(name)} is not a module attribute name.")
        self.chars += len(prefix) + len(name)
        if self.chars > MAX_NAME_CHARS:
            raise NetworkPickleError(f"the network's parameter names exceed {MAX_NAME_CHARS} characters.")
        return prefix + name

    def _add(self, name: str, value) -> None:
        if not isinstance(value, np.ndarray) or not (value.dtype.kind in "biuf" or value.dtype.name == "bfloat16"):
            raise NetworkPickleError(f"{describe(name)}: {describe(value)} is not a numeric tensor.")
        self.out[name] = value


def state_dict(obj: PersistentObject, prefix: str = "") -> dict[str, np.ndarray]:
    """Flat {'mapping.fc0.weight': array, ...} of a network's parameters and buffers (torch naming).

    Raises NetworkPickleError if the network is not a tree of persistent objects holding numeric arrays.
    """
    if not isinstance(obj, PersistentObject):
        raise NetworkPickleError(f"{describe(obj)} is not a persistent network object.")
    reader = _StateDictReader()
    reader.read(obj, prefix)
    return reader.out
