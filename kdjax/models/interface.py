"""What every model family declares once, and everything else reads.

- `GeneratorSpec`: a generator's latent size, classes, resolution and channels (`model.spec`), read by the
  tasks, the evaluation and the cost measurement instead of each family's field names.
- `DATA_FIELDS` (a class attribute of every module): how the family names the fields the *data* fixes
  (resolution, channels, classes), so a config leaves them out and `models.data_kwargs` fills them in.
- `DATA_PARALLEL_FIELDS` (class attribute): the fields naming the mapped axis for cross-device statistics
  (BatchNorm's `bn_axis_name`, StyleGAN2's w_avg `axis_name`); `models.outside_data_parallel` unsets them
  for code that runs outside `shard_map` (initialisation, sampling, evaluation).
- `AutoregressiveSpec`: an autoregressive model's resolution, channels, intensity levels and classes
  (`model.spec`).
- `AutoencoderSpec`: an autoencoder's image resolution and channels, and the grid and size of its codes.
- `ImageToImageSpec`: an image-to-image network's input and output channels and its upscaling factor.
- `LatentAutoencoderSpec`: a continuous-latent autoencoder's (or one half's) image channels, latent channels
  and downsampling factor.
- `DenoiserSpec`: a diffusion denoiser's resolution, channels, classes and the data's standard deviation
  sigma_data (its EDM preconditioning).
- `KIND` (class attribute): "generator", "discriminator", "classifier", "autoregressive", "autoencoder",
  "image_to_image", "latent_autoencoder" (a VAE), "latent_encoder" or "latent_decoder" (a tiny half of one),
  "denoiser" (a diffusion model's denoiser D(x; sigma)).
"""

from __future__ import annotations

import dataclasses

KINDS = ("generator", "discriminator", "classifier", "autoregressive", "autoencoder", "image_to_image",
         "latent_autoencoder", "latent_encoder", "latent_decoder", "denoiser")
LATENT_KINDS = ("latent_autoencoder", "latent_encoder", "latent_decoder")


@dataclasses.dataclass(frozen=True)
class GeneratorSpec:
    """The generator interface: `__call__(z, labels=None, *, train=False, return_features=False)` takes
    z of shape (B, z_dim) and labels (B,) when `num_classes > 0`, and makes (B, resolution, resolution,
    channels) images in [-1, 1]."""

    z_dim: int
    num_classes: int  # 0 = unconditional
    resolution: int
    channels: int


@dataclasses.dataclass(frozen=True)
class AutoregressiveSpec:
    """The autoregressive interface: `__call__(x, labels=None, *, train=False)` takes images x of shape
    (B, resolution, resolution, channels) in [-1, 1] (levels k mapped to 2k / (levels - 1) - 1) and labels
    (B,) when `num_classes > 0`, and returns logits (B, resolution, resolution, channels, levels), each
    depending only on the pixels before it in raster order and the channels before it in its pixel."""

    resolution: int
    channels: int
    levels: int
    num_classes: int  # 0 = unconditional


@dataclasses.dataclass(frozen=True)
class AutoencoderSpec:
    """The discrete-autoencoder interface (VQ-VAE): images (B, resolution, resolution, channels) in [-1, 1]
    <-> integer codes (B, code_resolution, code_resolution) in 0 .. num_codes - 1 (`encode` + `quantize`,
    `decode_codes`)."""

    resolution: int
    channels: int
    code_resolution: int
    num_codes: int


@dataclasses.dataclass(frozen=True)
class ImageToImageSpec:
    """The image-to-image interface (super-resolution, inpainting, enhancement): `__call__(x, *, train=False,
    return_features=False)` takes (B, H, W, in_channels) in [-1, 1] (for inpainting the masked image and the
    mask as one more channel) and returns (B, H * scale, W * scale, out_channels), or `(images, features)`
    with named intermediate maps for feature distillation. Any H and W (fully convolutional)."""

    in_channels: int
    out_channels: int
    scale: int  # 1 for inpainting and enhancement


@dataclasses.dataclass(frozen=True)
class LatentAutoencoderSpec:
    """The continuous-latent interface (a VAE and its tiny halves), fully convolutional: images (B, H, W,
    channels) in [-1, 1], H and W multiples of `factor`, <-> latents (B, H / factor, W / factor,
    latent_channels). A "latent_autoencoder" has `encode(x) -> (mean, logvar)`, `decode(z) -> images` and
    `__call__(x, *, train=False)` -> {"reconstruction", "mean", "logvar", "z"}; a "latent_encoder" maps images
    to latents (`__call__(x, *, train=False)`), a "latent_decoder" latents to images (`__call__(z, *,
    train=False)`)."""

    channels: int
    latent_channels: int
    factor: int  # a power of two: the image side over the latent side


@dataclasses.dataclass(frozen=True)
class DenoiserSpec:
    """The diffusion-denoiser interface: `__call__(x, sigma, labels=None, *, train=False, return_features=False)`
    takes noisy images x = y + sigma * n of shape (B, resolution, resolution, channels) (y in [-1, 1], n ~ N(0, I)),
    their noise levels sigma (B,) > 0 and labels (B,) when `num_classes > 0`, and returns the denoised estimate
    D(x; sigma) of y, float32 of x's shape, or `(D, features)` with named intermediate maps. `sigma_data` is the
    data's standard deviation the preconditioning assumes."""

    resolution: int
    channels: int
    num_classes: int  # 0 = unconditional
    sigma_data: float
