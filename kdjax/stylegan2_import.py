"""Import official StyleGAN2 network pickles (stylegan2-ada-pytorch, stylegan3) without running them.

Command (writes an Orbax checkpoint that a config can name as its teacher directory):

    python -m kdjax.stylegan2_import --pkl=network-snapshot.pkl --out=/path/to/teacher
        [--network=G_ema] [--conv_clamp=256]

DIR is a kdjax model bundle (`kdjax.checkpoints`): `variables/` (Orbax: params, w_avg, noise_consts) and
`model.json` (the Generator's fields); `load_teacher(DIR)` rebuilds (module, variables).

Why a restricted unpickler: a pickle is a program. The official pickles reduce networks to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, whose real implementation `exec`s the class
source in `meta['module_src']`, and tensors to `torch._utils._rebuild_tensor_v2(storage, ...)` with the
storage a legacy `torch.save` blob (`torch.storage._load_from_bytes`). `SafeUnpickler.find_class` resolves
only an explicit allow-list of such names, each to our own re-implementation that builds plain data:
numpy arrays for tensors, `PersistentObject` dicts for networks (the source text is never executed), plain
dicts/sets for containers. Any other global (`os.system`, `builtins.eval`, ...) raises
`UnsafePickleError` when the pickle names it, before it could be called. Neither torch nor the official
code is imported.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pathlib
import pickle
import re
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


# --- architecture inference ------------------------------------------------------------------------------

def _infer_channel_base(channels: dict[int, int], channel_max: int) -> int:
    top = max(channels)
    for base in range(channels[top] * top, channels[top] * top + top):
        if all(min(base // r, channel_max) == c for r, c in channels.items()):
            return base
    raise ValueError(f"Channel counts {channels} do not follow min(channel_base // res, channel_max).")


def infer_generator_kwargs(g: PersistentObject, sd: Mapping[str, np.ndarray]) -> dict:
    """Generator fields from the pickle's `init_kwargs` where present, checked against the shapes."""
    fc = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"mapping\.fc(\d+)\.weight", k)))
    res = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"synthesis\.b(\d+)\.conv1\.weight", k)))
    if not fc or not res:
        raise ValueError("Not a StyleGAN2 generator: no mapping.fc*/synthesis.b*.conv1 weights found.")
    channels = {r: sd[f"synthesis.b{r}.conv1.weight"].shape[0] for r in res}
    c_dim = sd["mapping.embed.weight"].shape[1] if "mapping.embed.weight" in sd else 0
    embed = sd["mapping.embed.weight"].shape[0] if c_dim else 0
    w_dim = sd[f"mapping.fc{fc[-1]}.weight"].shape[0]
    layer = sd["mapping.fc0.weight"].shape[0] if len(fc) > 1 else w_dim
    channel_max = max(channels.values())
    kw = dict(z_dim=sd["mapping.fc0.weight"].shape[1] - embed, w_dim=w_dim, c_dim=c_dim,
              img_resolution=max(res), img_channels=sd[f"synthesis.b{max(res)}.torgb.weight"].shape[0],
              channel_base=_infer_channel_base(channels, channel_max), channel_max=channel_max,
              mapping_layers=len(fc), mapping_embed_features=(embed if c_dim and embed != w_dim else None),
              mapping_layer_features=(layer if layer != w_dim else None), conv_clamp=None)
    init = g["state"].get("_init_kwargs") or {}
    syn = dict(init.get("synthesis_kwargs") or {})
    mapk = dict(init.get("mapping_kwargs") or {})
    for key in ("z_dim", "w_dim", "c_dim", "img_resolution", "img_channels"):
        if key in init and int(init[key]) != kw[key]:
            raise ValueError(f"init_kwargs {key}={init[key]} disagrees with the weights ({kw[key]}).")
    if "channel_base" in syn or "channel_max" in syn:
        base, cmax = int(syn.get("channel_base", 32768)), int(syn.get("channel_max", 512))
        if any(min(base // r, cmax) != c for r, c in channels.items()):
            raise ValueError(f"init_kwargs channel_base={base}, channel_max={cmax} disagree with the weights.")
        kw["channel_base"], kw["channel_max"] = base, cmax
    if syn.get("conv_clamp") is not None:
        kw["conv_clamp"] = float(syn["conv_clamp"])
    if mapk.get("w_avg_beta") is not None:
        kw["w_avg_beta"] = float(mapk["w_avg_beta"])
    if mapk.get("lr_multiplier") is not None:
        kw["mapping_lr_multiplier"] = float(mapk["lr_multiplier"])
    for key, ok in (("architecture", "skip"), ("activation", "lrelu"), ("use_noise", True)):
        for src in (syn, mapk):
            if key in src and src[key] != ok:
                raise ValueError(f"Unsupported official option {key}={src[key]!r} (kdjax supports {ok!r}).")
    if "resample_filter" in syn and list(syn["resample_filter"]) != [1, 3, 3, 1]:
        raise ValueError(f"Unsupported resample_filter {syn['resample_filter']} (kdjax: [1, 3, 3, 1]).")
    return kw


# --- name mapping ------------------------------------------------------------------------------------------

_TOP = {"mapping": "mapping_network", "synthesis": "synthesis_network"}


def _map_name(name: str, value: np.ndarray) -> tuple[str, tuple[str, ...], np.ndarray] | None:
    """Official name -> (collection, our path, value in our layout); None for a dropped buffer."""
    parts = name.split(".")
    leaf = parts[-1]
    if leaf == "resample_filter":
        from kdjax.models.stylegan2_layers import filter_2d
        if value.shape != (4, 4) or not np.allclose(value, filter_2d(), atol=1e-6):
            raise ValueError(f"{name}: not the [1,3,3,1] filter kdjax implements.")
        return None
    path = (_TOP.get(parts[0], parts[0]),) + tuple(parts[1:])
    collection = {"w_avg": "w_avg", "noise_const": "noise_consts"}.get(leaf, "params")
    if leaf == "weight" and value.ndim == 2:
        value = value.T                                 # (out, in) -> (in, out)
    elif leaf == "weight" and value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)             # OIHW -> HWIO
    elif leaf == "const":
        value = value.transpose(1, 2, 0)                # CHW -> HWC
    return collection, path, value


def _flatten(tree: Mapping, prefix=()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def convert_state_dict(sd: Mapping[str, np.ndarray], expected: Mapping) -> dict:
    """Maps an official state dict onto our variable tree, checking names and shapes both ways.

    Args:
      sd: official flat names -> arrays.
      expected: our variables (or their `jax.eval_shape`), {collection: tree}.
    Raises:
      ValueError naming every official name left over, every one of ours missing, and shape mismatches.
    """
    want = {(col,) + p: v for col, tree in expected.items() for p, v in _flatten(tree).items()}
    got, extra, bad = {}, [], []
    for name, value in sd.items():
        mapped = _map_name(name, np.asarray(value))
        if mapped is None:
            continue
        col, path, value = mapped
        key = (col,) + path
        if key not in want:
            extra.append(name)
        elif tuple(value.shape) != tuple(want[key].shape):
            bad.append(f"{name}: {value.shape} vs expected {tuple(want[key].shape)}")
        else:
            got[key] = value.astype(np.float32)
    inv_top = {v: k for k, v in _TOP.items()}
    missing = sorted(f"{'.'.join((inv_top.get(k[1], k[1]),) + k[2:])} (kdjax {'/'.join(k)})"
                     for k in want if k not in got)
    problems = []
    if extra:
        problems.append(f"official names with no kdjax counterpart: {sorted(extra)}")
    if missing:
        problems.append(f"names missing from the pickle: {missing}")
    if bad:
        problems.append(f"shape mismatches: {bad}")
    if problems:
        raise ValueError("Checkpoint does not match the architecture; " + "; ".join(problems))
    return _unflatten(got)


def convert_generator(g: PersistentObject, **overrides: Any) -> tuple[dict, dict]:
    """Official generator object -> (Generator kwargs, variables {'params', 'w_avg', 'noise_consts'})."""
    import jax
    import jax.numpy as jnp
    from kdjax.models.stylegan2 import Generator

    sd = state_dict(g)
    kwargs = infer_generator_kwargs(g, sd)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    gen = Generator(**kwargs)
    z = jnp.zeros((1, gen.z_dim))
    labels = jnp.zeros((1,), jnp.int32) if gen.c_dim else None
    expected = jax.eval_shape(lambda: gen.init({"params": jax.random.key(0)}, z, labels,
                                               noise_mode="const"))
    return kwargs, convert_state_dict(sd, expected)


# --- Model bundle (kdjax.checkpoints): model.json + Orbax variables/ --------------------------------------

def save_teacher(out_dir: str | os.PathLike, kwargs: Mapping[str, Any], variables: Mapping,
                 extra: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Writes a StyleGAN2 generator as a model bundle (DIR/model.json + DIR/variables/)."""
    from kdjax import checkpoints

    out = pathlib.Path(out_dir).resolve()
    checkpoints.save_model_bundle(out, "stylegan2_generator", dict(kwargs), dict(variables),
                                  extra=dict(extra) if extra else None)
    return out


def load_teacher(teacher_dir: str | os.PathLike, dtype: Any = None, field: str = "teacher"):
    """Reads a bundle written by `save_teacher` / the import command.

    Returns:
      (module, variables): the `Generator` model.json describes (compute `dtype` if given) and its
      variables {'params', 'w_avg', 'noise_consts'}.
    """
    from kdjax import checkpoints
    from kdjax.models import build_model

    meta, variables = checkpoints.load_model_bundle(teacher_dir, field)
    kwargs = dict(meta["kwargs"])
    if dtype is not None:
        kwargs["dtype"] = dtype
    return build_model(meta["model"], **kwargs), dict(variables)


def import_pickle(pkl: str | os.PathLike, out_dir: str | os.PathLike, network: str = "G_ema",
                  **overrides: Any) -> pathlib.Path:
    """Converts `network` of an official pickle to DIR (see the module docstring)."""
    data = load_network_pickle(pkl)
    if network not in data:
        raise KeyError(f"{pkl}: no {network!r} in the pickle (keys: {sorted(data)}).")
    g = data[network]
    if not isinstance(g, PersistentObject):
        raise ValueError(f"{network} is not a persistent network object.")
    kwargs, variables = convert_generator(g, **overrides)
    return save_teacher(out_dir, kwargs, variables,
                        extra={"source": str(pkl), "network": network, "class_name": g["class_name"]})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pkl", required=True, help="official network pickle (stylegan2-ada-pytorch/stylegan3)")
    p.add_argument("--out", required=True, help="output model bundle directory (model.json + Orbax variables/)")
    p.add_argument("--network", default="G_ema", help="which network of the pickle (default G_ema)")
    p.add_argument("--conv_clamp", type=float, default=None,
                   help="override conv_clamp (needed when the pickle has no init_kwargs)")
    args = p.parse_args(argv)
    out = import_pickle(args.pkl, args.out, network=args.network, conv_clamp=args.conv_clamp)
    meta = json.loads((out / "model.json").read_text())
    print(f"Wrote {out} ({meta['kwargs']}).")


if __name__ == "__main__":
    main()
