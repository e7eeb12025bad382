"""What an exported model computes: a bundle's network as one pure function of named arrays.

`from_bundle` reads a model bundle (`kdjax.models.bundles`) and returns a `Signature`: the function with the
variables closed over (inference mode: BatchNorm's running averages, StyleGAN2's constant noise), the named
inputs and output with their shapes (batch first), dtypes and meaning, and the metadata every export
carries. By kind:

- generator: `z` (B, z_dim) float32 drawn from N(0, 1) [, `labels` (B,) int32 in [0, num_classes)] ->
  `images` (B, R, R, C) float32 NHWC, about [-1, 1] and not clipped (to uint8: clip((x + 1) * 127.5)).
- classifier: `images` (B, H, W, C) float32 NHWC in [-1, 1] -> `logits` (B, num_classes). The input shape
  is the bundle's `input_shape` (kdjax's jobs write it) or the caller's.
- discriminator: `images` (B, R, R, C) [, `labels`] -> `logits` (B,).
- autoregressive (PixelCNN): `images` (B, R, R, C) [, `labels`] -> `logits` (B, R, R, C, levels), one
  categorical distribution per pixel and channel given the pixels before it (sampling runs the exported
  function R * R * C times, feeding back each drawn level as 2 k / (levels - 1) - 1).
- image_to_image (super-resolution, inpainting, enhancement): `images` (B, H, W, C_in) at the export's fixed
  `--input_shape` -> `images` (B, H * scale, W * scale, C).
- autoencoder (VQ-VAE): its decoder, `codes` (B, h, h) int32 in [0, num_codes) -> `images` (B, R, R, C), the
  half that turns a prior's sampled codes into images.
- latent_autoencoder, latent_encoder, latent_decoder (the VAE and its tiny halves): not exportable yet (one
  clear error).
- denoiser (a diffusion model's D(x; sigma)): not exportable yet (one clear error).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import kdjax
from kdjax import models
from kdjax.core.checkpoints import CheckpointError
from kdjax.deploy.errors import ExportError
from kdjax.models import bundles
from kdjax.models.interface import LATENT_KINDS

IMAGES = "NHWC float32 in [-1, 1]"


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One named input or output: shape without the batch, dtype, and what its values mean."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    meaning: str

    def describe(self, batch: int | None) -> dict[str, Any]:
        return {"name": self.name, "shape": [batch, *self.shape], "dtype": self.dtype, "meaning": self.meaning}


@dataclasses.dataclass(frozen=True)
class Signature:
    """A bundle's network as `fn(*inputs) -> output` (arrays in the order of `inputs`)."""

    fn: Callable[..., jax.Array]
    inputs: tuple[Tensor, ...]
    output: Tensor
    model: str
    kwargs: dict[str, Any]
    kind: str
    num_classes: int  # of the `labels` input (0: none)
    options: dict[str, Any]  # call options fixed in the export (noise_mode, truncation_psi)
    source: str  # the bundle's path
    num_codes: int = 0  # of the `codes` input of an autoencoder's decoder (0: none)

    def abstract_inputs(self, batch: Any) -> list[jax.ShapeDtypeStruct]:
        """The inputs as shape/dtype structs with `batch` rows (an int or a symbolic dimension)."""
        return [jax.ShapeDtypeStruct((batch, *t.shape), jnp.dtype(t.dtype)) for t in self.inputs]

    def metadata(self, fmt: str, batch: int | None, converter: str) -> dict[str, Any]:
        """What every export carries (`batch` None = dynamic)."""
        return {"kdjax_version": kdjax.__version__, "jax_version": jax.__version__, "format": fmt,
                "converter": converter, "model": self.model, "kwargs": self.kwargs, "kind": self.kind,
                "options": self.options, "source_bundle": self.source, "layout": "NHWC",
                "batch": "dynamic" if batch is None else batch,
                "inputs": [t.describe(batch) for t in self.inputs], "outputs": [self.output.describe(batch)]}


def example_inputs(signature: Signature, batch: int, seed: int = 0) -> list[np.ndarray]:
    """Random inputs as the model meets them: N(0, 1) latents, uniform labels, uniform images in [-1, 1]."""
    rng = np.random.default_rng(seed)
    out = []
    for t in signature.inputs:
        shape = (batch, *t.shape)
        if t.name == "labels":
            out.append(rng.integers(0, signature.num_classes, size=shape).astype(np.int32))
        elif t.name == "codes":
            out.append(rng.integers(0, signature.num_codes, size=shape).astype(np.int32))
        elif t.name == "z":
            out.append(rng.standard_normal(shape).astype(np.float32))
        else:
            out.append(rng.uniform(-1.0, 1.0, size=shape).astype(np.float32))
    return out


def call_options(module: Any, truncation_psi: float | None) -> dict[str, Any]:
    """The generator call options an export fixes, among those the family's `__call__` takes: constant
    noise (a deployed generator is a deterministic function of its inputs) and the truncation."""
    params = inspect.signature(type(module).__call__).parameters
    options: dict[str, Any] = {}
    if "noise_mode" in params:
        options["noise_mode"] = "const"
    if truncation_psi is not None:
        if "truncation_psi" not in params:
            raise ExportError(f"truncation_psi={truncation_psi}: the {type(module).__name__} generator has no "
                              "truncation; leave it unset.")
        options["truncation_psi"] = float(truncation_psi)
    return options


def from_bundle(path: str, input_shape: Sequence[int] | None = None,
                truncation_psi: float | None = None) -> Signature:
    """The signature of the network in bundle `path`. Raises ExportError (bad bundle, missing input shape).

    Args:
      input_shape: (H, W, C) of a classifier's images; needed when the bundle does not record it.
      truncation_psi: a generator's truncation (families that have one; default: none, psi = 1).
    """
    try:
        module, variables, meta = bundles.load_model(path, "--bundle")
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    module = models.outside_data_parallel(module)
    name, kwargs, kind = meta["model"], meta["kwargs"], models.kind(meta["model"])
    fields = type(module).DATA_FIELDS
    num_classes = int(getattr(module, fields["num_classes"])) if "num_classes" in fields else 0
    options: dict[str, Any] = {}
    if kind == "generator":
        spec = module.spec
        num_classes = spec.num_classes
        options = call_options(module, truncation_psi)
        inputs = [Tensor("z", (spec.z_dim,), "float32", "latent, standard normal N(0, 1)")]
        output = Tensor("images", (spec.resolution, spec.resolution, spec.channels), "float32",
                        "NHWC float32, about [-1, 1], not clipped")
    elif truncation_psi is not None:
        raise ExportError(f"--truncation_psi is for generators; {path!r} holds a {kind} ({name!r}).")
    elif kind in LATENT_KINDS:
        raise ExportError(f"--bundle={path!r} holds a {name!r} ({kind}); export of continuous-latent autoencoders "
                          "and their tiny halves is not implemented yet.")
    elif kind == "denoiser":
        raise ExportError(f"--bundle={path!r} holds a {name!r} (denoiser); export of diffusion denoisers (inputs: "
                          "noisy images and their noise levels) is not implemented yet.")
    elif kind == "autoencoder":  # the deployable half: a prior's sampled codes -> images
        spec = module.spec
        inputs = [Tensor("codes", (spec.code_resolution,) * 2, "int32", f"codebook indices in [0, {spec.num_codes})")]
        output = Tensor("images", (spec.resolution, spec.resolution, spec.channels), "float32",
                        "NHWC float32, about [-1, 1], not clipped")
    else:
        if kind in ("classifier", "image_to_image"):
            shape = tuple(input_shape or meta.get("input_shape") or ())
            if len(shape) != 3 or min(shape) < 1:
                raise ExportError(f"--bundle={path!r}: a {name!r} {kind.replace('_', '-')} network takes any image "
                                  "size and its model.json records no input_shape; pass --input_shape=H,W,C (e.g. "
                                  "32,32,1).")
            if kind == "classifier":
                output = Tensor("logits", (num_classes,), "float32", "class logits")
            else:
                spec = module.spec
                if shape[2] != spec.in_channels:
                    raise ExportError(f"--input_shape={','.join(map(str, shape))}: the {name!r} takes "
                                      f"{spec.in_channels} input channels.")
                output = Tensor("images", (shape[0] * spec.scale, shape[1] * spec.scale, spec.out_channels), "float32",
                                "NHWC float32, about [-1, 1], not clipped")
            num_classes = 0  # neither takes labels
        else:
            res, ch = getattr(module, fields["resolution"]), getattr(module, fields["channels"])
            shape = (res, res, ch)
            output = (Tensor("logits", (), "float32", "real-vs-fake logit") if kind == "discriminator" else
                      Tensor("logits", (res, res, ch, module.spec.levels), "float32",
                             "per-pixel, per-channel logits over the intensity levels"))
        inputs = [Tensor("images", tuple(int(s) for s in shape), "float32", IMAGES)]
    if num_classes:
        inputs.append(Tensor("labels", (), "int32", f"class label in [0, {num_classes})"))

    def fn(*arrays: jax.Array) -> jax.Array:
        if kind == "autoencoder":
            return module.apply(variables, arrays[0], method=type(module).decode_codes)
        labels = arrays[1:] if num_classes else ()
        return module.apply(variables, arrays[0], *labels, train=False, **options)

    return Signature(fn, tuple(inputs), output, name, dict(kwargs), kind, num_classes, options, str(path),
                     module.spec.num_codes if kind == "autoencoder" else 0)
