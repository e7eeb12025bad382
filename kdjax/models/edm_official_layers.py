"""The layers of NVlabs/edm's networks (`training/networks.py`), NHWC, with the official semantics and parameter
names, for `kdjax.models.edm_official`.

Each module holds its parameters under the official names (`weight`, `bias`, `freqs`), in our layouts:
convolution kernels HWIO, linear weights (in, out); official tensors are OIHW and (out, in), and
`kdjax.importers.edm` transposes them. So the official state-dict key `model.enc.32x32_block0.conv0.weight` is
our `params/model/enc/32x32_block0/conv0/weight`, one to one.

- `Linear`: y = x W + b.
- `Conv2d`: optional 2x resampling by the separable filter f (taps t = f / sum(f), official `resample_filter`,
  whose 2-D buffer is outer(t, t)), then a k x k convolution with 'same' padding k // 2, plus bias; `kernel=0`
  resamples only. Down: the depthwise correlation with outer(t, t), stride 2, padding p = (len(f) - 1) // 2 (for
  f = [1, 1] a 2x2 average). Up: the transposed depthwise convolution with 4 outer(t, t), stride 2, padding p
  (for [1, 1] nearest-neighbour). `fused_resample` with down (NCSN++'s residual encoder): the convolution with
  padding k // 2 + p first, then the filter at stride 2 without padding. Both resamplings are written as shifted
  slice sums along each axis (exact, no transposed convolution; see docs/stack.md for why on XLA:CPU).
- `GroupNorm`: min(32, C // 4) groups, biased variance, y = (x - mean) / sqrt(var + eps) weight + bias.
- `UNetBlock`: the official union of DDPM++, NCSN++ and ADM blocks:
      h = conv0(silu(norm0(x)))                                        (up/down-sampled when up/down)
      h = silu(shift + norm1(h) (1 + scale)), (scale, shift) = affine(emb)   if adaptive_scale (ADM)
      h = silu(norm1(h + affine(emb)))                                        otherwise (DDPM++, NCSN++)
      x = (conv1(dropout(h)) + skip(x)) skip_scale,
  skip = identity, or `Conv2d` with kernel 1 (channels change, or resample_proj) or 0 (resampling only); then,
  with heads > 0, self-attention over positions: qkv = qkv(norm2(x)) with channels ordered (head, channel,
  q/k/v), w = softmax_k(q . k / sqrt(C / heads)) in float32, x = (proj(w v) + x) skip_scale.
- `positional_embedding(t, C, endpoint)`: [cos(t f_j), sin(t f_j)], f_j = (1 / 10000)^(j / (C/2 - endpoint)).
- `FourierEmbedding`: [cos(2 pi t f_j), sin(2 pi t f_j)] with the stored random frequencies `freqs` (an official
  buffer: kept in params, since kdjax's denoiser tasks carry params only, behind a stop_gradient).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MAX_POSITIONS = 10_000
lecun = nn.initializers.lecun_normal()


def filter_taps(f: Sequence[float]) -> np.ndarray:
    """The 1-D taps t = f / sum(f) of a resampling filter (float32)."""
    f = np.asarray(f, np.float64)
    return (f / f.sum()).astype(np.float32)


def filter_2d(f: Sequence[float]) -> np.ndarray:
    """The official 2-D `resample_filter` buffer of filter f, (1, 1, k, k): outer(f, f) / sum(f)^2."""
    return np.outer(filter_taps(f), filter_taps(f))[None, None]


def _correlate(x: jax.Array, taps: np.ndarray, axis: int, stride: int) -> jax.Array:
    """Valid correlation of x with `taps` along `axis`, every `stride`-th output."""
    n_out = (x.shape[axis] - len(taps)) // stride + 1
    out = None
    for i, g in enumerate(taps):
        part = jax.lax.slice_in_dim(x, i, i + stride * (n_out - 1) + 1, stride=stride, axis=axis) * float(g)
        out = part if out is None else out + part
    return out


def _pad(x: jax.Array, pad: int, axis: int) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (pad, pad)
    return jnp.pad(x, widths)


def downsample(x: jax.Array, f: Sequence[float], pad: int) -> jax.Array:
    """(B, H, W, C) -> depthwise correlation with outer(t, t), stride 2, zero padding `pad` (NHWC)."""
    taps = filter_taps(f)
    for axis in (1, 2):
        x = _correlate(_pad(x, pad, axis), taps, axis, 2)
    return x


def upsample(x: jax.Array, f: Sequence[float]) -> jax.Array:
    """(B, H, W, C) -> (B, 2H, 2W, C): the transposed depthwise convolution with 4 outer(t, t), stride 2, padding
    p = (k - 1) // 2, i.e. zeros inserted between samples, padding k - 1 - p, correlation with the flipped 2 t."""
    taps = filter_taps(f)
    pad = len(taps) - 1 - (len(taps) - 1) // 2
    for axis in (1, 2):
        zeros = jnp.zeros_like(x)
        z = jnp.stack([x, zeros], axis=axis + 1).reshape(*x.shape[:axis], 2 * x.shape[axis], *x.shape[axis + 1:])
        z = jax.lax.slice_in_dim(z, 0, 2 * x.shape[axis] - 1, axis=axis)
        x = _correlate(_pad(z, pad, axis), 2 * taps[::-1], axis, 1)
    return x


class Linear(nn.Module):
    """y = x W + b, W (in, out) (official `Linear`, whose weight is (out, in))."""

    features: int
    bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("weight", lecun, (x.shape[-1], self.features))
        y = x.astype(self.dtype) @ w.astype(self.dtype)
        if self.bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


class Conv2d(nn.Module):
    """Official `Conv2d` (module docstring): optional 2x resampling, a k x k convolution (k = `kernel`, 0 for none)."""

    features: int
    kernel: int
    bias: bool = True
    up: bool = False
    down: bool = False
    resample_filter: tuple[float, ...] = (1, 1)
    fused_resample: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.up and (self.down or self.fused_resample):
            raise ValueError("Conv2d: up with down or with fused_resample is used by no official network.")
        x = x.astype(self.dtype)
        f_pad = (len(self.resample_filter) - 1) // 2
        w_pad = self.kernel // 2
        w = None
        if self.kernel:
            w = self.param("weight", lecun, (self.kernel, self.kernel, x.shape[-1], self.features)).astype(self.dtype)
        conv = lambda h, pad: jax.lax.conv_general_dilated(h, w, (1, 1), [(pad, pad)] * 2,
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.fused_resample and self.down and w is not None:
            x = downsample(conv(x, w_pad + f_pad), self.resample_filter, 0)
        else:
            if self.up:
                x = upsample(x, self.resample_filter)
            if self.down:
                x = downsample(x, self.resample_filter, f_pad)
            if w is not None:
                x = conv(x, w_pad)
        if w is not None and self.bias:
            x = x + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return x


def norm_groups(channels: int) -> int:
    """The official GroupNorm's groups: min(32, channels // 4)."""
    return min(32, channels // 4)


class GroupNorm(nn.Module):
    """Official `GroupNorm` (module docstring); statistics in float32."""

    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        groups = norm_groups(c)
        if groups < 1 or c % groups:
            raise ValueError(f"GroupNorm over {c} channels: min(32, {c} // 4) = {groups} groups do not divide them.")
        weight = self.param("weight", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        g = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c) * weight + bias
        return y.astype(self.dtype)


class UNetBlock(nn.Module):
    """Official `UNetBlock` (module docstring): (B, H, W, C_in), emb (B, E) -> (B, H', W', `features`)."""

    features: int
    up: bool = False
    down: bool = False
    num_heads: int = 0  # 0: no attention
    dropout: float = 0.0
    skip_scale: float = 1.0
    eps: float = 1e-5
    resample_filter: tuple[float, ...] = (1, 1)
    resample_proj: bool = False
    adaptive_scale: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        c_in, c_out, dt = x.shape[-1], self.features, self.dtype
        norm = lambda name: GroupNorm(self.eps, dt, name=name)
        resample = tuple(self.resample_filter)
        conv = lambda features, kernel, name, **kw: Conv2d(features, kernel, resample_filter=resample, dtype=dt,
                                                           name=name, **kw)
        orig = x
        x = conv(c_out, 3, "conv0", up=self.up, down=self.down)(nn.silu(norm("norm0")(x)))
        params = Linear(c_out * (2 if self.adaptive_scale else 1), dtype=dt, name="affine")(emb)[:, None, None, :]
        if self.adaptive_scale:
            scale, shift = jnp.split(params, 2, axis=-1)
            x = nn.silu(shift + norm("norm1")(x) * (scale + 1))
        else:
            x = nn.silu(norm("norm1")(x + params))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = conv(c_out, 3, "conv1")(x)
        if c_out != c_in or self.up or self.down:
            kernel = 1 if self.resample_proj or c_out != c_in else 0
            orig = conv(c_out, kernel, "skip", up=self.up, down=self.down)(orig)
        x = (x + orig) * self.skip_scale
        if self.num_heads:
            b, h, w, c = x.shape
            heads = self.num_heads
            qkv = conv(3 * c, 1, "qkv")(norm("norm2")(x)).reshape(b, h * w, heads, c // heads, 3)
            q, k, v = (qkv[..., i].astype(jnp.float32) for i in range(3))
            logits = jnp.einsum("bqnc,bknc->bnqk", q, k / math.sqrt(c // heads))
            weights = jax.nn.softmax(logits, axis=-1)
            a = jnp.einsum("bnqk,bknc->bqnc", weights, v).reshape(b, h, w, c).astype(dt)
            x = (conv(c, 1, "proj")(a) + x) * self.skip_scale
        return x


def positional_embedding(t: jax.Array, channels: int, endpoint: bool) -> jax.Array:
    """Official `PositionalEmbedding`: (B,) -> (B, channels), [cos(t f_j), sin(t f_j)] for j < channels / 2,
    f_j = (1 / 10000)^(j / (channels / 2 - endpoint))."""
    half = channels // 2
    freqs = jnp.arange(half, dtype=jnp.float32) / (half - (1 if endpoint else 0))
    freqs = jnp.float32(1 / MAX_POSITIONS) ** freqs
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=1)


class FourierEmbedding(nn.Module):
    """Official `FourierEmbedding`: (B,) -> (B, channels), [cos(2 pi t f_j), sin(2 pi t f_j)], f ~ N(0, scale^2)
    stored as `freqs` (channels / 2,)."""

    channels: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        init = lambda key, shape: self.scale * jax.random.normal(key, shape)
        freqs = jax.lax.stop_gradient(self.param("freqs", init, (self.channels // 2,)))
        angles = t.astype(jnp.float32)[:, None] * (2 * np.pi * freqs)[None, :]
        return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=1)
