"""Low-level StyleGAN2 ops, NHWC, with the semantics of NVlabs stylegan2-ada-pytorch.

Each function names the official function it reproduces (`torch_utils/ops/*.py`, `training/networks.py`).
Layouts: activations NHWC, convolution kernels HWIO, dense kernels (in, out). Official tensors are NCHW,
OIHW and (out, in); `kdjax.stylegan2_import` transposes them.

Equalised learning rate (as the official code): parameters are stored at unit scale and multiplied at run
time by `lr_multiplier / sqrt(fan_in)`. Dense weights start as N(0, 1) / lr_multiplier, so that the
effective initial weight is N(0, 1/fan_in) whatever the multiplier (official `FullyConnectedLayer`).

FIR resampling (official `upfirdn2d`) is written as separable shifted-slice sums: element-wise work that
XLA fuses, no depthwise convolution. A modulated convolution with 2x up-sampling folds the FIR filter into
the 3x3 kernel and runs as one stride-1 convolution producing 4x the channels followed by depth-to-space
(each output phase uses its own slice of the combined 6x6 kernel), which is exact and avoids the transposed
convolution that is slow on XLA:CPU (measured in docs/stack.md).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
LRELU_ALPHA = 0.2
# Official `bias_act.activation_funcs[...].def_gain`.
DEF_GAIN = {"linear": 1.0, "lrelu": math.sqrt(2.0), "relu": math.sqrt(2.0)}
DEFAULT_FILTER = (1, 3, 3, 1)


def setup_filter(f: Sequence[float] = DEFAULT_FILTER) -> np.ndarray:
    """The normalised 1-D taps of the separable FIR filter (official `upfirdn2d.setup_filter`).

    The official 2-D filter is outer(f, f) / sum(outer(f, f)); its separable factor is f / sum(f).
    """
    f = np.asarray(f, dtype=np.float64)
    return (f / f.sum()).astype(np.float32)


def filter_2d(f: Sequence[float] = DEFAULT_FILTER) -> np.ndarray:
    """The official 2-D `resample_filter` buffer for taps `f` (used to check imported buffers)."""
    f1 = setup_filter(f)
    return np.outer(f1, f1)


def _fir_1d(x: jax.Array, taps: np.ndarray, axis: int, down: int) -> jax.Array:
    """Valid correlation of `x` with `taps` along `axis`, keeping every `down`-th output."""
    n_out = (x.shape[axis] - len(taps)) // down + 1
    y = None
    for t, g in enumerate(taps):
        sl = jax.lax.slice_in_dim(x, t, t + down * (n_out - 1) + 1, stride=down, axis=axis)
        y = sl * g if y is None else y + sl * g
    return y


def _zero_insert(x: jax.Array, up: int, axis: int) -> jax.Array:
    """[a, b] -> [a, 0, b, 0] (up=2) along `axis`: the official upsampling before filtering."""
    if up == 1:
        return x
    zeros = jnp.zeros_like(x)
    y = jnp.stack([x] + [zeros] * (up - 1), axis=axis + 1)
    shape = list(x.shape)
    shape[axis] *= up
    return y.reshape(shape)


def upfirdn2d(x: jax.Array, f: np.ndarray, up: int = 1, down: int = 1,
              padding: Sequence[int] = (0, 0, 0, 0), gain: float = 1.0) -> jax.Array:
    """Official `upfirdn2d` on NHWC input: upsample (zero insertion), pad, FIR filter, downsample.

    Args:
      x: (B, H, W, C).
      f: 1-D separable taps from `setup_filter` (the filter is flipped as the official flip_filter=False).
      up, down: integer factors, same for both axes.
      padding: (x0, x1, y0, y1) as the official; negative values crop.
      gain: overall gain of the 2-D filter (applied as sqrt(gain) per axis).
    Returns:
      (B, H', W', C) in x's dtype.
    """
    px0, px1, py0, py1 = padding
    taps = (np.asarray(f, np.float64)[::-1] * math.sqrt(gain)).astype(np.float32)
    x = _zero_insert(x, up, 1)
    x = _zero_insert(x, up, 2)
    zero = jnp.zeros((), x.dtype)
    x = jax.lax.pad(x, zero, [(0, 0, 0), (py0, py1, 0), (px0, px1, 0), (0, 0, 0)])
    x = _fir_1d(x, taps, 1, down)
    return _fir_1d(x, taps, 2, down)


def upsample2d(x: jax.Array, f: np.ndarray, up: int = 2) -> jax.Array:
    """Official `upfirdn2d.upsample2d` (padding 0): output size H * up, filter gain up**2."""
    fw = len(f)
    p0, p1 = (fw + up - 1) // 2, (fw - up) // 2
    return upfirdn2d(x, f, up=up, padding=(p0, p1, p0, p1), gain=up ** 2)


def downsample2d(x: jax.Array, f: np.ndarray, down: int = 2) -> jax.Array:
    """Official `upfirdn2d.downsample2d` (padding 0): output size H // down."""
    fw = len(f)
    p0, p1 = (fw - down + 1) // 2, (fw - down) // 2
    return upfirdn2d(x, f, down=down, padding=(p0, p1, p0, p1))


def bias_act(x: jax.Array, b: Optional[jax.Array], act: str = "linear", gain: Optional[float] = None,
             clamp: Optional[float] = None) -> jax.Array:
    """Official `bias_act`: x + b (channel = last axis), activation, times gain, clamp to +-clamp.

    `gain=None` means the activation's default gain (sqrt(2) for lrelu, 1 for linear).
    """
    if b is not None:
        x = x + b.astype(x.dtype)
    if act == "lrelu":
        x = jnp.where(x >= 0, x, x * LRELU_ALPHA)
    elif act == "relu":
        x = jax.nn.relu(x)
    elif act != "linear":
        raise ValueError(f"Unsupported activation {act!r}; supported: linear, lrelu, relu.")
    gain = DEF_GAIN[act] if gain is None else gain
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = jnp.clip(x, -clamp, clamp)
    return x


def normalize_2nd_moment(x: jax.Array, axis: int = -1, eps: float = 1e-8) -> jax.Array:
    """Official `normalize_2nd_moment`: x / sqrt(mean(x**2) + eps)."""
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axis, keepdims=True) + eps)


def minibatch_std(x: jax.Array, group_size: Optional[int] = 4, num_channels: int = 1) -> jax.Array:
    """Official `MinibatchStdLayer` on NHWC input; appends `num_channels` channels.

    The group size is min(group_size, N) and N must be divisible by it (as the official reshape requires).
    Like the official code, image i belongs to group (i mod N/G): groups are strided, not contiguous.
    """
    n, h, w, c = x.shape
    g = n if group_size is None else min(group_size, n)
    if n % g:
        raise ValueError(f"minibatch_std: batch size {n} is not divisible by the group size {g}.")
    f = num_channels
    y = x.astype(jnp.float32).reshape(g, n // g, h, w, f, c // f)   # [G n H W F c]
    y = y - jnp.mean(y, axis=0)
    y = jnp.sqrt(jnp.mean(jnp.square(y), axis=0) + 1e-8)              # [n H W F c]
    y = jnp.mean(y, axis=(1, 2, 4))                                   # [n F]
    y = jnp.tile(y, (g, 1))[:, None, None, :]                         # [N 1 1 F]
    y = jnp.broadcast_to(y, (n, h, w, f)).astype(x.dtype)
    return jnp.concatenate([x, y], axis=-1)


def _conv(x: jax.Array, w: jax.Array, stride: int = 1, padding: Any = "SAME") -> jax.Array:
    if isinstance(padding, int):
        padding = [(padding, padding), (padding, padding)]
    return jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _upconv_kernel(w: jax.Array, f: np.ndarray, up: int, p0: int) -> tuple[jax.Array, int, int]:
    """Folds zero-insert + FIR(gain up^2) + correlation with `w` into one stride-1 kernel per phase.

    The official up path computes out[y] = sum_r K[r] u[y + r - p0] with u the zero-inserted input and
    K = full convolution of the flipped FIR taps with the kernel. Output phase p of y = up*q + p reads
    x[q + d] with d = (p + r - p0) / up; all phases are put into one kernel over a common d range.
    Returns (kernel (kd, kd, I, up, up, O), pad_lo, pad_hi).
    """
    kh = w.shape[0]
    g = np.asarray(f, np.float64)[::-1] * up
    fw = len(g)
    n_r = kh + fw - 1
    m = np.zeros((n_r, kh), np.float32)        # m[r, s] = g[r - s]
    for s in range(kh):
        m[s:s + fw, s] = g
    k = jnp.einsum("rs,stio,ut->ruio", m, w, m)  # (n_r, n_r, I, O): separable FIR (x) kernel
    ds = [(p + r - p0) // up for p in range(up) for r in range(n_r) if (p + r - p0) % up == 0]
    d_lo, d_hi = min(ds), max(ds)
    kd = d_hi - d_lo + 1
    sel = np.zeros((up, kd, n_r), np.float32)  # sel[p, d, r] = 1 where phase p reads tap r at d
    for p in range(up):
        for r in range(n_r):
            if (p + r - p0) % up == 0:
                sel[p, (p + r - p0) // up - d_lo, r] = 1.0
    kp = jnp.einsum("pdr,qes,rsio->deiopq", sel, sel, k)   # (kd, kd, I, O, up, up)
    return jnp.transpose(kp, (0, 1, 2, 4, 5, 3)), -d_lo, d_hi


def _upconv(x: jax.Array, w: jax.Array, f: np.ndarray, up: int, p0: int, groups: int) -> jax.Array:
    """Up-sampling conv via the folded per-phase kernel; `groups` splits I and O as a grouped conv."""
    kp, lo, hi = _upconv_kernel(w.astype(jnp.float32), f, up, p0)   # (kd, kd, I/g, up, up, O)
    kd, _, ig, _, _, o = kp.shape
    og = o // groups
    kp = kp.reshape(kd, kd, ig, up, up, groups, og).transpose(0, 1, 2, 5, 3, 4, 6)
    kp = kp.reshape(kd, kd, ig, groups * up * up * og)
    y = jax.lax.conv_general_dilated(x, kp.astype(x.dtype), (1, 1), [(lo, hi), (lo, hi)],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=groups)
    b, h, wd, _ = y.shape
    y = y.reshape(b, h, wd, groups, up, up, og).transpose(0, 1, 4, 2, 5, 3, 6)
    return y.reshape(b, h * up, wd * up, groups * og)


def conv2d_resample(x: jax.Array, w: jax.Array, f: np.ndarray, up: int = 1, down: int = 1,
                    padding: int = 0, flip_weight: bool = True) -> jax.Array:
    """Official `conv2d_resample` (groups=1) for NHWC x and HWIO w, square kernels, "same"-size padding.

    flip_weight=True is correlation (torch conv2d); False flips the kernel (true convolution), which the
    official synthesis layers use when up > 1.
    """
    if not flip_weight:
        w = w[::-1, ::-1]
    k = w.shape[0]
    fw = len(f)
    if up > 1 and down > 1:
        raise NotImplementedError("conv2d_resample: up and down together are not used by StyleGAN2.")
    if up > 1:
        p0 = padding + (fw + up - 1) // 2
        p1 = padding + (fw - up) // 2
        if p0 + p1 != fw + k - 2:
            raise NotImplementedError("conv2d_resample: only size-preserving padding is supported.")
        if k == 1:  # official fast path: convolve first, then upsample
            return upfirdn2d(_conv(x, w, 1, 0), f, up=up, padding=(p0, p1, p0, p1), gain=up ** 2)
        return _upconv(x, w, f, up, p0, groups=1)
    if down > 1:
        p0 = padding + (fw - down + 1) // 2
        p1 = padding + (fw - down) // 2
        if k == 1:  # official fast path: downsample first, then convolve
            return _conv(upfirdn2d(x, f, down=down, padding=(p0, p1, p0, p1)), w, 1, 0)
        x = upfirdn2d(x, f, padding=(p0, p1, p0, p1))
        return _conv(x, w, down, 0)
    return _conv(x, w, 1, padding)


def modulated_conv2d(x: jax.Array, weight: jax.Array, styles: jax.Array, *, demodulate: bool = True,
                     up: int = 1, padding: int = 0, resample_filter: Optional[np.ndarray] = None,
                     flip_weight: bool = True, noise: Optional[jax.Array] = None,
                     fused: bool = False) -> jax.Array:
    """Official `modulated_conv2d` on NHWC input with an HWIO kernel.

    w'[b] = weight * styles[b] (input channels); with demodulation each output channel of w'[b] is scaled
    by rsqrt(sum w'[b]^2 + 1e-8). fused=False (default, faster here) computes
    conv(x * styles) * dcoefs + noise; fused=True runs one grouped convolution with per-sample kernels
    (official inference path). Both give the same result up to rounding.

    Args:
      x: (B, H, W, I) in the compute dtype.
      weight: (k, k, I, O) float32, unit scale (no equalised-lr gain: demodulation normalises it).
      styles: (B, I) float32.
      noise: optional, broadcastable to the (B, H', W', O) output; added after demodulation.
    """
    batch = x.shape[0]
    f = setup_filter() if resample_filter is None else resample_filter
    weight = weight.astype(jnp.float32)
    styles = styles.astype(jnp.float32)
    dcoefs = None
    if demodulate:
        wsq = jnp.sum(jnp.square(weight), axis=(0, 1))                        # (I, O)
        dcoefs = jax.lax.rsqrt(jnp.square(styles) @ wsq + 1e-8)               # (B, O)
    if not fused:
        x = x * styles[:, None, None, :].astype(x.dtype)
        x = conv2d_resample(x, weight.astype(x.dtype), f, up=up, padding=padding, flip_weight=flip_weight)
        if demodulate:
            x = x * dcoefs[:, None, None, :].astype(x.dtype)
        if noise is not None:
            x = x + noise.astype(x.dtype)
        return x
    k, _, i, o = weight.shape
    w = weight[None] * styles[:, None, None, :, None]                        # (B, k, k, I, O)
    if demodulate:
        w = w * dcoefs[:, None, None, None, :]
    w = jnp.transpose(w, (1, 2, 3, 0, 4)).reshape(k, k, i, batch * o)        # groups = batch
    h, wd = x.shape[1], x.shape[2]
    xg = jnp.transpose(x, (1, 2, 0, 3)).reshape(1, h, wd, batch * i)
    if not flip_weight:
        w = w[::-1, ::-1]
    if up == 1:
        y = jax.lax.conv_general_dilated(xg, w.astype(x.dtype), (1, 1), [(padding, padding)] * 2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         feature_group_count=batch)
    else:
        fw = len(f)
        y = _upconv(xg, w.astype(x.dtype), f, up, padding + (fw + up - 1) // 2, groups=batch)
    y = y.reshape(y.shape[1], y.shape[2], batch, o).transpose(2, 0, 1, 3)
    if noise is not None:
        y = y + noise.astype(y.dtype)
    return y


class FullyConnectedLayer(nn.Module):
    """Official `FullyConnectedLayer`: equalised-lr dense layer, kernel (in, out)."""
    features: int                  # output features
    lr_multiplier: float = 1.0     # learning-rate multiplier (0.01 in the mapping network)
    bias_init: float = 0.0         # initial bias (1 for the style affines: styles start at 1)
    activation: str = "linear"     # 'linear' | 'lrelu' | 'relu'
    use_bias: bool = True          # add a bias before the activation

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        weight = self.param("weight", lambda k, s: jax.random.normal(k, s) / self.lr_multiplier,
                            (fan_in, self.features))
        x = x.astype(jnp.float32) @ (weight * (self.lr_multiplier / math.sqrt(fan_in)))
        b = None
        if self.use_bias:
            b = self.param("bias", nn.initializers.constant(self.bias_init), (self.features,))
            b = b * self.lr_multiplier
        return bias_act(x, b, act=self.activation)


class Conv2dLayer(nn.Module):
    """Official `Conv2dLayer`: equalised-lr conv (HWIO kernel), optional FIR down-sampling, bias_act."""
    features: int                      # output channels
    kernel_size: int                   # square kernel size
    use_bias: bool = True              # add a bias before the activation
    activation: str = "linear"         # 'linear' | 'lrelu' | 'relu'
    down: int = 1                      # integer down-sampling factor (1 or 2)
    conv_clamp: Optional[float] = None  # clamp the output to +-conv_clamp*gain; None = off
    dtype: Dtype = jnp.float32         # compute dtype (parameters stay float32)

    @nn.compact
    def __call__(self, x: jax.Array, gain: float = 1.0) -> jax.Array:
        k, cin = self.kernel_size, x.shape[-1]
        weight = self.param("weight", nn.initializers.normal(1.0), (k, k, cin, self.features))
        w = (weight * (1.0 / math.sqrt(cin * k * k))).astype(self.dtype)
        x = conv2d_resample(x.astype(self.dtype), w, setup_filter(), down=self.down, padding=k // 2)
        b = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, b, act=self.activation, gain=DEF_GAIN[self.activation] * gain, clamp=clamp)
