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
- `KIND` (class attribute): "generator", "discriminator", "classifier", "autoregressive", "autoencoder" or
  "image_to_image".
"""

from __future__ import annotations

import dataclasses

KINDS = ("generator", "discriminator", "classifier", "autoregressive", "autoencoder", "image_to_image")


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
