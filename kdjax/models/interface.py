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
- `KIND` (class attribute): "generator", "discriminator", "classifier" or "autoregressive".
"""

from __future__ import annotations

import dataclasses

KINDS = ("generator", "discriminator", "classifier", "autoregressive")


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
