"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders").

An autoregressive model of images with `levels` intensity levels per channel: in raster order (row by row,
left to right, and at each pixel channel 0, 1, ... C-1), p(x) = prod_i p(x_i | x_<i), each factor a
categorical distribution over the levels. `__call__(x, labels=None, *, train=False)` takes images
x (B, H, W, C) scaled to [-1, 1] (`to_model_input(levels)`) and returns logits (B, H, W, C, levels) where
logits[b, i, j, c] depends only on pixels before (i, j) in raster order and on channels < c of pixel (i, j).

The network, without the blind spot of the original PixelCNN:
- a vertical stack: convolutions of height k//2 + 1 and width k whose output at row i sees rows <= i; it
  reaches the horizontal stack shifted down by one row, so only rows < i;
- a horizontal stack: convolutions 1 x (k//2 + 1) whose output at column j sees columns <= j of row i; at
  the current pixel the weights are masked by channel group (features are split into C groups; group c may
  read input groups < c in the first layer, mask "A", and <= c later, mask "B");
- gated units tanh(a + V h) * sigmoid(b + W h), h a learned class embedding when `num_classes > 0`;
- residual connections in the horizontal stack; two masked 1x1 layers to C x levels logits.
With `embed > 0` the input levels (recovered from the [-1, 1] scale) enter through a learned embedding, as
categorical codes should (a VQ-VAE prior's levels are codebook indices, with no order).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.models.interface import AutoregressiveSpec


def feature_groups(features: int, channels: int, copies: int = 1) -> np.ndarray:
    """The channel group of each of `copies * features` features: `features` split into `channels`
    contiguous groups, repeated `copies` times (the two halves of a gate)."""
    if features % channels:
        raise ValueError(f"features={features} must be a multiple of channels={channels}.")
    return np.tile(np.arange(features) // (features // channels), copies)


def group_mask(in_groups: np.ndarray, out_groups: np.ndarray, include_self: bool) -> np.ndarray:
    """(in, out) 0/1 mask: output group g reads input groups < g, or <= g with `include_self`."""
    before, same = in_groups[:, None] < out_groups[None, :], in_groups[:, None] == out_groups[None, :]
    return (before | same if include_self else before).astype(np.float32)


class MaskedConv(nn.Module):
    """A convolution whose kernel is multiplied by a fixed 0/1 mask, padded so that it is causal.

    `padding` is ((top, bottom), (left, right)); `centre` the kernel tap of the current pixel whose channel
    connections `centre_mask` (in, out) restricts (None: that tap is unrestricted)."""

    features: int
    kernel_size: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    centre: tuple[int, int] | None = None
    centre_mask: Any = None  # np.ndarray (in, out) or None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param("kernel", nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                            (kh, kw, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        if self.centre is not None and self.centre_mask is not None:
            mask = np.ones((kh, kw, x.shape[-1], self.features), np.float32)
            mask[self.centre] = self.centre_mask
            kernel = kernel * mask
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (1, 1), self.padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(self.dtype)


def down_shift(x: jax.Array) -> jax.Array:
    """Moves a map one row down (a zero row enters at the top): row i then holds row i - 1."""
    return jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]


def gate(x: jax.Array) -> jax.Array:
    """tanh(a) * sigmoid(b) for x = [a, b] split on the last axis."""
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.tanh(a) * jax.nn.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer of both stacks: (v, h, condition) -> (v', h')."""

    features: int  # per stack, a multiple of `channels`
    kernel_size: int  # odd
    channels: int
    first: bool  # mask "A" at the current pixel, no residual (h is the input image)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, v: jax.Array, h: jax.Array, condition: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        k, f, c = self.kernel_size, self.features, self.channels
        gate_groups = feature_groups(f, c, copies=2)
        h_groups = feature_groups(h.shape[-1], c)
        # Vertical: output row i sees rows i - k//2 .. i.
        v_pre = MaskedConv(2 * f, (k // 2 + 1, k), ((k // 2, 0), (k // 2, k // 2)), dtype=self.dtype,
                           name="vertical")(v)
        # Horizontal: output column j sees columns j - k//2 .. j of the same row; the current pixel is masked
        # by channel group.
        h_pre = MaskedConv(2 * f, (1, k // 2 + 1), ((0, 0), (k // 2, 0)), centre=(0, k // 2),
                           centre_mask=group_mask(h_groups, gate_groups, include_self=not self.first),
                           dtype=self.dtype, name="horizontal")(h)
        # The vertical stack reaches the horizontal one from the rows above only.
        h_pre = h_pre + nn.Conv(2 * f, (1, 1), dtype=self.dtype, name="v_to_h")(down_shift(v_pre))
        if condition is not None:
            v_pre = v_pre + nn.Dense(2 * f, dtype=self.dtype, name="cond_v")(condition)[:, None, None, :]
            h_pre = h_pre + nn.Dense(2 * f, dtype=self.dtype, name="cond_h")(condition)[:, None, None, :]
        groups = feature_groups(f, c)
        h_out = MaskedConv(f, (1, 1), ((0, 0), (0, 0)), centre=(0, 0),
                           centre_mask=group_mask(groups, groups, include_self=True), dtype=self.dtype,
                           name="h_out")(gate(h_pre))
        return gate(v_pre), h_out if self.first else h + h_out


class PixelCNN(nn.Module):
    """Gated PixelCNN: images (B, R, R, C) in [-1, 1] [+ labels (B,)] -> logits (B, R, R, C, levels)."""

    resolution: int = 8  # R (any size works; the field records what the data fixes)
    channels: int = 1  # C, modelled one after another in each pixel
    levels: int = 256  # intensity levels per channel (digits: 17)
    num_classes: int = 0  # > 0: class-conditional (a learned embedding in every gate)
    features: int = 64  # per stack and layer, a multiple of `channels`
    layers: int = 6  # gated layers
    kernel_size: int = 5  # odd; the first layer's too
    embed: int = 0  # > 0: each channel's level enters as a learned embedding of this size (for unordered
    #                 levels such as VQ-VAE codes) instead of its scaled value
    dtype: Any = jnp.float32  # compute dtype; parameters and logits are float32

    KIND: ClassVar[str] = "autoregressive"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"resolution": "resolution", "channels": "channels",
                                             "num_classes": "num_classes"}
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def spec(self) -> AutoregressiveSpec:
        return AutoregressiveSpec(self.resolution, self.channels, self.levels, self.num_classes)

    @nn.compact
    def __call__(self, x: jax.Array, labels: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        del train  # no train-only layers
        if self.kernel_size % 2 != 1 or self.kernel_size < 3:
            raise ValueError(f"kernel_size={self.kernel_size} must be odd and >= 3.")
        if x.ndim != 4 or x.shape[-1] != self.channels:
            raise ValueError(f"x must be (B, H, W, {self.channels}), got {x.shape}.")
        condition = None
        if self.num_classes > 0:
            if labels is None:
                raise ValueError(f"num_classes={self.num_classes}: labels are required.")
            condition = nn.Embed(self.num_classes, self.features, name="class_embed")(labels).astype(self.dtype)
        if self.embed > 0:  # level k of each channel -> a vector; channel c's vectors form feature group c
            levels = jnp.clip(jnp.round((x.astype(jnp.float32) + 1.0) * (0.5 * (self.levels - 1))), 0, self.levels - 1)
            vectors = nn.Embed(self.levels, self.embed, name="level_embed")(levels.astype(jnp.int32))
            x_in = vectors.reshape(*x.shape[:3], self.channels * self.embed)
        else:
            x_in = x
        v = h = x_in.astype(self.dtype)
        for i in range(self.layers):
            v, h = GatedLayer(self.features, self.kernel_size, self.channels, first=(i == 0), dtype=self.dtype,
                              name=f"layer{i}")(v, h, condition)
        groups = feature_groups(self.features, self.channels)
        out = MaskedConv(self.features, (1, 1), ((0, 0), (0, 0)), centre=(0, 0),
                         centre_mask=group_mask(groups, groups, include_self=True), dtype=self.dtype,
                         name="head1")(nn.relu(h))
        out_groups = np.repeat(np.arange(self.channels), self.levels)
        logits = MaskedConv(self.channels * self.levels, (1, 1), ((0, 0), (0, 0)), centre=(0, 0),
                            centre_mask=group_mask(groups, out_groups, include_self=True), dtype=self.dtype,
                            name="head2")(nn.relu(out))
        return logits.astype(jnp.float32).reshape(*x.shape, self.levels)


def to_model_input(levels: jax.Array, num_levels: int) -> jax.Array:
    """Integer levels 0 .. L-1 -> the model's input scale [-1, 1]."""
    return levels.astype(jnp.float32) * (2.0 / (num_levels - 1)) - 1.0


def sample(model: PixelCNN, variables: Any, key: jax.Array, batch: int, labels: jax.Array | None = None,
           temperature: float = 1.0) -> jax.Array:
    """Ancestral sampling in raster order (R * R * C network evaluations): integer levels (B, R, R, C).

    Position p = (i * R + j) * C + c draws from softmax(logits[:, i, j, c] / temperature) with the key
    `fold_in(key, p)`. Jit it with `model` static (`jax.jit(sample, static_argnums=(0, 3))`).
    """
    r, ch = model.resolution, model.channels

    def body(p, x):
        i, j, c = p // (r * ch), (p // ch) % r, p % ch
        logits = model.apply(variables, to_model_input(x, model.levels), labels)
        row = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)
        pixel = jax.lax.dynamic_index_in_dim(row, j, axis=1, keepdims=False)
        scores = jax.lax.dynamic_index_in_dim(pixel, c, axis=1, keepdims=False)  # (B, levels)
        value = jax.random.categorical(jax.random.fold_in(key, p), scores / temperature, axis=-1)
        return x.at[:, i, j, c].set(value.astype(x.dtype))

    return jax.lax.fori_loop(0, r * r * ch, body, jnp.zeros((batch, r, r, ch), jnp.int32))


def to_levels(images: jax.Array, num_levels: int) -> jax.Array:
    """Images in [-1, 1] (kdjax's batches: 8-bit values u mapped to u / 127.5 - 1) -> integer levels
    round(u * (L - 1) / 255) in 0 .. L-1. With L = 256 these are the 8-bit values; for the digits
    (values v = 0..16 stored as u = round(v * 255 / 16)) L = 17 gives back v exactly."""
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * (0.5 * (num_levels - 1))), 0,
                    num_levels - 1).astype(jnp.int32)
