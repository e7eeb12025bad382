"""Import official StyleGAN2 network pickles (stylegan2-ada-pytorch, stylegan3) without running them.

`import_pickle(PKL, DIR)` writes DIR, a kdjax model bundle (`kdjax.models.bundles`): `variables/` (Orbax:
params, w_avg, noise_consts) and `model.json` (the Generator's fields), which a config can name as its
teacher; `load_teacher(DIR)` rebuilds (module, variables). The command is `python -m kdjax.stylegan2_import`.

PKL may also be an http(s):// or file:// URL: it is downloaded once into the cache folder
(`$KDJAX_CACHE`, default ~/.cache/kdjax/pickles) and read from there, through the same restricted unpickler.

The pickle is read by `kdjax.importers.safe_pickle` (a restricted unpickler: no code from the file runs);
this module infers the architecture, maps every official name to ours and writes the bundle. Every problem
with the file, from a truncated stream to a weight of the wrong shape, is a `NetworkPickleError` (a
ValueError) with a one-line message; a path that cannot be read or downloaded is an OSError.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from kdjax.importers.pickle_stream import describe
from kdjax.importers.safe_pickle import (NetworkPickleError, PersistentObject, UnsafePickleError,
                                         load_network_pickle, state_dict)
from kdjax.models import bundles
from kdjax.models.stylegan2 import Generator

__all__ = ["NetworkPickleError", "PersistentObject", "UnsafePickleError", "load_network_pickle", "state_dict",
           "convert_generator", "fetch_pickle", "import_pickle", "load_teacher", "read_init_kwargs",
           "save_teacher"]
URL_SCHEMES = ("http", "https", "file")


# --- architecture inference ------------------------------------------------------------------------------

MAX_RESOLUTION = 4096            # official StyleGAN2: up to 1024
MAX_FEATURES = 1 << 16           # any width, z_dim, w_dim, c_dim (official: up to 512)
_GENERATOR_ARGS = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels")


def _infer_channel_base(channels: dict[int, int], channel_max: int) -> int:
    top = max(channels)
    for base in range(channels[top] * top, channels[top] * top + top):
        if all(min(base // r, channel_max) == c for r, c in channels.items()):
            return base
    raise NetworkPickleError(f"Channel counts {channels} do not follow min(channel_base // res, channel_max).")


def _weight_shape(sd: Mapping[str, np.ndarray], name: str, ndim: int) -> tuple[int, ...]:
    """The shape of weight `name`, which must exist, have `ndim` axes, and sizes in 1..MAX_FEATURES."""
    if name not in sd:
        raise NetworkPickleError(f"Not a StyleGAN2 generator: no {name!r} weight.")
    shape = tuple(sd[name].shape)
    if len(shape) != ndim or not all(1 <= n <= MAX_FEATURES for n in shape):
        raise NetworkPickleError(f"{name}: shape {shape} is not {ndim}-D with sizes 1..{MAX_FEATURES}.")
    return shape


def _numbered(sd: Mapping[str, np.ndarray], pattern: str) -> list[int]:
    return sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(pattern, k, re.ASCII)))


def _kwargs_from_weights(sd: Mapping[str, np.ndarray]) -> tuple[dict, dict[int, int]]:
    """Generator fields read off the weight shapes, and the channel count per resolution."""
    fc = _numbered(sd, r"mapping\.fc([0-9]{1,4})\.weight")
    res = _numbered(sd, r"synthesis\.b([0-9]{1,5})\.conv1\.weight")
    if not fc or not res:
        raise NetworkPickleError("Not a StyleGAN2 generator: no mapping.fc*/synthesis.b*.conv1 weights found.")
    if fc != list(range(len(fc))) or res[-1] > MAX_RESOLUTION or res != [4 << i for i in range(len(res))]:
        raise NetworkPickleError(f"Not a StyleGAN2 generator: mapping layers {fc[:8]}, synthesis blocks "
                                 f"{res[:8]} (expected fc0, fc1, ... and b4, b8, ... up to b{MAX_RESOLUTION}).")
    channels = {r: _weight_shape(sd, f"synthesis.b{r}.conv1.weight", 4)[0] for r in res}
    embed, c_dim = (_weight_shape(sd, "mapping.embed.weight", 2) if "mapping.embed.weight" in sd else (0, 0))
    fc0 = _weight_shape(sd, "mapping.fc0.weight", 2)
    w_dim = _weight_shape(sd, f"mapping.fc{fc[-1]}.weight", 2)[0]
    layer = fc0[0] if len(fc) > 1 else w_dim
    if fc0[1] <= embed:
        raise NetworkPickleError(f"mapping.fc0.weight: {fc0[1]} inputs leave no room for z next to the "
                                 f"{embed} label-embedding features.")
    channel_max = max(channels.values())
    kw = dict(z_dim=fc0[1] - embed, w_dim=w_dim, c_dim=c_dim, img_resolution=res[-1],
              img_channels=_weight_shape(sd, f"synthesis.b{res[-1]}.torgb.weight", 4)[0],
              channel_base=_infer_channel_base(channels, channel_max), channel_max=channel_max,
              mapping_layers=len(fc), mapping_embed_features=(embed if c_dim and embed != w_dim else None),
              mapping_layer_features=(layer if layer != w_dim else None), conv_clamp=None)
    return kw, channels


def _kwargs_dict(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise NetworkPickleError(f"{what} is {describe(value)}, not a dict of keyword arguments.")
    return dict(value)


def read_init_kwargs(g: PersistentObject) -> tuple[dict, dict, dict]:
    """(generator, synthesis, mapping) keyword arguments the pickle records, in either official layout.

    stylegan2-ada-pytorch (training/networks.py): `Generator(z_dim, c_dim, w_dim, img_resolution,
    img_channels, mapping_kwargs={}, synthesis_kwargs={})`, so init_kwargs nests the synthesis ones. stylegan3
    (training/networks_stylegan2.py): `Generator(..., mapping_kwargs={}, **synthesis_kwargs)`, so they lie
    flat in init_kwargs (channel_base, channel_max, num_fp16_res, conv_clamp, ...). Both are read; a key
    given both ways is an error.
    """
    init = _kwargs_dict(g["state"].get("_init_kwargs"), "init_kwargs")
    top = {k: init[k] for k in _GENERATOR_ARGS if k in init}
    syn = {k: v for k, v in init.items() if k not in _GENERATOR_ARGS + ("mapping_kwargs", "synthesis_kwargs")}
    for key, value in _kwargs_dict(init.get("synthesis_kwargs"), "init_kwargs['synthesis_kwargs']").items():
        if key in syn:
            raise NetworkPickleError(f"init_kwargs gives {key!r} both flat and in synthesis_kwargs.")
        syn[key] = value
    return top, syn, _kwargs_dict(init.get("mapping_kwargs"), "init_kwargs['mapping_kwargs']")


def _number(value: Any, what: str, integer: bool = False) -> float | int:
    """A finite int or float from init_kwargs, |value| < 2**31 (an int if `integer`), else NetworkPickleError."""
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if numeric and -2 ** 31 < value < 2 ** 31 and (not integer or value == int(value)):   # NaN, inf fail here
        return int(value) if integer else float(value)
    kind = "an integer" if integer else "a number"
    raise NetworkPickleError(f"init_kwargs {what}={describe(value)} is not {kind} of magnitude below 2**31.")


def _is_default_filter(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            and [float(v) for v in value] == [1.0, 3.0, 3.0, 1.0])


def infer_generator_kwargs(g: PersistentObject, sd: Mapping[str, np.ndarray]) -> dict:
    """Generator fields from the pickle's `init_kwargs` (either layout, `read_init_kwargs`) where present,
    checked against the weight shapes, which give the rest."""
    kw, channels = _kwargs_from_weights(sd)
    top, syn, mapk = read_init_kwargs(g)
    for key, value in top.items():
        if _number(value, key, integer=True) != kw[key]:
            raise NetworkPickleError(f"init_kwargs {key}={describe(value)} disagrees with the weights ({kw[key]}).")
    if "channel_base" in syn or "channel_max" in syn:
        base = _number(syn.get("channel_base", 32768), "channel_base", integer=True)
        cmax = _number(syn.get("channel_max", 512), "channel_max", integer=True)
        if base < 1 or cmax < 1 or any(min(base // r, cmax) != c for r, c in channels.items()):
            raise NetworkPickleError(f"init_kwargs channel_base={base}, channel_max={cmax} disagree with the weights.")
        kw["channel_base"], kw["channel_max"] = base, cmax
    if syn.get("conv_clamp") is not None:
        kw["conv_clamp"] = _number(syn["conv_clamp"], "conv_clamp")
    if mapk.get("w_avg_beta") is not None:
        kw["w_avg_beta"] = _number(mapk["w_avg_beta"], "w_avg_beta")
    if mapk.get("lr_multiplier") is not None:
        kw["mapping_lr_multiplier"] = _number(mapk["lr_multiplier"], "lr_multiplier")
    for key, ok in (("architecture", "skip"), ("activation", "lrelu"), ("use_noise", True)):
        for src in (syn, mapk):
            if key in src and not (type(src[key]) is type(ok) and src[key] == ok):
                raise NetworkPickleError(f"Unsupported official option {key}={describe(src[key])} (kdjax "
                                         f"supports {ok!r}).")
    if "resample_filter" in syn and not _is_default_filter(syn["resample_filter"]):
        raise NetworkPickleError(f"Unsupported resample_filter {describe(syn['resample_filter'])} "
                                 f"(kdjax: [1, 3, 3, 1]).")
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
            raise NetworkPickleError(f"{name!r}: not the [1,3,3,1] filter kdjax implements.")
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


def _listing(items: list[str], limit: int = 40) -> str:
    return f"{items[:limit]}" + (f" and {len(items) - limit} more" if len(items) > limit else "")


def convert_state_dict(sd: Mapping[str, np.ndarray], expected: Mapping) -> dict:
    """Maps an official state dict onto our variable tree, checking names and shapes both ways.

    Args:
      sd: official flat names -> arrays.
      expected: our variables (or their `jax.eval_shape`), {collection: tree}.
    Raises:
      NetworkPickleError (a ValueError) naming every official name left over, every one of ours missing, and
      shape mismatches.
    """
    want = {(col,) + p: v for col, tree in expected.items() for p, v in traverse_util.flatten_dict(tree).items()}
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
        problems.append(f"official names with no kdjax counterpart: {_listing(sorted(extra))}")
    if missing:
        problems.append(f"names missing from the pickle: {_listing(missing)}")
    if bad:
        problems.append(f"shape mismatches: {_listing(bad)}")
    if problems:
        raise NetworkPickleError("Checkpoint does not match the architecture; " + "; ".join(problems))
    return traverse_util.unflatten_dict(got)


def convert_generator(g: PersistentObject, **overrides: Any) -> tuple[dict, dict]:
    """Official generator object -> (Generator kwargs, variables {'params', 'w_avg', 'noise_consts'})."""
    sd = state_dict(g)
    kwargs = infer_generator_kwargs(g, sd)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    gen = Generator(**kwargs)
    z = jnp.zeros((1, gen.z_dim))
    labels = jnp.zeros((1,), jnp.int32) if gen.c_dim else None
    expected = jax.eval_shape(lambda: gen.init({"params": jax.random.key(0)}, z, labels,
                                               noise_mode="const"))
    return kwargs, convert_state_dict(sd, expected)


# --- Model bundle (kdjax.models.bundles): model.json + Orbax variables/ ----------------------------------

def save_teacher(out_dir: str | os.PathLike, kwargs: Mapping[str, Any], variables: Mapping,
                 extra: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Writes a StyleGAN2 generator as a model bundle (DIR/model.json + DIR/variables/)."""
    out = pathlib.Path(out_dir).resolve()
    bundles.save_model_bundle(out, "stylegan2_generator", dict(kwargs), dict(variables),
                                  extra=dict(extra) if extra else None)
    return out


def load_teacher(teacher_dir: str | os.PathLike, dtype: Any = None, field: str = "teacher"):
    """Reads a bundle written by `save_teacher` / the import command.

    Returns:
      (module, variables): the `Generator` model.json describes (compute `dtype` if given) and its
      variables {'params', 'w_avg', 'noise_consts'}.
    """
    model, variables, _ = bundles.load_model(teacher_dir, field, **({} if dtype is None else {"dtype": dtype}))
    return model, dict(variables)


def fetch_pickle(pkl: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """A local path for `pkl`: a path is checked and returned; an http(s)/file URL is downloaded once into
    `cache_dir` (default `$KDJAX_CACHE` or ~/.cache/kdjax, sub-folder `pickles`) under a name made of the URL's
    hash and file name, written to a temporary file first so that an interrupted download leaves nothing.
    Raises FileNotFoundError (missing path) or OSError (download failed), naming `pkl`."""
    text = os.fspath(pkl)
    scheme = urllib.parse.urlparse(text).scheme
    if scheme not in URL_SCHEMES:
        path = pathlib.Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--pkl={text!r} is not an existing file; give a network pickle's path or an "
                                    f"{'/'.join(URL_SCHEMES)} URL.")
        return path
    root = pathlib.Path(cache_dir or os.environ.get("KDJAX_CACHE") or pathlib.Path.home() / ".cache" / "kdjax")
    name = pathlib.PurePosixPath(urllib.parse.urlparse(text).path).name or "network.pkl"
    target = root / "pickles" / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}-{name}"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=".download-")
    try:
        print(f"Downloading {text} -> {target}", file=sys.stderr)
        with urllib.request.urlopen(text) as response, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
        os.replace(partial, target)
    except Exception as e:
        pathlib.Path(partial).unlink(missing_ok=True)
        raise OSError(f"--pkl={text!r}: download failed ({type(e).__name__}: {e}).") from e
    return target


def import_pickle(pkl: str | os.PathLike, out_dir: str | os.PathLike, network: str = "G_ema",
                  cache_dir: str | os.PathLike | None = None, **overrides: Any) -> pathlib.Path:
    """Converts `network` of an official pickle (a path or URL, see `fetch_pickle`) to DIR (see the module
    docstring). Raises NetworkPickleError for anything wrong with the file, OSError for a bad path or URL."""
    data = load_network_pickle(fetch_pickle(pkl, cache_dir))
    if network not in data:
        raise NetworkPickleError(f"{os.fspath(pkl)!r}: no {network!r} in the pickle (keys: {describe(list(data))}).")
    g = data[network]
    if not isinstance(g, PersistentObject):
        raise NetworkPickleError(f"{network!r} is {describe(g)}, not a persistent network object.")
    kwargs, variables = convert_generator(g, **overrides)
    return save_teacher(out_dir, kwargs, variables,
                        extra={"source": str(pkl), "network": network, "class_name": g["class_name"]})
