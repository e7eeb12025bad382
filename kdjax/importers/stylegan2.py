"""Import official StyleGAN2 network pickles (stylegan2-ada-pytorch, stylegan3) without running them.

`import_pickle(PKL, DIR)` writes DIR, a kdjax model bundle (`kdjax.models.bundles`): `variables/` (Orbax:
params, w_avg, noise_consts) and `model.json` (the Generator's fields), which a config can name as its
teacher; `load_teacher(DIR)` rebuilds (module, variables). The command is `python -m kdjax.stylegan2_import`.

PKL may also be an http(s):// or file:// URL: it is downloaded once into the cache folder
(`$KDJAX_CACHE`, default ~/.cache/kdjax/pickles) and read from there, through the same restricted unpickler.

The pickle is read by `kdjax.importers.safe_pickle` (a restricted unpickler: no code from the file runs);
this module infers the architecture, maps every official name to ours and writes the bundle.
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

from kdjax.importers.safe_pickle import PersistentObject, UnsafePickleError, load_network_pickle, state_dict
from kdjax.models import bundles
from kdjax.models.stylegan2 import Generator

__all__ = ["PersistentObject", "UnsafePickleError", "load_network_pickle", "state_dict", "convert_generator",
           "fetch_pickle", "import_pickle", "load_teacher", "save_teacher"]
URL_SCHEMES = ("http", "https", "file")


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


def convert_state_dict(sd: Mapping[str, np.ndarray], expected: Mapping) -> dict:
    """Maps an official state dict onto our variable tree, checking names and shapes both ways.

    Args:
      sd: official flat names -> arrays.
      expected: our variables (or their `jax.eval_shape`), {collection: tree}.
    Raises:
      ValueError naming every official name left over, every one of ours missing, and shape mismatches.
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
        problems.append(f"official names with no kdjax counterpart: {sorted(extra)}")
    if missing:
        problems.append(f"names missing from the pickle: {missing}")
    if bad:
        problems.append(f"shape mismatches: {bad}")
    if problems:
        raise ValueError("Checkpoint does not match the architecture; " + "; ".join(problems))
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
    docstring)."""
    data = load_network_pickle(fetch_pickle(pkl, cache_dir))
    if network not in data:
        raise KeyError(f"{pkl}: no {network!r} in the pickle (keys: {sorted(data)}).")
    g = data[network]
    if not isinstance(g, PersistentObject):
        raise ValueError(f"{network} is not a persistent network object.")
    kwargs, variables = convert_generator(g, **overrides)
    return save_teacher(out_dir, kwargs, variables,
                        extra={"source": str(pkl), "network": network, "class_name": g["class_name"]})
