"""DCGAN generator and discriminator (Radford, Metz & Chintala 2016), the distillation students.

Generator: z (B, z_dim) [+ class embedding] -> dense to 4x4xC -> one up-sampling stage per doubling of
the resolution (up-sample, BatchNorm, ReLU) -> 3x3 conv to RGB -> tanh. Images are NHWC in [-1, 1].

The student may consume the teacher's mapping output w instead of a fresh z: its input is only a vector,
so a student reusing the teacher's mapping network sets `z_dim` to the teacher's `w_dim` and is fed w
(B, w_dim). Where the teacher gives per-layer styles ws (B, num_ws, w_dim) the caller reduces them to one
vector (their mean, or one layer's w) before calling the student.

Up-sampling (`upsample`), all doubling H and W:
- 'subpixel' (default): 3x3 conv to 4x the channels, then depth-to-space. It can represent any 4x4
  stride-2 transposed conv exactly (`subpixel_kernel_from_transpose`); XLA counts its zero taps, so its
  FLOPs are 9/4 of the equivalent transposed conv's, yet on XLA:CPU its gradient is far cheaper. G+D
  Adam step, 32x32, batch 64, default widths, 2-core CPU: subpixel 152 ms, transpose 290 ms,
  resize 184 ms (width=32: 176 / 506 / 198 ms). Forward alone is about equal (13-20 ms).
- 'transpose': 4x4 stride-2 ConvTranspose, the original DCGAN layer.
- 'resize': nearest-neighbour 2x, then a 3x3 conv.

Discriminator: 4x4 stride-2 convs with LeakyReLU(0.2) down to 4x4, then a linear logit, plus a
projection term <embed(y), phi(x)> when class-conditional (Miyato & Koyama 2018). BatchNorm is off by
default so that each logit depends on its own image only and R1 penalties are well defined.

Channel schedules: a stage's width doubles for each halving of its resolution, capped at `width_max`. In
the generator `width` is the channel count of the full-resolution stage; in the discriminator it is the
first (half-resolution) conv's.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.models.interface import GeneratorSpec

# Radford et al.: all weights from N(0, 0.02).
_INIT = nn.initializers.normal(0.02)
UPSAMPLE_MODES = ("subpixel", "transpose", "resize")


def _check_resolution(resolution: int) -> int:
    """Returns log2(resolution); raises unless it is a power of two in [16, 1024]."""
    log2 = int(round(math.log2(resolution))) if resolution > 0 else -1
    if not (16 <= resolution <= 1024 and 2**log2 == resolution):
        raise ValueError(f"resolution must be a power of two in [16, 1024], got {resolution}.")
    return log2


def depth_to_space(x: jax.Array, block: int = 2) -> jax.Array:
    """(B, H, W, block*block*C) -> (B, H*block, W*block, C).

    Channel index (i * block + j) * C + c of input pixel (h, w) becomes channel c of output pixel
    (h * block + i, w * block + j), i.e. the channels are read as (row phase, column phase, C).
    """
    b, h, w, c = x.shape
    out_c = c // (block * block)
    x = x.reshape(b, h, w, block, block, out_c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * block, w * block, out_c)


def subpixel_kernel_from_transpose(kernel: jax.Array | np.ndarray) -> jax.Array:
    """Converts a 4x4 stride-2 transposed-conv kernel to the equivalent sub-pixel 3x3 kernel.

    For `nn.ConvTranspose(C, (4, 4), strides=(2, 2), padding='SAME')` (Flax's default
    `transpose_kernel=False`: the input is dilated by 2, padded by 2 on each side and correlated with the
    kernel), output row 2m + p is the sum over taps t with p + t even of x[m + (p + t - 2) / 2] * k[t]:
    phase 0 reads input offsets (-1, 0) with taps (0, 2), phase 1 reads offsets (0, +1) with taps (1, 3).
    So the transposed conv equals a 3x3 'SAME' conv to 4C channels (each phase a 2x2 slice of the 4x4
    kernel placed in a 3x3 kernel, zeros elsewhere) followed by `depth_to_space`.

    Args:
      kernel: (4, 4, Cin, Cout).
    Returns:
      (3, 3, Cin, 4 * Cout), channels ordered as `depth_to_space` reads them.
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 4 or kernel.shape[:2] != (4, 4):
        raise ValueError(f"expected a (4, 4, Cin, Cout) kernel, got shape {kernel.shape}.")
    cin, cout = kernel.shape[2:]
    # tap[d + 1, p]: the 4x4 tap t = 2 * d + 2 - p that phase p reads at input offset d, or 4 (a zero
    # row appended below) where that phase has no tap: [[4, 0, 2], [1, 3, 4]] transposed.
    tap = np.array([[2 * d + 2 - p if 0 <= 2 * d + 2 - p < 4 else 4 for p in range(2)]
                    for d in range(-1, 2)])
    padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
    # out[a, b, pi, pj] = padded[tap[a, pi], tap[b, pj]]  -> (3, 3, 2, 2, Cin, Cout)
    out = padded[tap[:, None, :, None], tap[None, :, None, :]]
    return out.transpose(0, 1, 4, 2, 3, 5).reshape(3, 3, cin, 4 * cout)


class Upsample(nn.Module):
    """Doubles H and W and maps to `features` channels (no normalisation or activation)."""

    features: int  # output channels
    mode: str = "subpixel"  # one of UPSAMPLE_MODES
    dtype: Any = jnp.float32  # compute dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # No bias: every up-sampling is followed by BatchNorm, whose offset replaces it.
        kw = dict(use_bias=False, kernel_init=_INIT, dtype=self.dtype)
        if self.mode == "subpixel":
            x = nn.Conv(4 * self.features, (3, 3), padding="SAME", name="conv", **kw)(x)
            return depth_to_space(x, 2)
        if self.mode == "transpose":
            return nn.ConvTranspose(self.features, (4, 4), strides=(2, 2), padding="SAME",
                                    name="conv", **kw)(x)
        if self.mode == "resize":
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            return nn.Conv(self.features, (3, 3), padding="SAME", name="conv", **kw)(x)
        raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {self.mode!r}.")


class Generator(nn.Module):
    """DCGAN generator: vector (B, z_dim) [+ labels (B,)] -> images (B, R, R, img_channels) in [-1, 1].

    Stage channels for resolution r: min(width * R / r, width_max). The defaults (R = 32: 128, 96, 48, 24
    channels at 4, 8, 16, 32; 0.91M params, 49 MFLOPs/image by XLA's count) are the student for the
    default 32x32 StyleGAN2 teacher (1.35M params, 745 MFLOPs/image): 1/15 of its FLOPs, inside the
    1/8 budget that tests/test_dcgan.py checks. width=32 (1.22M params, 82 MFLOPs, 1/9) is the widest
    power-of-two-friendly choice still under budget.
    """

    z_dim: int = 128  # input vector size; = the teacher's w_dim when the student is fed the teacher's w
    resolution: int = 32  # output size R, a power of two in [16, 1024]
    img_channels: int = 3  # output channels (3 for RGB)
    width: int = 24  # channels of the full-resolution stage; doubles per halving of the resolution
    width_max: int = 128  # cap on any stage's channels
    num_classes: int = 0  # > 0: class-conditional, a learned embedding of size z_dim concatenated to z
    upsample: str = "subpixel"  # 'subpixel' | 'transpose' | 'resize' (see the module docstring)
    progressive: bool = False  # one to_rgb per stage, so it can grow stage by stage (`stage`, `alpha`)
    bn_momentum: float = 0.9  # BatchNorm running-average decay
    bn_axis_name: str | None = None  # mapped axis for cross-device batch statistics (shard_map/pmap)
    dtype: Any = jnp.float32  # compute dtype; parameters are float32

    KIND: ClassVar[str] = "generator"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"resolution": "resolution", "channels": "img_channels",
                                             "num_classes": "num_classes"}
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ("bn_axis_name",)

    @property
    def spec(self) -> GeneratorSpec:
        return GeneratorSpec(self.z_dim, self.num_classes, self.resolution, self.img_channels)

    def stage_channels(self) -> dict[int, int]:
        """{resolution: channels} for the stages 4, 8, ..., R."""
        log2 = _check_resolution(self.resolution)
        return {2**k: min(self.width * self.resolution // 2**k, self.width_max)
                for k in range(2, log2 + 1)}

    @nn.compact
    def __call__(self, z: jax.Array, labels: jax.Array | None = None, *, train: bool = False,
                 return_features: bool = False, stage: int | None = None, alpha: float | jax.Array = 1.0):
        """Generates images.

        Args:
          z: (B, z_dim) latents (or the teacher's w, see the module docstring).
          labels: (B,) int class labels; required iff num_classes > 0.
          train: BatchNorm uses batch statistics and updates 'batch_stats' (apply with
            mutable=['batch_stats']); otherwise it uses the running averages.
          return_features: also return each stage's output map.
          stage: `progressive` generators only: the resolution r grown so far (8 <= r <= R, a power of two;
            None = R). Only the stages up to r run.
          alpha: `progressive` only: the fade-in of stage r (ProGAN): images = (1 - alpha) * up2(rgb_{r/2}) +
            alpha * rgb_r, where rgb_s = tanh(to_rgb_s(stage s output)) and up2 repeats pixels; alpha = 0 is
            the previous stage upsampled, alpha = 1 the new stage alone. May be traced.
        Returns:
          images (B, r, r, img_channels) float32 in [-1, 1] (r = R unless `stage`); with return_features,
          (images, features) where features maps "res4", ..., f"res{r}" to the stage outputs (B, s, s, C_s)
          after BatchNorm and ReLU, in the compute dtype.
        """
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {self.upsample!r}.")
        if z.ndim != 2 or z.shape[-1] != self.z_dim:
            raise ValueError(f"z must have shape (B, {self.z_dim}), got {z.shape}.")
        channels = self.stage_channels()
        top = self.resolution if stage is None else stage
        if top != self.resolution and (not self.progressive or top not in channels or top < 8):
            raise ValueError(f"stage={stage}: only a progressive generator grows, through the resolutions "
                             f"{sorted(r for r in channels if r >= 8)}.")
        x = z.astype(self.dtype)
        if self.num_classes > 0:
            if labels is None:
                raise ValueError(f"num_classes={self.num_classes}: labels are required.")
            emb = nn.Embed(self.num_classes, self.z_dim, embedding_init=_INIT, name="class_embed")(labels)
            x = jnp.concatenate([x, emb.astype(self.dtype)], axis=-1)

        def bn_relu(h: jax.Array, name: str) -> jax.Array:
            h = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                             axis_name=self.bn_axis_name, dtype=self.dtype,
                             scale_init=lambda k, s, d: 1.0 + _INIT(k, s, d), name=name)(h)
            return nn.relu(h)

        def to_rgb(h: jax.Array, res: int) -> jax.Array:
            name = "to_rgb" if res == self.resolution else f"to_rgb{res}"
            h = nn.Conv(self.img_channels, (3, 3), padding="SAME", kernel_init=_INIT, dtype=self.dtype, name=name)(h)
            return jnp.tanh(h.astype(jnp.float32))

        features = {}
        x = nn.Dense(16 * channels[4], use_bias=False, kernel_init=_INIT, dtype=self.dtype,
                     name="dense")(x)
        x = bn_relu(x.reshape(x.shape[0], 4, 4, channels[4]), "bn4")
        features["res4"] = x
        for res in sorted(r for r in channels if 4 < r <= top):
            x = Upsample(channels[res], self.upsample, self.dtype, name=f"up{res}")(x)
            x = bn_relu(x, f"bn{res}")
            features[f"res{res}"] = x
        images = to_rgb(x, top)
        if self.progressive:
            if self.is_initializing():  # every stage's to_rgb exists from the start
                for res in sorted(r for r in channels if 4 <= r < self.resolution and r != top):
                    if f"res{res}" in features:
                        to_rgb(features[f"res{res}"], res)
            if top > 4 and not (isinstance(alpha, (int, float)) and alpha == 1.0):
                previous = to_rgb(features[f"res{top // 2}"], top // 2)
                previous = jnp.repeat(jnp.repeat(previous, 2, axis=1), 2, axis=2)
                images = (1.0 - alpha) * previous + alpha * images
        return (images, features) if return_features else images


class Discriminator(nn.Module):
    """DCGAN discriminator: images (B, R, R, img_channels) [+ labels (B,)] -> logits (B,).

    Conv stage to resolution r has min(width * R / (2 r), width_max) channels.
    """

    resolution: int = 32  # input size R, a power of two in [16, 1024]
    img_channels: int = 3  # input channels
    width: int = 64  # channels of the first (R/2) conv; doubles per halving of the resolution
    width_max: int = 512  # cap on any stage's channels
    num_classes: int = 0  # > 0: class-conditional by projection (logit += <embed(y), phi(x)>)
    use_batchnorm: bool = False  # BatchNorm after every conv but the first (off: R1 is per-image)
    bn_momentum: float = 0.9  # BatchNorm running-average decay (when use_batchnorm)
    bn_axis_name: str | None = None  # mapped axis for cross-device batch statistics
    dtype: Any = jnp.float32  # compute dtype; parameters are float32

    KIND: ClassVar[str] = "discriminator"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"resolution": "resolution", "channels": "img_channels",
                                             "num_classes": "num_classes"}
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ("bn_axis_name",)

    def stage_channels(self) -> dict[int, int]:
        """{resolution: channels} for the conv outputs R/2, R/4, ..., 4."""
        log2 = _check_resolution(self.resolution)
        return {2**k: min(self.width * self.resolution // 2**(k + 1), self.width_max)
                for k in range(log2 - 1, 1, -1)}

    @nn.compact
    def __call__(self, x: jax.Array, labels: jax.Array | None = None, *, train: bool = False
                 ) -> jax.Array:
        """Scores images.

        Args:
          x: (B, R, R, img_channels) images in [-1, 1].
          labels: (B,) int class labels; required iff num_classes > 0.
          train: only matters with use_batchnorm (batch statistics, 'batch_stats' updated).
        Returns:
          (B,) float32 logits (higher = real).
        """
        expected = (self.resolution, self.resolution, self.img_channels)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {x.shape}.")
        h = x.astype(self.dtype)
        for i, (res, ch) in enumerate(sorted(self.stage_channels().items(), reverse=True)):
            h = nn.Conv(ch, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)), kernel_init=_INIT,
                        use_bias=not (self.use_batchnorm and i > 0), dtype=self.dtype,
                        name=f"conv{res}")(h)
            if self.use_batchnorm and i > 0:
                h = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                 axis_name=self.bn_axis_name, dtype=self.dtype, name=f"bn{res}")(h)
            h = nn.leaky_relu(h, 0.2)
        phi = h.reshape(h.shape[0], -1)  # (B, 16 * C_4)
        logits = nn.Dense(1, kernel_init=_INIT, dtype=self.dtype, name="out")(phi)[:, 0]
        if self.num_classes > 0:
            if labels is None:
                raise ValueError(f"num_classes={self.num_classes}: labels are required.")
            emb = nn.Embed(self.num_classes, phi.shape[-1], embedding_init=_INIT,
                           name="class_embed")(labels)
            logits = logits + jnp.sum(emb.astype(self.dtype) * phi, axis=-1)
        return logits.astype(jnp.float32)
