"""TAESD-style tiny decoder and encoder (madebyollin/taesd, "Tiny AutoEncoder for Stable Diffusion": a 1.2M
parameter decoder standing in for Stable Diffusion's 49.5M VAE decoder), for any teacher's latent.

Both are plain stacks of 3x3 convolutions with ReLU, no normalisation, no attention, written after the official
`taesd.py` (widths and block counts are fields here; TAESD's are 64 and 3):
- `Block`: relu(conv3x3(relu(conv3x3(relu(conv3x3(x))))) + skip(x)), skip a bias-free 1x1 conv when the width
  changes, else the identity.
- `TinyDecoder` (latent -> image): the input soft-clamped to (-3, 3) as TAESD does, tanh(z / 3) * 3; conv3x3 to
  `features`, ReLU; then log2(factor) stages of [`blocks` Blocks, nearest 2x upsampling, a bias-free conv3x3];
  one more Block and a conv3x3 to the image channels. Outputs are not clipped.
- `TinyEncoder` (image -> latent): conv3x3 to `features`, a Block; then log2(factor) stages of [a bias-free
  stride-2 conv3x3, `blocks` Blocks]; a conv3x3 to `latent_channels`. It predicts the teacher encoder's
  posterior mean (no variance).

The distillation task sets `latent_channels` and `factor` from the teacher (`interface.LatentAutoencoderSpec`)
and `channels` from the data. Fully convolutional: any latent size, any image side that is a multiple of
`factor`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.interface import LatentAutoencoderSpec
from kdjax.models.vae import STRIDE2_PADDING, check_image_input, upsample_nearest

LATENT_CLAMP = 3.0  # TAESD's Clamp: tanh(z / 3) * 3


def soft_clamp(z: jax.Array, limit: float = LATENT_CLAMP) -> jax.Array:
    """tanh(z / limit) * limit: about z near 0, smoothly bounded to (-limit, limit) (TAESD's `Clamp`)."""
    return jnp.tanh(z / limit) * limit


def stages(factor: int) -> int:
    """log2(factor): the number of 2x stages (ValueError unless factor is a power of two >= 1)."""
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"factor={factor} must be a power of two >= 1.")
    return factor.bit_length() - 1


class Block(nn.Module):
    """TAESD's block: relu(conv(relu(conv(relu(conv(x))))) + skip(x)), 3x3 convs to `features` channels."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for i in range(3):
            h = nn.Conv(self.features, (3, 3), dtype=self.dtype, name=f"conv{i + 1}")(h)
            h = nn.relu(h) if i < 2 else h
        skip = x if x.shape[-1] == self.features else nn.Conv(self.features, (1, 1), use_bias=False,
                                                              dtype=self.dtype, name="skip")(x)
        return nn.relu(h + skip)


class TinyDecoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> images (B, h factor, w factor, channels) float32 (module docstring).

    Defaults (TAESD's widths at factor 8, RGB, 4 latent channels): 1,222,531 parameters, the official decoder's.
    """

    channels: int = 3  # the data's
    latent_channels: int = 4  # the teacher's
    factor: int = 8  # the teacher's: 2x upsampling stages = log2(factor)
    features: int = 64  # the width of every conv but the last
    blocks: int = 3  # Blocks per stage
    dtype: Any = jnp.float32  # compute dtype; parameters and outputs are float32

    KIND: ClassVar[str] = "latent_decoder"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"channels": "channels"}
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def spec(self) -> LatentAutoencoderSpec:
        return LatentAutoencoderSpec(self.channels, self.latent_channels, self.factor)

    @nn.compact
    def __call__(self, z: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no train-only layers
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"z must be (B, h, w, {self.latent_channels}), got {z.shape}.")
        f, d = self.features, self.dtype
        h = nn.relu(nn.Conv(f, (3, 3), dtype=d, name="conv_in")(soft_clamp(z.astype(jnp.float32)).astype(d)))
        for s in range(stages(self.factor)):
            for i in range(self.blocks):
                h = Block(f, d, name=f"stage{s}_block{i}")(h)
            h = nn.Conv(f, (3, 3), use_bias=False, dtype=d, name=f"up{s}")(upsample_nearest(h))
        h = Block(f, d, name="block_out")(h)
        return nn.Conv(self.channels, (3, 3), dtype=d, name="conv_out")(h).astype(jnp.float32)


class TinyEncoder(nn.Module):
    """Images (B, H, W, channels) -> latents (B, H / factor, W / factor, latent_channels) float32 (module
    docstring). Defaults (TAESD's widths at factor 8, RGB, 4 latent channels): 1,222,532 parameters, the
    official encoder's."""

    channels: int = 3  # the data's
    latent_channels: int = 4  # the teacher's
    factor: int = 8  # the teacher's: stride-2 stages = log2(factor)
    features: int = 64  # the width of every conv but the last
    blocks: int = 3  # Blocks per stage
    dtype: Any = jnp.float32  # compute dtype; parameters and outputs are float32

    KIND: ClassVar[str] = "latent_encoder"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"channels": "channels"}
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def spec(self) -> LatentAutoencoderSpec:
        return LatentAutoencoderSpec(self.channels, self.latent_channels, self.factor)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no train-only layers
        check_image_input(x, self.channels, 2 ** stages(self.factor))
        f, d = self.features, self.dtype
        h = nn.Conv(f, (3, 3), dtype=d, name="conv_in")(x.astype(d))
        h = Block(f, d, name="block_in")(h)
        for s in range(stages(self.factor)):
            h = nn.Conv(f, (3, 3), strides=(2, 2), padding=STRIDE2_PADDING, use_bias=False, dtype=d,
                        name=f"down{s}")(h)
            for i in range(self.blocks):
                h = Block(f, d, name=f"stage{s}_block{i}")(h)
        return nn.Conv(self.latent_channels, (3, 3), dtype=d, name="conv_out")(h).astype(jnp.float32)
