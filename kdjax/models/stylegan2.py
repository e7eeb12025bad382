"""StyleGAN2 generator and discriminator (Karras et al. 2020, config F), NHWC Flax Linen.

Faithful to NVlabs stylegan2-ada-pytorch `training/networks.py` (also the StyleGAN2 networks of the
stylegan3 repository): same layer structure, parameter names (`mapping.fc{i}`, `synthesis.b{res}.conv0`,
...), equalised learning rate, FIR [1,3,3,1] resampling, weight demodulation, noise inputs, skip generator
and residual discriminator, so that official `G_ema` pickles import one to one
(`python -m kdjax.stylegan2_import`). The low-level ops are in `stylegan2_layers.py`.

Channels per resolution: min(channel_base // res, channel_max) (official channels_dict). The defaults
below are the small 32x32 teacher this project trains on CPU (~1.35M parameters in G); the official
FFHQ-1024 network is z_dim=w_dim=512, img_resolution=1024, channel_base=32768, channel_max=512.

Variable collections of the generator:
- `params`: trainable, float32.
- `w_avg`: the tracked mean of W (`mapping_network/w_avg`), updated only with `update_w_avg=True` and the
  collection mutable: w_avg <- lerp(mean(w), w_avg, w_avg_beta) (batch mean pmean-ed over `axis_name`).
- `noise_consts`: one fixed (res, res) noise image per synthesis layer, drawn at init from the `params`
  rng, used by noise_mode='const'.
Rng streams: `noise` (noise_mode='random'), `style_mix` (style_mixing_prob > 0).

Example:
    G = Generator()
    variables = G.init({"params": k0, "noise": k1}, jnp.zeros((1, G.z_dim)))
    img = G.apply(variables, z, rngs={"noise": k2})                  # (B, 32, 32, 3), about [-1, 1]
    ws = G.apply(variables, z, method="mapping", truncation_psi=0.7)  # (B, num_ws, w_dim)
    img, feats = G.apply(variables, ws, method="synthesis", noise_mode="const", return_features=True)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.interface import GeneratorSpec
from kdjax.models.stylegan2_layers import (Conv2dLayer, FullyConnectedLayer, bias_act, minibatch_std,
                                           modulated_conv2d, normalize_2nd_moment, setup_filter,
                                           upsample2d)

Dtype = Any
NOISE_MODES = ("random", "const", "none")


def channels_dict(resolutions, channel_base: int, channel_max: int) -> dict[int, int]:
    """Official channel formula: {res: min(channel_base // res, channel_max)}."""
    return {res: min(channel_base // res, channel_max) for res in resolutions}


def labels_to_c(labels: Optional[jax.Array], c_dim: int, batch: int) -> Optional[jax.Array]:
    """Class labels as the official conditioning vector c: int ids (B,) -> one-hot, (B, c_dim) as is."""
    if c_dim == 0:
        return None
    if labels is None:
        raise ValueError(f"This network is conditional (c_dim={c_dim}); pass labels.")
    labels = jnp.asarray(labels)
    if labels.ndim == 1:
        return jax.nn.one_hot(labels, c_dim, dtype=jnp.float32)
    if labels.shape != (batch, c_dim):
        raise ValueError(f"labels must be (B,) ints or (B, {c_dim}) floats, got {labels.shape}.")
    return labels.astype(jnp.float32)


def mix_styles(ws1: jax.Array, ws2: jax.Array, crossover: jax.Array | int) -> jax.Array:
    """Style mixing: rows [0, crossover) of ws1, rows [crossover, num_ws) of ws2.

    Args:
      ws1, ws2: (B, num_ws, w_dim).
      crossover: int, scalar array, or (B,) array; crossover == num_ws keeps ws1 whole.
    """
    idx = jnp.arange(ws1.shape[1])[None, :, None]
    cross = jnp.reshape(jnp.asarray(crossover), (-1, 1, 1))
    return jnp.where(idx < cross, ws1, ws2)


def sample_crossover(rng: jax.Array, num_ws: int, prob: float) -> jax.Array:
    """Official training-time mixing cutoff: uniform in [1, num_ws) with probability `prob`, else num_ws.

    One cutoff for the whole batch, as in stylegan2-ada-pytorch `loss.py`.
    """
    k1, k2 = jax.random.split(rng)
    cutoff = jax.random.randint(k1, (), 1, num_ws)
    return jnp.where(jax.random.uniform(k2, ()) < prob, cutoff, num_ws)


class MappingNetwork(nn.Module):
    """Official `MappingNetwork`: z (and c) -> w, 8 equalised-lr dense layers with lr multiplier 0.01."""
    z_dim: int                                  # latent Z dimensionality (0 = no latent, D's label map)
    c_dim: int                                  # label dimensionality (0 = unconditional)
    w_dim: int                                  # output W dimensionality
    num_ws: Optional[int]                       # broadcast w to (B, num_ws, w_dim); None = (B, w_dim)
    num_layers: int = 8                         # number of dense layers
    embed_features: Optional[int] = None        # label embedding width (None = w_dim)
    layer_features: Optional[int] = None        # hidden width (None = w_dim)
    lr_multiplier: float = 0.01                 # learning-rate multiplier of the dense layers
    w_avg_beta: Optional[float] = 0.995         # decay of the tracked W mean (None = not tracked)
    axis_name: Optional[str] = None             # data-parallel axis for the w_avg batch mean

    @nn.compact
    def __call__(self, z: Optional[jax.Array], c: Optional[jax.Array], truncation_psi: float = 1.0,
                 truncation_cutoff: Optional[int] = None, update_w_avg: bool = False) -> jax.Array:
        embed = self.w_dim if self.embed_features is None else self.embed_features
        hidden = self.w_dim if self.layer_features is None else self.layer_features
        parts = []
        if self.z_dim > 0:
            parts.append(normalize_2nd_moment(z.astype(jnp.float32)))
        if self.c_dim > 0:
            parts.append(normalize_2nd_moment(FullyConnectedLayer(embed, name="embed")(c)))
        x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        for idx in range(self.num_layers):
            out = self.w_dim if idx == self.num_layers - 1 else hidden
            x = FullyConnectedLayer(out, lr_multiplier=self.lr_multiplier, activation="lrelu",
                                    name=f"fc{idx}")(x)
        track = self.num_ws is not None and self.w_avg_beta is not None
        if track:
            w_avg = self.variable("w_avg", "w_avg", jnp.zeros, (self.w_dim,), jnp.float32)
            if update_w_avg and not self.is_initializing():
                mean = jnp.mean(jax.lax.stop_gradient(x), axis=0)
                if self.axis_name is not None:
                    mean = jax.lax.pmean(mean, self.axis_name)
                w_avg.value = mean + self.w_avg_beta * (w_avg.value - mean)
        if self.num_ws is not None:
            x = jnp.broadcast_to(x[:, None, :], (x.shape[0], self.num_ws, self.w_dim))
        if not (isinstance(truncation_psi, (int, float)) and truncation_psi == 1):
            if not track:
                raise ValueError("Truncation needs a tracked w_avg (num_ws and w_avg_beta set).")
            trunc = w_avg.value + truncation_psi * (x - w_avg.value)
            if self.num_ws is None or truncation_cutoff is None:
                x = trunc
            else:
                x = jnp.where(jnp.arange(self.num_ws)[None, :, None] < truncation_cutoff, trunc, x)
        return x


class SynthesisLayer(nn.Module):
    """Official `SynthesisLayer`: affine style, modulated 3x3 conv (optionally 2x up), noise, bias_act."""
    features: int                        # output channels
    w_dim: int                           # W dimensionality
    resolution: int                      # output resolution of this layer
    up: int = 1                          # 1 or 2 (FIR up-sampling)
    kernel_size: int = 3                 # square kernel size
    conv_clamp: Optional[float] = None   # clamp pre-output to +-conv_clamp*gain; None = off
    fused_modconv: bool = False          # grouped-conv path (same result; slower here, see layers doc)
    dtype: Dtype = jnp.float32           # compute dtype

    @nn.compact
    def __call__(self, x: jax.Array, w: jax.Array, noise_mode: str = "random", gain: float = 1.0):
        cin = x.shape[-1]
        styles = FullyConnectedLayer(cin, bias_init=1.0, name="affine")(w)
        k = self.kernel_size
        weight = self.param("weight", nn.initializers.normal(1.0), (k, k, cin, self.features))
        noise_strength = self.param("noise_strength", nn.initializers.zeros, ())
        res = self.resolution
        noise_const = self.variable("noise_consts", "noise_const",
                                    lambda: jax.random.normal(self.make_rng("params"), (res, res)))
        noise = None
        if noise_mode == "random":
            noise = jax.random.normal(self.make_rng("noise"), (x.shape[0], res, res, 1)) * noise_strength
        elif noise_mode == "const":
            noise = (noise_const.value * noise_strength)[None, :, :, None]
        elif noise_mode != "none":
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}.")
        x = modulated_conv2d(x.astype(self.dtype), weight, styles, demodulate=True, up=self.up,
                             padding=k // 2, flip_weight=(self.up == 1), noise=noise,
                             fused=self.fused_modconv)
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, bias, act="lrelu", gain=math.sqrt(2.0) * gain, clamp=clamp)


class ToRGBLayer(nn.Module):
    """Official `ToRGBLayer`: affine style, modulated 1x1 conv without demodulation, bias, clamp."""
    features: int                        # image channels
    w_dim: int                           # W dimensionality
    conv_clamp: Optional[float] = None   # clamp to +-conv_clamp; None = off
    fused_modconv: bool = False          # grouped-conv path
    dtype: Dtype = jnp.float32           # compute dtype

    @nn.compact
    def __call__(self, x: jax.Array, w: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        styles = FullyConnectedLayer(cin, bias_init=1.0, name="affine")(w) * (1.0 / math.sqrt(cin))
        weight = self.param("weight", nn.initializers.normal(1.0), (1, 1, cin, self.features))
        x = modulated_conv2d(x.astype(self.dtype), weight, styles, demodulate=False,
                             fused=self.fused_modconv)
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return bias_act(x, bias, act="linear", clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """Official `SynthesisBlock`, architecture 'skip': [const | conv0 (up)], conv1, toRGB added to img."""
    in_channels: int                     # input channels, 0 = first block (learned 4x4 constant)
    out_channels: int                    # output channels
    w_dim: int                           # W dimensionality
    resolution: int                      # output resolution
    img_channels: int                    # image channels
    conv_clamp: Optional[float] = None   # see SynthesisLayer
    fused_modconv: bool = False          # see SynthesisLayer
    dtype: Dtype = jnp.float32           # compute dtype

    @property
    def num_conv(self) -> int:
        return 1 if self.in_channels == 0 else 2

    @nn.compact
    def __call__(self, x, img, ws, noise_mode: str = "random"):
        kw = dict(w_dim=self.w_dim, resolution=self.resolution, conv_clamp=self.conv_clamp,
                  fused_modconv=self.fused_modconv, dtype=self.dtype)
        if self.in_channels == 0:
            const = self.param("const", nn.initializers.normal(1.0), (self.resolution, self.resolution,
                                                                        self.out_channels))
            x = jnp.broadcast_to(const[None].astype(self.dtype), (ws.shape[0],) + const.shape)
            x = SynthesisLayer(self.out_channels, name="conv1", **kw)(x, ws[:, 0], noise_mode)
        else:
            x = SynthesisLayer(self.out_channels, up=2, name="conv0", **kw)(x, ws[:, 0], noise_mode)
            x = SynthesisLayer(self.out_channels, name="conv1", **kw)(x, ws[:, 1], noise_mode)
        if img is not None:
            img = upsample2d(img, setup_filter())
        y = ToRGBLayer(self.img_channels, self.w_dim, conv_clamp=self.conv_clamp,
                       fused_modconv=self.fused_modconv, dtype=self.dtype, name="torgb")(x, ws[:, self.num_conv])
        y = y.astype(jnp.float32)
        img = y if img is None else img + y
        return x, img


class SynthesisNetwork(nn.Module):
    """Official `SynthesisNetwork` (skip): blocks b4, b8, ..., b{img_resolution}."""
    w_dim: int                           # W dimensionality
    img_resolution: int                  # output resolution (power of two >= 4)
    img_channels: int                    # image channels
    channel_base: int = 32768            # channels = min(channel_base // res, channel_max)
    channel_max: int = 512               # see channel_base
    conv_clamp: Optional[float] = None   # see SynthesisLayer
    fused_modconv: bool = False          # see SynthesisLayer
    dtype: Dtype = jnp.float32           # compute dtype

    @property
    def block_resolutions(self) -> list[int]:
        return [2 ** i for i in range(2, int(math.log2(self.img_resolution)) + 1)]

    @property
    def num_ws(self) -> int:
        return 2 * len(self.block_resolutions)   # 1 (b4 conv) + 2 per later block + 1 final toRGB

    @nn.compact
    def __call__(self, ws: jax.Array, noise_mode: str = "random"):
        if ws.ndim != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.w_dim:
            raise ValueError(f"ws must be (B, {self.num_ws}, {self.w_dim}), got {ws.shape}.")
        ch = channels_dict(self.block_resolutions, self.channel_base, self.channel_max)
        x = img = None
        w_idx = 0
        features = {}
        for res in self.block_resolutions:
            block = SynthesisBlock(ch[res // 2] if res > 4 else 0, ch[res], self.w_dim, res,
                                   self.img_channels, conv_clamp=self.conv_clamp,
                                   fused_modconv=self.fused_modconv, dtype=self.dtype, name=f"b{res}")
            n = block.num_conv
            x, img = block(x, img, ws[:, w_idx:w_idx + n + 1].astype(jnp.float32), noise_mode)
            w_idx += n
            features[f"res{res}"] = x
        return img, features


class Generator(nn.Module):
    """StyleGAN2 generator: `mapping` (z, labels -> ws) then `synthesis` (ws -> NHWC image in ~[-1, 1]).

    Methods: `__call__`, `mapping`, `synthesis`; property `num_ws`. See the module docstring.
    """
    z_dim: int = 128                         # latent Z dimensionality
    w_dim: int = 128                         # intermediate latent W dimensionality
    c_dim: int = 0                           # number of classes / label dims (0 = unconditional)
    img_resolution: int = 32                 # output resolution (power of two, 4..1024)
    img_channels: int = 3                    # output image channels
    channel_base: int = 4096                 # channels = min(channel_base // res, channel_max)
    channel_max: int = 128                   # see channel_base (official: 32768 / 512)
    mapping_layers: int = 8                  # dense layers in the mapping network
    mapping_lr_multiplier: float = 0.01      # learning-rate multiplier of the mapping layers
    mapping_embed_features: Optional[int] = None   # label embedding width (None = w_dim)
    mapping_layer_features: Optional[int] = None   # mapping hidden width (None = w_dim)
    w_avg_beta: float = 0.995                # decay of the tracked W mean
    conv_clamp: Optional[float] = None       # clamp conv outputs to +-this (official fp16 runs: 256)
    num_fp16_res: int = 0                    # accepted for official configs; ignored (use `dtype`)
    fused_modconv: bool = False              # grouped-conv modulation (same result, slower on CPU)
    axis_name: Optional[str] = None          # data-parallel axis for the w_avg batch mean
    dtype: Dtype = jnp.float32               # compute dtype of the synthesis convs; params float32

    KIND: ClassVar[str] = "generator"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"resolution": "img_resolution", "channels": "img_channels",
                                             "num_classes": "c_dim"}
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ("axis_name",)

    @property
    def spec(self) -> GeneratorSpec:
        return GeneratorSpec(self.z_dim, self.c_dim, self.img_resolution, self.img_channels)

    @property
    def num_ws(self) -> int:
        return 2 * (int(math.log2(self.img_resolution)) - 1)

    def setup(self):
        if self.img_resolution < 4 or self.img_resolution & (self.img_resolution - 1):
            raise ValueError(f"img_resolution must be a power of two >= 4, got {self.img_resolution}.")
        self.mapping_network = MappingNetwork(
            self.z_dim, self.c_dim, self.w_dim, self.num_ws, num_layers=self.mapping_layers,
            embed_features=self.mapping_embed_features, layer_features=self.mapping_layer_features,
            lr_multiplier=self.mapping_lr_multiplier, w_avg_beta=self.w_avg_beta,
            axis_name=self.axis_name)
        self.synthesis_network = SynthesisNetwork(
            self.w_dim, self.img_resolution, self.img_channels, channel_base=self.channel_base,
            channel_max=self.channel_max, conv_clamp=self.conv_clamp,
            fused_modconv=self.fused_modconv, dtype=self.dtype)

    def mapping(self, z: jax.Array, labels: Optional[jax.Array] = None, *, truncation_psi: float = 1.0,
                truncation_cutoff: Optional[int] = None, update_w_avg: bool = False) -> jax.Array:
        """z (B, z_dim) [+ labels] -> ws (B, num_ws, w_dim), truncated towards w_avg by psi.

        truncation_cutoff: truncate only the first `cutoff` rows of ws (None = all).
        update_w_avg: update the `w_avg` collection (must be mutable) with this batch's mean w.
        """
        c = labels_to_c(labels, self.c_dim, z.shape[0])
        return self.mapping_network(z, c, truncation_psi, truncation_cutoff, update_w_avg)

    def synthesis(self, ws: jax.Array, *, noise_mode: str = "random", return_features: bool = False):
        """ws (B, num_ws, w_dim) -> images (B, R, R, img_channels) [, features {"res4": NHWC, ...}]."""
        img, features = self.synthesis_network(ws, noise_mode)
        return (img, features) if return_features else img

    def __call__(self, z: jax.Array, labels: Optional[jax.Array] = None, *, truncation_psi: float = 1.0,
                 truncation_cutoff: Optional[int] = None, noise_mode: str = "random", train: bool = False,
                 return_features: bool = False, update_w_avg: bool = False,
                 style_mixing_prob: float = 0.0):
        """z (B, z_dim) -> images (B, R, R, C) or (images, features).

        train: accepted for the common generator interface (no train-only layers here; the w_avg update
          is asked for explicitly with update_w_avg).
        style_mixing_prob: with this probability (one draw per batch, rng stream 'style_mix') rows from
          the crossover on come from a second random latent, as the official training loss does.
        """
        del train
        ws = self.mapping(z, labels, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_w_avg=update_w_avg)
        if style_mixing_prob > 0:
            k_z, k_cross = jax.random.split(self.make_rng("style_mix"))
            z2 = jax.random.normal(k_z, z.shape, jnp.float32)
            ws2 = self.mapping(z2, labels, truncation_psi=truncation_psi,
                               truncation_cutoff=truncation_cutoff)
            ws = mix_styles(ws, ws2, sample_crossover(k_cross, self.num_ws, style_mixing_prob))
        return self.synthesis(ws, noise_mode=noise_mode, return_features=return_features)


class DiscriminatorBlock(nn.Module):
    """Official `DiscriminatorBlock`, architecture 'resnet': [fromrgb], conv0, conv1 (down), skip."""
    in_channels: int                     # input channels, 0 = first block (reads the image)
    tmp_channels: int                    # channels of conv0
    out_channels: int                    # output channels
    conv_clamp: Optional[float] = None   # clamp conv outputs
    dtype: Dtype = jnp.float32           # compute dtype

    @nn.compact
    def __call__(self, x, img):
        kw = dict(conv_clamp=self.conv_clamp, dtype=self.dtype)
        if self.in_channels == 0:
            x = Conv2dLayer(self.tmp_channels, 1, activation="lrelu", name="fromrgb", **kw)(img)
        y = Conv2dLayer(self.out_channels, 1, use_bias=False, down=2, dtype=self.dtype,
                        name="skip")(x, gain=math.sqrt(0.5))
        x = Conv2dLayer(self.tmp_channels, 3, activation="lrelu", name="conv0", **kw)(x)
        x = Conv2dLayer(self.out_channels, 3, activation="lrelu", down=2, name="conv1", **kw)(
            x, gain=math.sqrt(0.5))
        return y + x


class DiscriminatorEpilogue(nn.Module):
    """Official `DiscriminatorEpilogue` at 4x4: minibatch std, conv, fc, out [, projection on cmap]."""
    in_channels: int                     # channels at 4x4
    cmap_dim: int                        # mapped-label dimensionality, 0 = unconditional
    mbstd_group_size: Optional[int] = 4  # minibatch-std group size (None = whole batch)
    mbstd_num_channels: int = 1          # minibatch-std features, 0 = off
    conv_clamp: Optional[float] = None   # clamp the conv output
    dtype: Dtype = jnp.float32           # compute dtype

    @nn.compact
    def __call__(self, x, cmap):
        x = x.astype(jnp.float32)
        if self.mbstd_num_channels > 0:
            x = minibatch_std(x, self.mbstd_group_size, self.mbstd_num_channels)
        x = Conv2dLayer(self.in_channels, 3, activation="lrelu", conv_clamp=self.conv_clamp,
                        name="conv")(x)
        # The official flattens NCHW (channel-major); transpose so that `fc` matches its weight layout.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = FullyConnectedLayer(self.in_channels, activation="lrelu", name="fc")(x)
        x = FullyConnectedLayer(1 if self.cmap_dim == 0 else self.cmap_dim, name="out")(x)
        if self.cmap_dim > 0:
            x = jnp.sum(x * cmap, axis=1, keepdims=True) * (1.0 / math.sqrt(self.cmap_dim))
        return x


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator: NHWC images (and labels) -> logits (B,)."""
    c_dim: int = 0                        # number of classes / label dims (0 = unconditional)
    img_resolution: int = 32              # input resolution (power of two >= 8)
    img_channels: int = 3                 # input image channels
    channel_base: int = 4096              # channels = min(channel_base // res, channel_max)
    channel_max: int = 128                # see channel_base (official: 32768 / 512)
    conv_clamp: Optional[float] = None    # clamp conv outputs to +-this (official fp16 runs: 256)
    num_fp16_res: int = 0                 # accepted for official configs; ignored (use `dtype`)
    cmap_dim: Optional[int] = None        # projection dims for labels (None = channels at 4x4)
    mapping_layers: int = 8               # dense layers of the label mapping (conditional only)
    mbstd_group_size: Optional[int] = 4   # minibatch-std group size (min(this, batch) is used)
    mbstd_num_channels: int = 1           # minibatch-std features, 0 = off
    dtype: Dtype = jnp.float32            # compute dtype of the convs; params float32

    KIND: ClassVar[str] = "discriminator"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"resolution": "img_resolution", "channels": "img_channels",
                                             "num_classes": "c_dim"}
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    @nn.compact
    def __call__(self, x: jax.Array, labels: Optional[jax.Array] = None, *, train: bool = False):
        del train
        log2 = int(math.log2(self.img_resolution))
        if self.img_resolution < 8 or 2 ** log2 != self.img_resolution:
            raise ValueError(f"img_resolution must be a power of two >= 8, got {self.img_resolution}.")
        block_res = [2 ** i for i in range(log2, 2, -1)]
        ch = channels_dict(block_res + [4], self.channel_base, self.channel_max)
        cmap_dim = 0 if self.c_dim == 0 else (ch[4] if self.cmap_dim is None else self.cmap_dim)
        img = x
        x = None
        for res in block_res:
            x = DiscriminatorBlock(ch[res] if res < self.img_resolution else 0, ch[res], ch[res // 2],
                                   conv_clamp=self.conv_clamp, dtype=self.dtype, name=f"b{res}")(x, img)
        cmap = None
        if self.c_dim > 0:
            c = labels_to_c(labels, self.c_dim, img.shape[0])
            cmap = MappingNetwork(0, self.c_dim, cmap_dim, None, num_layers=self.mapping_layers,
                                  w_avg_beta=None, name="mapping")(None, c)
        x = DiscriminatorEpilogue(ch[4], cmap_dim, self.mbstd_group_size, self.mbstd_num_channels,
                                  conv_clamp=self.conv_clamp, dtype=self.dtype, name="b4")(x, cmap)
        return x[:, 0]
