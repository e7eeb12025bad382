"""Import official NVlabs/edm network pickles (Karras et al. 2022; edm-cifar10-32x32-cond-vp.pkl & co) as kdjax
denoiser bundles, without running them.

`import_pickle(PKL, DIR)` writes DIR, a model bundle (`kdjax.models.bundles`: model.json + variables/) of
`edm_songunet` or `edm_dhariwalunet` (`kdjax.models.edm_official`), which `bundles.load_model` reads back and a
config can name as its diffusion teacher. The command is `python -m kdjax.edm_import`. PKL may be a path or an
http(s)/file URL (downloaded once into the cache, `kdjax.importers.stylegan2.fetch_pickle`).

An NVlabs/edm pickle is {'ema': network, 'loss_fn', 'augment_pipe', 'dataset_kwargs'}, read by the restricted
unpickler (`safe_pickle`, whose allow-list has torch's ModuleDict for these networks; no code from the file runs). The
network must be an `EDMPrecond` (the edm-*.pkl pickles; the baseline-*.pkl ones use VPPrecond, VEPrecond or
iDDPMPrecond, whose c_noise differ) around a SongUNet or DhariwalUNet. Its settings come from its recorded
`init_kwargs` (official defaults for what is not recorded), each checked for type and range; every official option
of the two networks is supported, and an option the official constructors do not take is refused by name. Its
parameters map one to one onto the port's (`model.enc.32x32_block0.conv0.weight` -> params/model/enc/32x32_block0/
conv0/weight; conv weights OIHW -> HWIO, linear weights (out, in) -> (in, out)); the resampling filters' buffers
are checked against the filter the settings name and dropped. Names left over, missing or misshapen are listed.

Every problem with the file is a `NetworkPickleError` (a ValueError) with a one-line message; a path that cannot be
read or downloaded is an OSError. Memory and time are bounded as for StyleGAN2 pickles (`pickle_stream.Budget`),
and the settings are bounded before any network is built.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from kdjax import models
from kdjax.importers.safe_pickle import load_network_pickle
from kdjax.importers.pickle_stream import NetworkPickleError, describe
from kdjax.importers.safe_pickle import PersistentObject, state_dict
from kdjax.importers.stylegan2 import fetch_pickle
from kdjax.models import bundles
from kdjax.models.edm_official_layers import filter_2d

__all__ = ["MODEL_NAMES", "NetworkPickleError", "PersistentObject", "convert_network", "convert_state_dict",
           "import_pickle", "read_settings"]
MODEL_NAMES = {"SongUNet": "edm_songunet", "DhariwalUNet": "edm_dhariwalunet"}
OTHER_PRECONDS = ("VPPrecond", "VEPrecond", "iDDPMPrecond")

# Official EDMPrecond argument -> (our field or None for metadata only, official default).
PRECOND_ARGS = {"img_resolution": ("resolution", None), "img_channels": ("channels", None),
                "label_dim": ("num_classes", 0), "sigma_data": ("sigma_data", 0.5), "use_fp16": (None, False),
                "sigma_min": (None, 0.0), "sigma_max": (None, math.inf), "model_type": (None, "DhariwalUNet")}
# Official network options (same names as our fields) -> the check of their value: (kind, low, high).
COMMON_OPTIONS = {"model_channels": ("int", 1, 4096), "channel_mult": ("ints", 1, 64),
                  "channel_mult_emb": ("int", 1, 64), "num_blocks": ("int", 0, 32),
                  "attn_resolutions": ("ints", 1, 1 << 16), "dropout": ("float", 0, 1),
                  "label_dropout": ("float", 0, 1), "augment_dim": ("int", 0, 1024)}
OPTIONS = {"DhariwalUNet": COMMON_OPTIONS,
           "SongUNet": {**COMMON_OPTIONS, "embedding_type": ("str", 0, 0), "channel_mult_noise": ("int", 1, 64),
                        "encoder_type": ("str", 0, 0), "decoder_type": ("str", 0, 0),
                        "resample_filter": ("floats", 0, 1 << 16)}}
LIMITS = {"img_resolution": (1, 4096), "img_channels": (1, 64), "label_dim": (0, 1 << 20)}
MAX_LEVELS = 12
TENSORS_PER_BLOCK = 10  # a UNetBlock's weight and bias of norm0, conv0, affine, norm1 and conv1, at least


def _value(value: Any, name: str, kind: str, low: float, high: float) -> Any:
    """An init_kwargs value checked for its kind and range (ints in [low, high], floats in [low, high), lists of
    at most MAX_LEVELS of them); returns it as our field's type (tuples for lists)."""
    number = lambda v: isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
    if kind == "str":
        if isinstance(value, str) and len(value) <= 64:
            return value
    elif kind == "int":
        if number(value) and value == int(value) and low <= value <= high:
            return int(value)
    elif kind == "float":
        if number(value) and low <= value < high:
            return float(value)
    elif isinstance(value, (list, tuple)) and len(value) <= MAX_LEVELS:
        items = [_value(v, f"{name}[{i}]", "float" if kind == "floats" else "int", low, high)
                 for i, v in enumerate(value)]
        return tuple(items)
    what = {"str": "a string", "int": f"an integer in [{low}, {high}]", "float": f"a number in [{low}, {high})",
            "ints": f"a list of integers in [{low}, {high}]", "floats": f"a list of numbers in [{low}, {high})"}[kind]
    raise NetworkPickleError(f"init_kwargs {name}={describe(value)} is not {what}.")


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) if not isinstance(a, (list, tuple)) else list(a) == list(b)
    except (TypeError, ValueError):  # arrays and other values that do not compare to one bool
        return False


def _finite(value: Any) -> float | None:
    """A finite number as a float, else None (JSON holds no inf; the official sigma_max defaults to inf)."""
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    return float(value) if numeric and math.isfinite(value) else None


def read_settings(net: PersistentObject) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(registry name, model fields, official metadata) of an EDMPrecond from its recorded init_kwargs.

    Raises NetworkPickleError for another class, missing init_kwargs, an option the official constructors do not
    take, a value of the wrong type or range, or settings that make no valid network.
    """
    class_name = net["class_name"]
    if class_name != "EDMPrecond":
        hint = (" (a baseline pickle: VP/VE/iDDPM preconditioning, whose c_noise and c_out differ)"
                if class_name in OTHER_PRECONDS else "")
        raise NetworkPickleError(f"the network is a {describe(class_name)}{hint}; kdjax imports NVlabs/edm's "
                                 "EDMPrecond networks (the edm-*.pkl pickles).")
    state = net["state"] if isinstance(net["state"], dict) else {}
    init = state.get("_init_kwargs")
    if not isinstance(init, dict) or not all(isinstance(k, str) for k in init) or "img_resolution" not in init:
        raise NetworkPickleError(f"EDMPrecond: init_kwargs {describe(init)} are not the recorded constructor "
                                 "arguments (a dict with img_resolution, img_channels, ...).")
    model_type = init.get("model_type", PRECOND_ARGS["model_type"][1])
    if not isinstance(model_type, str) or model_type not in MODEL_NAMES:
        raise NetworkPickleError(f"Unsupported official option model_type={describe(model_type)} (kdjax supports "
                                 f"{list(MODEL_NAMES)}).")
    unknown = sorted(k for k in init if k not in PRECOND_ARGS and k not in OPTIONS[model_type])
    if unknown:
        raise NetworkPickleError(f"Unsupported official option(s) {describe(unknown)} for {model_type} (the official "
                                 f"constructor takes {sorted(OPTIONS[model_type])}).")
    fields: dict[str, Any] = {}
    for key, (field, default) in PRECOND_ARGS.items():
        if key in init and key in state and not _same(init[key], state[key]):
            raise NetworkPickleError(f"EDMPrecond: init_kwargs {key}={describe(init[key])} disagrees with the "
                                     f"network's attribute {describe(state[key])}.")
        value = init.get(key, state.get(key, default))
        if field is not None and value is not None:
            fields[field] = (_value(value, key, "int", *LIMITS[key]) if key in LIMITS
                             else _value(value, key, "float", 1e-6, 1e6))
    for key, (kind, low, high) in OPTIONS[model_type].items():
        if key in init:
            fields[key] = _value(init[key], key, kind, low, high)
    if "channels" not in fields:
        raise NetworkPickleError("EDMPrecond: init_kwargs record no img_channels.")
    name = MODEL_NAMES[model_type]
    try:
        models.build_model(name, **fields).check()
    except ValueError as e:
        raise NetworkPickleError(f"the pickle's settings make no valid {model_type}: {e}") from None
    meta = {k: _finite(init.get(k, state.get(k, PRECOND_ARGS[k][1]))) for k in ("sigma_min", "sigma_max")}
    use_fp16 = init.get("use_fp16", state.get("use_fp16", False))
    meta["use_fp16"] = use_fp16 if isinstance(use_fp16, bool) else None
    return name, fields, {"class_name": class_name, "model_type": model_type, **meta}


def _listing(items: list[str], limit: int = 40) -> str:
    return f"{items[:limit]}" + (f" and {len(items) - limit} more" if len(items) > limit else "")


def convert_state_dict(sd: Mapping[str, np.ndarray], expected: Mapping, resample_filter: tuple[float, ...]) -> dict:
    """Maps an official EDMPrecond state dict onto our variables {collection: tree}, checking names and shapes both
    ways; `resample_filter` is the filter every `*.resample_filter` buffer must hold (then dropped).

    Raises NetworkPickleError naming every official name left over, every one of ours missing, shape mismatches
    and tensors that are not floating point.
    """
    want = {(col,) + p: v for col, tree in expected.items() for p, v in traverse_util.flatten_dict(tree).items()}
    got, extra, bad = {}, [], []
    for name, value in sd.items():
        if name.endswith(".resample_filter"):
            f = filter_2d(resample_filter)
            if value.shape != f.shape or not np.allclose(value, f, atol=1e-6):
                bad.append(f"{name}: not the filter {list(resample_filter)} the settings name")
            continue
        if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
            bad.append(f"{name}: {value.dtype} is not a floating-point tensor")
            continue
        if name.endswith(".weight") and value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif name.endswith(".weight") and value.ndim == 2:
            value = value.T  # (out, in) -> (in, out)
        key = ("params",) + tuple(name.split("."))
        if key not in want:
            extra.append(name)
        elif tuple(value.shape) != tuple(want[key].shape):
            bad.append(f"{name}: {tuple(value.shape)} vs expected {tuple(want[key].shape)} (in kdjax's layout)")
        else:
            got[key] = np.asarray(value, np.float32)
    missing = sorted(".".join(k[1:]) for k in want if k not in got)
    problems = [f"{what}: {_listing(sorted(items))}" for what, items in (
        ("official names with no kdjax counterpart", extra), ("names missing from the pickle", missing),
        ("bad tensors", bad)) if items]
    if problems:
        raise NetworkPickleError("the network does not match its settings; " + "; ".join(problems))
    return traverse_util.unflatten_dict(got)


def convert_network(net: PersistentObject) -> tuple[str, dict[str, Any], dict, dict[str, Any]]:
    """An official EDMPrecond -> (registry name, model fields, variables {'params'}, official metadata)."""
    name, fields, meta = read_settings(net)
    modules = net["state"].get("_modules") if isinstance(net["state"], dict) else None
    inner = modules.get("model") if isinstance(modules, dict) else None
    inner_name = inner.get("class_name") if isinstance(inner, PersistentObject) else None
    if inner_name != meta["model_type"]:
        raise NetworkPickleError(f"EDMPrecond.model is {describe(inner_name or inner)}, not the {meta['model_type']} "
                                 "its init_kwargs name.")
    sd = state_dict(net)
    model = models.build_model(name, **fields)
    needed = TENSORS_PER_BLOCK * model.arch().num_blocks_total()
    if len(sd) < needed:  # before building anything: the file's size bounds the work its settings ask for
        raise NetworkPickleError(f"the network holds {len(sd)} tensors, fewer than the {needed} or more its settings "
                                 f"({describe(sorted(fields.items()))}) need.")
    spec = model.spec
    x = jnp.zeros((1, spec.resolution, spec.resolution, spec.channels))
    labels = jnp.zeros((1,), jnp.int32) if spec.num_classes else None
    expected = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, jnp.ones((1,)), labels))
    resample_filter = tuple(fields.get("resample_filter", (1, 1))) if meta["model_type"] == "SongUNet" else (1, 1)
    return name, fields, convert_state_dict(sd, expected, resample_filter), meta


def import_pickle(pkl: str | os.PathLike, out_dir: str | os.PathLike, network: str = "ema",
                  cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Converts `network` of an official NVlabs/edm pickle (a path or URL) to the bundle DIR (module docstring).

    Raises NetworkPickleError for anything wrong with the file, OSError for a bad path or URL.
    """
    data = load_network_pickle(fetch_pickle(pkl, cache_dir))
    if network not in data:
        raise NetworkPickleError(f"{os.fspath(pkl)!r}: no {network!r} in the pickle (keys: {describe(list(data))}).")
    net = data[network]
    if not isinstance(net, PersistentObject):
        raise NetworkPickleError(f"{network!r} is {describe(net)}, not a persistent network object.")
    name, fields, variables, meta = convert_network(net)
    out = pathlib.Path(out_dir).resolve()
    bundles.save_model_bundle(out, name, fields, variables,
                              extra={"source": os.fspath(pkl), "network": network, "official": meta})
    return out
