"""Image-to-image networks (super-resolution, inpainting, enhancement): a teacher and two students.

- `EDSR` (Lim, Son, Kim, Nah & Lee 2017, "Enhanced Deep Residual Networks for Single Image Super-Resolution"),
  the teacher: head conv, residual blocks without BatchNorm (conv-ReLU-conv, scaled by `res_scale`), a body
  conv and a skip over the whole body, a pixel-shuffle upsampler, a tail conv. `scale=1` drops the upsampler:
  the same network for inpainting and enhancement. The official model's MeanShift layers are left out
  (images here are already centred in [-1, 1]).
- `ESPCN` (Shi, Caballero, Huszar, Totz, Aitken, Bishop, Rueckert & Wang 2016, "Real-Time Single Image and
  Video Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural Network"), the super-resolution
  student: conv 5x5 (64) - conv 3x3 (32) - conv 3x3 to out_channels * scale^2 - pixel shuffle, all at the low
  resolution; tanh between the convs as in the paper (or ReLU).
- `UNet` (Ronneberger, Fischer & Brox 2015), the inpainting / enhancement network (scale 1): two 3x3 convs per
  level, stride-2 downsampling, upsampling with skip concatenation, a 1x1 output conv.

The interface is `interface.ImageToImageSpec`: `__call__(x, *, train=False, return_features=False)` takes
(B, H, W, in_channels) in [-1, 1] with any H and W (fully convolutional) and returns (B, H * scale,
W * scale, out_channels) float32, or `(images, features)` with named intermediate maps (compute dtype) for
feature distillation. The data fixes `channels` (the output channels); `extra_inputs` is the number of
channels the input has beyond them (1 for inpainting: the mask, concatenated after the image channels, see
`kdjax.core.degradations.inpainting_input`), so in_channels = channels + extra_inputs. Outputs are not
clipped (the losses see the raw values; the evaluation quantises to 8 bits).

`global_residual` (every family, on by default; not in the EDSR and ESPCN papers): the output is the
network's output plus the bilinear upsampling (`jax.image.resize`, "linear", half-pixel centres) of the
input's first `channels` channels (`upsample_input`), so the network learns only the residual detail; at
initialisation the model is already the bilinear baseline, which makes short CPU trainings converge far
faster.

`depth_to_space` here is PyTorch's `nn.PixelShuffle` order (channel c * r * r + i * r + j), which the
official EDSR and ESPCN code use; `kdjax.models.dcgan.depth_to_space` reads the channels in the other
(TensorFlow) order.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.interface import ImageToImageSpec

ACTIVATIONS = {"tanh": jnp.tanh, "relu": nn.relu}
UNET_UPSAMPLE_MODES = ("nearest", "transpose")


def depth_to_space(x: jax.Array, r: int) -> jax.Array:
    """Pixel shuffle, PyTorch's channel order: (B, H, W, C * r * r) -> (B, H * r, W * r, C) with
    out[b, h * r + i, w * r + j, c] = x[b, h, w, c * r * r + i * r + j]."""
    b, h, w, c = x.shape
    if c % (r * r):
        raise ValueError(f"depth_to_space: {c} channels are not divisible by r^2 = {r * r}.")
    x = x.reshape(b, h, w, c // (r * r), r, r)  # (b, h, w, c, i, j)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # (b, h, i, w, j, c)
    return x.reshape(b, h * r, w * r, c // (r * r))


def upsample_input(x: jax.Array, channels: int, scale: int) -> jax.Array:
    """The global-residual path: x[..., :channels] resized by `scale` with `jax.image.resize(..., "linear")`
    (bilinear, half-pixel centres), in float32; `scale=1` returns it as is."""
    x = x[..., :channels].astype(jnp.float32)
    if scale == 1:
        return x
    b, h, w, c = x.shape
    return jax.image.resize(x, (b, h * scale, w * scale, c), "linear")


def _check_input(x: jax.Array, in_channels: int) -> None:
    if x.ndim != 4 or x.shape[-1] != in_channels:
        raise ValueError(f"x must have shape (B, H, W, {in_channels}), got {x.shape}.")


class ResidualBlock(nn.Module):
    """EDSR's residual block: x + res_scale * conv3x3(relu(conv3x3(x))), no BatchNorm."""

    features: int
    res_scale: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.relu(nn.Conv(self.features, (3, 3), dtype=self.dtype, name="conv1")(x))
        h = nn.Conv(self.features, (3, 3), dtype=self.dtype, name="conv2")(h)
        return x + self.res_scale * h


class PixelShuffleUpsampler(nn.Module):
    """EDSR's upsampler: for scale 2^k, k stages of (conv3x3 to 4F, depth_to_space 2); for scale 3, one stage
    of (conv3x3 to 9F, depth_to_space 3). F = the input's channels; scale 1 is the identity."""

    scale: int
    dtype: Any = jnp.float32

    @staticmethod
    def stages(scale: int) -> list[int]:
        """The pixel-shuffle factor of each stage."""
        if scale == 3:
            return [3]
        if scale >= 1 and scale & (scale - 1) == 0:
            return [2] * (scale.bit_length() - 1)
        raise ValueError(f"scale must be 1, 3 or a power of two, got {scale}.")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f = x.shape[-1]
        for i, r in enumerate(self.stages(self.scale)):
            x = nn.Conv(r * r * f, (3, 3), dtype=self.dtype, name=f"conv{i + 1}")(x)
            x = depth_to_space(x, r)
        return x


class EDSR(nn.Module):
    """EDSR teacher: (B, H, W, channels + extra_inputs) -> (B, H * scale, W * scale, channels).

    Defaults (the EDSR-baseline block with 8 blocks instead of 16, res_scale 1 as in the baseline): RGB at x2,
    779,011 parameters, 1.54 GFLOPs per 32x32 input (XLA's count on CPU); x3 0.96M, x4 0.93M, x1 0.63M
    parameters.
    Features: "head" (head conv), "body1" ... f"body{num_blocks}" (each residual block's output) and "body"
    (after the body conv and the skip over the body, the upsampler's input): all (B, H, W, num_features).
    """

    channels: int = 3  # output channels (the data's); the input has channels + extra_inputs
    extra_inputs: int = 0  # input channels beyond the image's (1 for inpainting: the mask)
    scale: int = 2  # 1 (no upsampler), 3 or a power of two
    num_features: int = 64  # F, the width of every conv before the tail
    num_blocks: int = 8  # residual blocks
    res_scale: float = 1.0  # residual scaling in each block (0.1 in the paper's 32-block EDSR)
    global_residual: bool = True  # add upsample_input(x) to the output (module docstring)
    dtype: Any = jnp.float32  # compute dtype; parameters and outputs are float32

    KIND: ClassVar[str] = "image_to_image"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"channels": "channels"}
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def spec(self) -> ImageToImageSpec:
        return ImageToImageSpec(self.channels + self.extra_inputs, self.channels, self.scale)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
        """Restores images: x (B, H, W, in_channels) in [-1, 1] -> (B, H * scale, W * scale, channels)
        float32, or (images, features) with return_features (see the class docstring)."""
        del train  # no train-only layers
        _check_input(x, self.spec.in_channels)
        PixelShuffleUpsampler.stages(self.scale)  # validates scale before anything is built
        features = {}
        h = nn.Conv(self.num_features, (3, 3), dtype=self.dtype, name="head")(x.astype(self.dtype))
        features["head"] = skip = h
        for i in range(self.num_blocks):
            h = ResidualBlock(self.num_features, self.res_scale, self.dtype, name=f"block{i + 1}")(h)
            features[f"body{i + 1}"] = h
        h = nn.Conv(self.num_features, (3, 3), dtype=self.dtype, name="body_conv")(h) + skip
        features["body"] = h
        h = PixelShuffleUpsampler(self.scale, self.dtype, name="upsampler")(h)
        images = nn.Conv(self.channels, (3, 3), dtype=self.dtype, name="tail")(h).astype(jnp.float32)
        if self.global_residual:
            images = images + upsample_input(x, self.channels, self.scale)
        return (images, features) if return_features else images


class ESPCN(nn.Module):
    """ESPCN student: (B, H, W, channels + extra_inputs) -> (B, H * scale, W * scale, channels).

    conv5x5 (features[0]) - act - conv3x3 (features[1]) - act - conv3x3 to channels * scale^2 ("tail") -
    depth_to_space, everything at the input resolution. Defaults (the paper's 64, 32, tanh): RGB at x2,
    26,796 parameters, 53 MFLOPs per 32x32 input (XLA's count on CPU; 1/29 of the default EDSR's).
    Features: "hidden1" (B, H, W, features[0]) and "hidden2" (B, H, W, features[1]), after the activation.
    """

    channels: int = 3  # output channels (the data's); the input has channels + extra_inputs
    extra_inputs: int = 0  # input channels beyond the image's (1 for inpainting: the mask)
    scale: int = 2  # any integer >= 1 (the last conv has channels * scale^2 outputs)
    features: tuple[int, ...] = (64, 32)  # widths of the two hidden convs (5x5, 3x3)
    activation: str = "tanh"  # "tanh" (the paper) or "relu"
    global_residual: bool = True  # add upsample_input(x) to the output (module docstring)
    dtype: Any = jnp.float32  # compute dtype; parameters and outputs are float32

    KIND: ClassVar[str] = "image_to_image"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"channels": "channels"}
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def spec(self) -> ImageToImageSpec:
        return ImageToImageSpec(self.channels + self.extra_inputs, self.channels, self.scale)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
        """Upscales images: x (B, H, W, in_channels) in [-1, 1] -> (B, H * scale, W * scale, channels)
        float32, or (images, features) with return_features (see the class docstring)."""
        del train  # no train-only layers
        _check_input(x, self.spec.in_channels)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}.")
        if len(self.features) != 2 or self.scale < 1:
            raise ValueError(f"ESPCN needs two hidden widths and scale >= 1, got features={self.features}, "
                             f"scale={self.scale}.")
        act = ACTIVATIONS[self.activation]
        h1 = act(nn.Conv(self.features[0], (5, 5), dtype=self.dtype, name="conv1")(x.astype(self.dtype)))
        h2 = act(nn.Conv(self.features[1], (3, 3), dtype=self.dtype, name="conv2")(h1))
        h = nn.Conv(self.channels * self.scale**2, (3, 3), dtype=self.dtype, name="tail")(h2)
        images = depth_to_space(h, self.scale).astype(jnp.float32)
        if self.global_residual:
            images = images + upsample_input(x, self.channels, self.scale)
        return (images, {"hidden1": h1, "hidden2": h2}) if return_features else images


class ConvBlock(nn.Module):
    """Two 3x3 convs with ReLU (each after an optional GroupNorm); the first has stride `stride`."""

    features: int
    stride: int = 1
    norm_groups: int = 0  # 0: no normalisation
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, stride in enumerate((self.stride, 1)):
            x = nn.Conv(self.features, (3, 3), strides=(stride, stride), dtype=self.dtype, name=f"conv{i + 1}")(x)
            if self.norm_groups:
                x = nn.GroupNorm(num_groups=self.norm_groups, dtype=self.dtype, name=f"norm{i + 1}")(x)
            x = nn.relu(x)
        return x


class UNet(nn.Module):
    """U-Net for inpainting and enhancement: (B, H, W, channels + extra_inputs) -> (B, H, W, channels).

    Level 0 runs at H x W with widths[0] channels; level l > 0 at ceil(H / 2^l) with widths[l], entered by a
    stride-2 conv (the first of its two convs). The decoder goes back up level by level: upsample 2x
    ("nearest": repeat pixels; "transpose": 2x2 stride-2 transposed conv to widths[l]), crop to the skip's
    size (odd H, W), concatenate the encoder's map of that level, two 3x3 convs; then a 1x1 conv ("tail").
    Defaults (32, 64, 128), RGB: 471,619 parameters, 213 MFLOPs per 32x32 input.
    Features: "bottleneck" (the deepest level's map) and f"dec{l}" for each decoder level l = L-2 ... 0
    (B, ceil(H / 2^l), ceil(W / 2^l), widths[l]).
    """

    channels: int = 3  # output channels (the data's); the input has channels + extra_inputs
    extra_inputs: int = 0  # input channels beyond the image's (1 for inpainting: the mask)
    widths: tuple[int, ...] = (32, 64, 128)  # channels per level, full resolution first
    norm_groups: int = 0  # > 0: GroupNorm with this many groups after every 3x3 conv (divides every width)
    upsample: str = "nearest"  # "nearest" | "transpose"
    global_residual: bool = True  # add the input's first `channels` channels to the output
    dtype: Any = jnp.float32  # compute dtype; parameters and outputs are float32

    KIND: ClassVar[str] = "image_to_image"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"channels": "channels"}
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def spec(self) -> ImageToImageSpec:
        return ImageToImageSpec(self.channels + self.extra_inputs, self.channels, 1)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
        """Restores images: x (B, H, W, in_channels) in [-1, 1] -> (B, H, W, channels) float32, or
        (images, features) with return_features (see the class docstring)."""
        del train  # no train-only layers (GroupNorm is per image)
        _check_input(x, self.spec.in_channels)
        if self.upsample not in UNET_UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UNET_UPSAMPLE_MODES}, got {self.upsample!r}.")
        if not self.widths or (self.norm_groups and any(w % self.norm_groups for w in self.widths)):
            raise ValueError(f"widths={self.widths} must be non-empty and divisible by norm_groups={self.norm_groups}.")
        block = lambda w, stride, name: ConvBlock(w, stride, self.norm_groups, self.dtype, name=name)
        h = x.astype(self.dtype)
        skips = []
        for level, w in enumerate(self.widths):
            h = block(w, 1 if level == 0 else 2, f"enc{level}")(h)
            skips.append(h)
        features = {"bottleneck": h}
        for level in range(len(self.widths) - 2, -1, -1):
            skip = skips[level]
            if self.upsample == "nearest":
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
            else:
                h = nn.ConvTranspose(self.widths[level], (2, 2), strides=(2, 2), dtype=self.dtype,
                                     name=f"up{level}")(h)
            h = jnp.concatenate([h[:, :skip.shape[1], :skip.shape[2]], skip], axis=-1)
            h = block(self.widths[level], 1, f"dec{level}")(h)
            features[f"dec{level}"] = h
        images = nn.Conv(self.channels, (1, 1), dtype=self.dtype, name="tail")(h).astype(jnp.float32)
        if self.global_residual:
            images = images + upsample_input(x, self.channels, 1)
        return (images, features) if return_features else images
