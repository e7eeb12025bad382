"""The model zoo, picked by name from a config.

Every model is a Flax Linen module (a description; `apply` is pure). A config names a model by one of
the keys below and gives its fields in a `ConfigDict`; `build_model` checks the fields against the
module's dataclass fields before anything is compiled, so a typo fails with the list of valid fields.

Conventions shared by all models (see each module's docstring for the details):
- images are NHWC, float, scaled to [-1, 1];
- `dtype` is the compute dtype (float32 on CPU, bfloat16 on GPU/TPU); parameters stay float32;
- generators: `__call__(z, labels=None, *, train=False, return_features=False)` returns images, or
  `(images, features)` with `features` a dict of named intermediate maps (e.g. `"res8"`, `"res16"`);
- classifiers: `__call__(x, *, train=False, return_features=False)` returns logits, or
  `(logits, features)`;
- discriminators: `__call__(x, labels=None, *, train=False)` returns one logit per image, shape (B,);
- autoregressive models: `__call__(x, labels=None, *, train=False)` returns per-pixel logits over the
  intensity levels, (B, H, W, C, levels), causal in raster order (`interface.AutoregressiveSpec`);
- autoencoders (VQ-VAE): `__call__(x, *, train=False)` returns a dict with the reconstruction and the integer
  codes; `encode`, `quantize`, `decode_codes` as methods (`interface.AutoencoderSpec`);
- image-to-image networks (super-resolution, inpainting, enhancement): `__call__(x, *, train=False,
  return_features=False)` maps (B, H, W, in_channels) to (B, H * scale, W * scale, channels)
  (`interface.ImageToImageSpec`);
- continuous-latent autoencoders (VAE) and their tiny halves: `encode`, `decode` and `__call__(x, *,
  train=False)` returning a dict with the reconstruction and the latent; a tiny encoder maps images to latents,
  a tiny decoder latents to images (`interface.LatentAutoencoderSpec`);
- diffusion denoisers: `__call__(x, sigma, labels=None, *, train=False, return_features=False)` maps noisy
  images x = y + sigma n (B, H, W, C) and their noise levels sigma (B,) to the estimate D(x; sigma) of y, or
  `(D, features)` (`interface.DenoiserSpec`); `kdjax.models.diffusion_samplers` turns one into images;
- randomness only through rng streams (`noise`, `dropout`); non-trainable state in collections
  (`batch_stats`, `w_avg`);
- each class declares `KIND`, `DATA_FIELDS` and `DATA_PARALLEL_FIELDS`, and each generator a `spec`
  property (`kdjax.models.interface`).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping

import flax.linen as nn

from kdjax.models.interface import (KINDS, AutoencoderSpec, AutoregressiveSpec, DenoiserSpec, GeneratorSpec,
                                   ImageToImageSpec, LatentAutoencoderSpec)

__all__ = ["REGISTRY", "AutoencoderSpec", "AutoregressiveSpec", "DenoiserSpec", "GeneratorSpec", "ImageToImageSpec",
           "LatentAutoencoderSpec", "build_model",
           "check_model_kwargs", "data_kwargs", "kind",
           "model_class", "model_fields", "names_of_kind", "outside_data_parallel", "data_parallel_kwargs"]

# name -> "module:attribute". Imported on demand so that one family's import cost is paid only when used.
REGISTRY: dict[str, str] = {
    # Classifiers (classic-KD teacher/student, and the judge of generated images).
    "resnet": "kdjax.models.classifier:ResNet",
    "cnn": "kdjax.models.classifier:SmallCNN",
    # StyleGAN2 (Karras et al. 2020, config F).
    "stylegan2_generator": "kdjax.models.stylegan2:Generator",
    "stylegan2_discriminator": "kdjax.models.stylegan2:Discriminator",
    # DCGAN (Radford et al. 2016).
    "dcgan_generator": "kdjax.models.dcgan:Generator",
    "dcgan_discriminator": "kdjax.models.dcgan:Discriminator",
    # Gated PixelCNN (van den Oord et al. 2016): autoregressive teacher and student.
    "pixelcnn": "kdjax.models.pixelcnn:PixelCNN",
    # VQ-VAE (van den Oord et al. 2017): the discrete autoencoder under a PixelCNN prior over its codes.
    "vqvae": "kdjax.models.vqvae:VQVAE",
    # Image-to-image (super-resolution, inpainting, enhancement): EDSR teacher (Lim et al. 2017), ESPCN student
    # (Shi et al. 2016), U-Net (Ronneberger et al. 2015).
    "edsr": "kdjax.models.restoration:EDSR",
    "espcn": "kdjax.models.restoration:ESPCN",
    "unet": "kdjax.models.restoration:UNet",
    # A convolutional VAE (Kingma & Welling 2014; KL-regularised latent) and its TAESD-style tiny decoder and
    # encoder (madebyollin/taesd), distilled from it.
    "vae": "kdjax.models.vae:VAE",
    "tiny_decoder": "kdjax.models.tiny_autoencoder:TinyDecoder",
    "tiny_encoder": "kdjax.models.tiny_autoencoder:TinyEncoder",
    # Diffusion (Karras et al. 2022, EDM): a small U-Net denoiser with EDM's preconditioning.
    "edm_unet": "kdjax.models.edm:EDMUNet",
    # DMD's one-step generator: the EDM U-Net's estimate from pure noise, G(z) = D(sigma_max z; sigma_max).
    "edm_one_step": "kdjax.models.edm:OneStepGenerator",
    # NVlabs/edm's official denoisers (EDMPrecond around SongUNet: DDPM++/NCSN++, or DhariwalUNet: ADM), ported
    # with the official parameter names so that an official network pickle imports one to one (kdjax.edm_import).
    # Two names, since the two networks take different options.
    "edm_songunet": "kdjax.models.edm_official:EDMSongUNet",
    "edm_dhariwalunet": "kdjax.models.edm_official:EDMDhariwalUNet",
    # A tiny MLP denoiser (EDM or consistency-model preconditioning) for low-dimensional data: the student of the
    # diffusion distillation methods on an analytic Gaussian-mixture teacher.
    "mlp_denoiser": "kdjax.models.mlp_denoiser:MLPDenoiser",
}


def model_class(name: str) -> type[nn.Module]:
    """Returns the module class registered under `name`.

    Raises:
      ValueError: `name` is not registered; the message lists the valid names.
    """
    if name not in REGISTRY:
        raise ValueError(f"Unknown model name {name!r}; valid names: {sorted(REGISTRY)}.")
    module_name, attr = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


def model_fields(name: str) -> list[str]:
    """The constructor fields of model `name` (excluding Flax's own `parent` and `name`)."""
    cls = model_class(name)
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name") and f.init]


def check_model_kwargs(name: str, kwargs: Mapping[str, Any], where: str = "config.model") -> None:
    """Raises ValueError naming any field in `kwargs` that model `name` does not have."""
    valid = model_fields(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"{where}: model {name!r} has no field(s) {unknown}; valid fields: {sorted(valid)}.")


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiates model `name` with `kwargs`, after checking every field name."""
    check_model_kwargs(name, kwargs)
    return model_class(name)(**kwargs)


def kind(name: str) -> str:
    """"generator", "discriminator" or "classifier": what model `name` is (its class's `KIND`)."""
    return model_class(name).KIND


def names_of_kind(k: str) -> list[str]:
    """The registered names of one kind, sorted (for error messages and checks)."""
    if k not in KINDS:
        raise ValueError(f"Unknown model kind {k!r}; valid: {list(KINDS)}.")
    return sorted(n for n in REGISTRY if kind(n) == k)


def data_kwargs(name: str, resolution: int, channels: int, num_classes: int) -> dict[str, Any]:
    """The fields of model `name` that the data fixes, under the family's own field names."""
    values = {"resolution": resolution, "channels": channels, "num_classes": num_classes}
    return {field: values[what] for what, field in model_class(name).DATA_FIELDS.items()}


def data_parallel_kwargs(name: str, axis_name: str) -> dict[str, str]:
    """The fields that make model `name` reduce its statistics over the mapped axis `axis_name`."""
    return {field: axis_name for field in model_class(name).DATA_PARALLEL_FIELDS}


def outside_data_parallel(model: nn.Module) -> nn.Module:
    """The same model with its data-parallel axis fields unset, to run outside shard_map (init, sampling)."""
    return model.clone(**{field: None for field in type(model).DATA_PARALLEL_FIELDS})
