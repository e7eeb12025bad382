"""Model bundles: how a trained network leaves a run and enters another.

A bundle (a classic-KD teacher, a StyleGAN2 teacher, a judge, an imported official pickle, an exported
student) is a directory with `model.json` ({"model": registry name, "kwargs": fields, ...}) and
`variables/` (an Orbax checkpoint of the Flax variables). Any config can name a bundle as its teacher or
judge; it is loaded once and never re-saved in a student's checkpoints. `check_model_bundle` reads
`model.json` and the Orbax metadata of `variables/` and checks the shapes against the model's
(`jax.eval_shape` of its init) before any compute, so a bundle with garbage or foreign variables is named
in one error.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from kdjax import models
from kdjax.core import parallel
from kdjax.core.checkpoints import (CheckpointError, CheckpointWriteError, shape_mismatch, tree_shapes,
                                    write_failure_reason)
from kdjax.models.interface import LATENT_KINDS


def save_model_bundle(directory: str | pathlib.Path, model: str, kwargs: dict[str, Any], variables: Any,
                      extra: dict[str, Any] | None = None) -> None:
    """Writes `model.json` and `variables/` to `directory` (process 0 writes the JSON)."""
    directory = pathlib.Path(directory).absolute()
    # Host numpy values: valid in a multi-host job too (Orbax writes them once, from the primary host).
    variables = jax.tree.map(lambda x: np.asarray(parallel.to_host(x)), variables)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(directory / "variables", variables, force=True)
        if jax.process_index() == 0:
            meta = {"model": model, "kwargs": kwargs, **(extra or {})}
            (directory / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    except Exception as e:
        if jax.process_index() == 0:  # Orbax leaves its temporary directory behind
            for tmp in directory.glob("variables.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"could not write the model bundle {str(directory)!r}: {write_failure_reason(e)}. "
                                   "Fix that, then run the same command again (a training run resumes from its "
                                   "checkpoints, which are kept).") from e


def check_model_bundle(directory: str | pathlib.Path, field: str, kind: str | None = None) -> dict[str, Any]:
    """Validates a bundle before any compute; returns its `model.json`. Raises CheckpointError.

    Args:
      field: the config field or flag that named the bundle (for the message).
      kind: when given, the bundle must hold a model of this kind ("generator", "classifier", ...).
    """
    path = pathlib.Path(directory).expanduser()
    meta_path = path / "model.json"
    if not path.is_dir():
        raise CheckpointError(f"{field}={str(directory)!r} is not an existing directory; expected a model "
                              "bundle (a directory with model.json and variables/).")
    if not meta_path.is_file() or not (path / "variables").is_dir():
        raise CheckpointError(f"{field}={str(directory)!r} is not a model bundle: it needs model.json and "
                              f"variables/; it holds {sorted(p.name for p in path.iterdir())}.")
    try:
        meta = json.loads(meta_path.read_text())
        name, kwargs = meta["model"], meta["kwargs"]
    except Exception as e:
        raise CheckpointError(f"{field}: unreadable {str(meta_path)!r} ({type(e).__name__}: {e}); expected JSON "
                              'with keys "model" and "kwargs".') from e
    try:
        models.check_model_kwargs(name, kwargs, where=str(meta_path))
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    if kind is not None and models.kind(name) != kind:
        article = "an" if kind[0] in "aeiou" else "a"
        raise CheckpointError(f"{field}={str(directory)!r} holds a {name!r} ({models.kind(name)}); {article} {kind} "
                              f"bundle is needed ({models.names_of_kind(kind)}).")
    check_bundle_variables(path / "variables", field, name, kwargs)
    return meta


def _init_arguments(model: nn.Module, channels: int) -> tuple[Any, ...]:
    """Arguments of `model.init` for one example: z (and labels) for a generator, an image (and labels) for a
    discriminator, an image with `channels` channels for a classifier (whose fields do not fix them), a latent
    for a latent decoder, a noisy image and its noise level (and labels) for a denoiser."""
    fields = type(model).DATA_FIELDS
    if model.KIND == "generator":
        args, num_classes = (jnp.zeros((1, model.spec.z_dim)),), model.spec.num_classes
    elif model.KIND == "image_to_image":  # any size; the input may carry extra channels (an inpainting mask)
        args, num_classes = (jnp.zeros((1, 8, 8, model.spec.in_channels)),), 0
    elif model.KIND == "latent_decoder":  # fully convolutional: any latent size
        args, num_classes = (jnp.zeros((1, 2, 2, model.spec.latent_channels)),), 0
    elif model.KIND in LATENT_KINDS:  # an image whose side is a multiple of the factor
        side = 2 * model.spec.factor
        args, num_classes = (jnp.zeros((1, side, side, model.spec.channels)),), 0
    elif model.KIND == "denoiser":  # a noisy image and its noise level
        spec = model.spec
        args = (jnp.zeros((1, spec.resolution, spec.resolution, spec.channels)), jnp.ones((1,)))
        num_classes = spec.num_classes
    else:
        res = getattr(model, fields["resolution"]) if "resolution" in fields else 8
        ch = getattr(model, fields["channels"]) if "channels" in fields else channels
        args = (jnp.zeros((1, res, res, ch)),)
        num_classes = getattr(model, fields["num_classes"]) if model.KIND in ("discriminator", "autoregressive") else 0
    return args + ((jnp.zeros((1,), jnp.int32),) if num_classes else ())


# expected_shapes' answers, by (name, kwargs as sorted JSON, channels): tracing a network's init costs up to half
# a second (an EDM U-Net), and a launch checks the same bundle several times (the config check, then each load).
_SHAPES: dict[tuple[str, str, int], dict[str, tuple[int, ...]]] = {}


def expected_shapes(name: str, kwargs: dict[str, Any], channels: int = 1) -> dict[str, tuple[int, ...]]:
    """{"collection/layer/param": shape} of model `name`'s variables, from `jax.eval_shape` of its init
    (no compute; remembered for the process). `channels` is a classifier's input channels."""
    key = (name, json.dumps(kwargs, sort_keys=True, default=repr), channels)
    if key not in _SHAPES:
        model = models.build_model(name, **kwargs)
        rngs = {"params": jax.random.key(0), "noise": jax.random.key(1), "dropout": jax.random.key(2)}
        args = _init_arguments(model, channels)
        _SHAPES[key] = tree_shapes(jax.eval_shape(lambda: model.init(rngs, *args, train=False)))
    return dict(_SHAPES[key])


def check_bundle_variables(path: pathlib.Path, field: str, name: str, kwargs: dict[str, Any]) -> None:
    """Checks, before any compute, that the bundle's `variables/` is an Orbax checkpoint whose metadata
    reads and whose shapes are those of the model `model.json` describes. Raises CheckpointError."""
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(path.absolute()).item_metadata
        if metadata is None:
            raise ValueError("no readable Orbax metadata")
        stored = tree_shapes(metadata.tree)
    except Exception as e:
        raise CheckpointError(f"{field}: the variables in {str(path)!r} are not a readable Orbax checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); expected "
                              "the variables/ directory written with the bundle's model.json.") from e
    channel_options = (1, 3) if models.kind(name) == "classifier" else (1,)  # data.channels is 1 or 3
    mismatches = [shape_mismatch(expected_shapes(name, kwargs, c), stored) for c in channel_options]
    if all(mismatches):
        raise CheckpointError(f"{field}: the variables in {str(path)!r} do not fit the {name!r} that model.json "
                              f"describes: {mismatches[0]}.")


def load_model_bundle(directory: str | pathlib.Path, field: str = "checkpoint",
                      mesh: Mesh | None = None) -> tuple[dict[str, Any], Any]:
    """Reads a bundle: returns (model.json contents, variables), replicated over `mesh` if given."""
    meta = check_model_bundle(directory, field)
    path = pathlib.Path(directory).expanduser().absolute() / "variables"
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            if mesh is None:
                variables = checkpointer.restore(path)
            else:
                sharding = parallel.replicated(mesh)
                tree = checkpointer.metadata(path).item_metadata.tree
                abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
                variables = checkpointer.restore(path, abstract)
    except Exception as e:
        raise CheckpointError(f"{field}: could not read the variables in {str(path)!r} "
                              f"({type(e).__name__}: {e}).") from e
    return meta, variables


def load_model(directory: str | pathlib.Path, field: str = "checkpoint", mesh: Mesh | None = None,
               **overrides: Any) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(module, variables, model.json) of a bundle; `overrides` (e.g. `dtype`) are set on the module."""
    meta, variables = load_model_bundle(directory, field, mesh)
    return models.build_model(meta["model"], **{**meta["kwargs"], **overrides}), variables, meta
