"""The EDM denoiser family (Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"): a small U-Net F wrapped in EDM's preconditioning,

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)),

    c_skip = s_d^2 / (sigma^2 + s_d^2),   c_out = sigma s_d / sqrt(sigma^2 + s_d^2),
    c_in = 1 / sqrt(sigma^2 + s_d^2),     c_noise = ln(sigma) / 4,

with s_d = `sigma_data`, the data's standard deviation (`preconditioning`). x = y + sigma n is a clean image y
plus Gaussian noise of standard deviation sigma; D(x; sigma) estimates y. The input of F has unit variance at
every sigma, and its target (y - c_skip x) / c_out too, which is why one network serves every noise level. The
loss that trains it is `kdjax.losses.edm_loss`; `kdjax.models.diffusion_samplers` turns a denoiser into images.

F (`UNet`, the submodule "net" of `EDMUNet`; after ADM / EDM's DhariwalUNet, smaller, not a port of NVlabs/edm):
- c_noise -> a sinusoidal (positional, "transformer") embedding of `widths[0]` channels -> Dense(4 widths[0]) ->
  SiLU -> Dense; with `num_classes > 0` a learned embedding of the label is added; SiLU of the sum is the
  embedding every residual block receives;
- a 3x3 stem conv, then per level (full resolution first) `num_blocks` residual blocks of `widths[level]`
  channels and, below the last level, a stride-2 3x3 conv down; a middle of block - attention - block; the
  decoder mirrors it with `num_blocks + 1` blocks per level, each taking the matching encoder map concatenated
  (U-Net skips), and a nearest-neighbour x2 + 3x3 conv up between levels; GroupNorm - SiLU - 3x3 conv out;
- a residual block: GroupNorm - SiLU - conv3x3, plus Dense(embedding) added per channel, GroupNorm - SiLU -
  dropout - conv3x3 (initialised to zero), added to the input (through a 1x1 conv when the width changes),
  the sum scaled by sqrt(1/2) as in EDM;
- self-attention (GroupNorm, 1x1 qkv, softmax(q k^T / sqrt(d)) v over positions with heads of 64 channels at
  most, 1x1 projection initialised to zero, residual, scaled by sqrt(1/2)) after every block whose resolution
  is in `attention_resolutions`, and in the middle;
- GroupNorm groups: min(32, C // 4) for C channels, as in EDM.
The output conv is initialised to zero, so at initialisation D(x; sigma) = c_skip(sigma) x.

`parameterisation="consistency"` swaps EDM's c_skip and c_out for the consistency model's
(`consistency_preconditioning`: c_skip(sigma_min) = 1, c_out(sigma_min) = 0), so the network is a consistency
function f(x; sigma) with f(x; sigma_min) = x. The parameters are the same, so a consistency student starts from a
denoiser teacher's weights (`kdjax.steps.consistency`).

`__call__(x, sigma, labels=None, *, train=False, return_features=False)` (`interface.DenoiserSpec`): x (B, R, R,
C), sigma (B,) (or a scalar, used for every row) > 0, labels (B,) int when conditional; returns D(x; sigma)
float32 (B, R, R, C), or `(D, features)` with "mid" (the middle's map) and f"dec{r}" (the decoder's last map at
resolution r). Dropout draws from the `dropout` rng stream when `train`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.interface import DenoiserSpec, GeneratorSpec

SKIP_SCALE = math.sqrt(0.5)  # EDM's scaling of every residual sum
HEAD_CHANNELS = 64  # channels per attention head (at least one head)
MAX_POSITIONS = 10_000  # the positional embedding's longest period, in units of c_noise
PARAMETERISATIONS = ("edm", "consistency")  # a denoiser, or a consistency function (`coefficients`)


def preconditioning(sigma: jax.Array, sigma_data: float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """EDM's (c_skip, c_out, c_in, c_noise) at noise levels `sigma` (any shape, > 0), in float32:

        c_skip = s_d^2 / (sigma^2 + s_d^2),  c_out = sigma s_d / sqrt(sigma^2 + s_d^2),
        c_in = 1 / sqrt(sigma^2 + s_d^2),   c_noise = ln(sigma) / 4,   s_d = sigma_data.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data * jax.lax.rsqrt(total), jax.lax.rsqrt(total), jnp.log(sigma) / 4


def positional_embedding(t: jax.Array, channels: int) -> jax.Array:
    """(B,) -> (B, channels): [cos(t f_0), ..., cos(t f_{h-1}), sin(t f_0), ..., sin(t f_{h-1})] with h = channels
    / 2 and f_j = MAX_POSITIONS^(-j / (h - 1)) (frequencies from 1 down to 1 / MAX_POSITIONS, EDM's endpoint=True)."""
    half = channels // 2
    freqs = MAX_POSITIONS ** (-jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def norm_groups(channels: int) -> int:
    """EDM's GroupNorm groups: min(32, channels // 4), at least 1."""
    return max(1, min(32, channels // 4))


class ResBlock(nn.Module):
    """GroupNorm - SiLU - conv3x3 (+ Dense(emb)) - GroupNorm - SiLU - dropout - conv3x3 (zero init), residual."""

    features: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        gn = lambda c, name: nn.GroupNorm(norm_groups(c), epsilon=1e-5, dtype=self.dtype, name=name)
        h = nn.Conv(self.features, (3, 3), dtype=self.dtype, name="conv0")(nn.silu(gn(x.shape[-1], "norm0")(x)))
        h = h + nn.Dense(self.features, dtype=self.dtype, name="emb")(emb)[:, None, None, :]
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(gn(self.features, "norm1")(h)))
        h = nn.Conv(self.features, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros, name="conv1")(h)
        skip = x if x.shape[-1] == self.features else nn.Conv(self.features, (1, 1), dtype=self.dtype,
                                                               name="skip")(x)
        return (h + skip) * SKIP_SCALE


class Attention(nn.Module):
    """Multi-head self-attention over the positions of a map, residual (projection initialised to zero)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        heads = max(1, c // HEAD_CHANNELS)
        y = nn.GroupNorm(norm_groups(c), epsilon=1e-5, dtype=self.dtype, name="norm")(x)
        qkv = nn.Conv(3 * c, (1, 1), dtype=self.dtype, name="qkv")(y).reshape(b, h * w, 3, heads, c // heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32) / math.sqrt(c // heads)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        y = jnp.einsum("bnqk,bknd->bqnd", weights, v).reshape(b, h, w, c)
        y = nn.Conv(c, (1, 1), dtype=self.dtype, kernel_init=nn.initializers.zeros, name="proj")(y)
        return (x + y) * SKIP_SCALE


class UNet(nn.Module):
    """F, the body of `EDMUNet` (module docstring): (c_in x, c_noise, labels) -> (F float32, named maps)."""

    channels: int
    num_classes: int
    widths: tuple[int, ...]
    num_blocks: int
    attention_resolutions: tuple[int, ...]
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c_noise: jax.Array, labels: jax.Array | None, train: bool
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        width0, dt = self.widths[0], self.dtype
        emb = positional_embedding(c_noise, width0)
        emb = nn.Dense(4 * width0, dtype=dt, name="map0")(emb)
        emb = nn.Dense(4 * width0, dtype=dt, name="map1")(nn.silu(emb))
        if self.num_classes:
            emb = emb + nn.Embed(self.num_classes, 4 * width0, name="label_embed")(labels).astype(emb.dtype)
        emb = nn.silu(emb)

        def block(h: jax.Array, width: int, name: str) -> jax.Array:
            h = ResBlock(width, self.dropout, dt, name=name)(h, emb, train)
            if h.shape[1] in self.attention_resolutions:
                h = Attention(dt, name=f"{name}_attn")(h)
            return h

        h = nn.Conv(width0, (3, 3), dtype=dt, name="stem")(x.astype(dt))
        skips = [h]
        last = len(self.widths) - 1
        for level, width in enumerate(self.widths):
            for i in range(self.num_blocks):
                h = block(h, width, f"enc{level}_{i}")
                skips.append(h)
            if level < last:
                h = nn.Conv(width, (3, 3), strides=(2, 2), dtype=dt, name=f"down{level}")(h)
                skips.append(h)
        h = ResBlock(self.widths[-1], self.dropout, dt, name="mid0")(h, emb, train)
        h = Attention(dt, name="mid_attn")(h)
        h = ResBlock(self.widths[-1], self.dropout, dt, name="mid1")(h, emb, train)
        features = {"mid": h}
        for level in range(last, -1, -1):
            width = self.widths[level]
            for i in range(self.num_blocks + 1):
                h = block(jnp.concatenate([h, skips.pop()], axis=-1), width, f"dec{level}_{i}")
            features[f"dec{h.shape[1]}"] = h
            if level > 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = nn.Conv(width, (3, 3), dtype=dt, name=f"up{level}")(h)
        h = nn.silu(nn.GroupNorm(norm_groups(width0), epsilon=1e-5, dtype=dt, name="out_norm")(h))
        out = nn.Conv(self.channels, (3, 3), dtype=dt, kernel_init=nn.initializers.zeros, name="out")(h)
        return out.astype(jnp.float32), features


class EDMUNet(nn.Module):
    """The EDM-preconditioned U-Net denoiser (module docstring). Defaults at 32x32x1: 1,623,169 parameters."""

    resolution: int = 32  # from the data
    channels: int = 1  # from the data
    num_classes: int = 0  # from the data when conditional; 0 = unconditional
    sigma_data: float = 0.5  # the data's standard deviation s_d in the preconditioning
    widths: tuple[int, ...] = (32, 64, 64)  # channels per level, full resolution first
    num_blocks: int = 2  # residual blocks per level in the encoder (the decoder has one more)
    attention_resolutions: tuple[int, ...] = (8,)  # self-attention after the blocks at these resolutions
    dropout: float = 0.0  # in every residual block, when training (the `dropout` rng stream)
    parameterisation: str = "edm"  # "edm" (a denoiser) or "consistency" (a consistency function)
    sigma_min: float = 0.002  # the consistency function's boundary level (parameterisation "consistency")
    dtype: Any = jnp.float32  # compute dtype; parameters and the output are float32

    KIND: ClassVar[str] = "denoiser"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"resolution": "resolution", "channels": "channels",
                                             "num_classes": "num_classes"}
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def spec(self) -> DenoiserSpec:
        return DenoiserSpec(self.resolution, self.channels, self.num_classes, self.sigma_data)

    def check(self) -> None:
        """Raises ValueError naming the first field that cannot work (called by `__call__`; tasks call it to
        check a config before any compute)."""
        levels = len(self.widths)
        if levels < 1 or any(w < 4 or w % norm_groups(w) for w in self.widths):
            raise ValueError(f"widths={tuple(self.widths)} must be non-empty, each >= 4 and divisible by its "
                             "GroupNorm groups min(32, width // 4).")
        if self.resolution < 1 or self.resolution % 2 ** (levels - 1):
            raise ValueError(f"resolution={self.resolution} must be a positive multiple of 2^(levels - 1) = "
                             f"{2 ** (levels - 1)} for widths={tuple(self.widths)}.")
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks={self.num_blocks} must be >= 1.")
        valid = [self.resolution // 2**i for i in range(levels)]
        if any(r not in valid for r in self.attention_resolutions):
            raise ValueError(f"attention_resolutions={tuple(self.attention_resolutions)}: each must be one of the "
                             f"U-Net's resolutions {valid}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1).")
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data={self.sigma_data} must be > 0.")
        if not self.sigma_min > 0:
            raise ValueError(f"sigma_min={self.sigma_min} must be > 0.")
        if self.parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"parameterisation={self.parameterisation!r}; valid: {list(PARAMETERISATIONS)}.")
        if self.num_classes < 0 or self.channels < 1:
            raise ValueError(f"num_classes={self.num_classes} must be >= 0 and channels={self.channels} >= 1.")

    def coefficients(self, sigma: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(c_skip, c_out, c_in, c_noise) of the model's parameterisation at `sigma`."""
        return coefficients(self.parameterisation, sigma, self.sigma_data, self.sigma_min)

    @nn.compact
    def __call__(self, x: jax.Array, sigma: jax.Array, labels: jax.Array | None = None, *, train: bool = False,
                 return_features: bool = False):
        """D(x; sigma) (module docstring): x (B, R, R, C), sigma (B,) or a scalar, labels (B,) when conditional."""
        self.check()
        shape = (self.resolution, self.resolution, self.channels)
        if x.ndim != 4 or x.shape[1:] != shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, shape))}), got {x.shape}.")
        if (labels is None) != (self.num_classes == 0):
            raise ValueError(f"labels must be given exactly when num_classes > 0 (num_classes={self.num_classes}).")
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (x.shape[0],))
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        expand = lambda c: c[:, None, None, None]
        x = x.astype(jnp.float32)
        f, features = UNet(self.channels, self.num_classes, tuple(self.widths), self.num_blocks,
                           tuple(self.attention_resolutions), self.dropout, self.dtype, name="net")(
            expand(c_in) * x, c_noise, labels, train)
        denoised = expand(c_skip) * x + expand(c_out) * f
        return (denoised, features) if return_features else denoised


def coefficients(parameterisation: str, sigma: jax.Array, sigma_data: float, sigma_min: float
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(c_skip, c_out, c_in, c_noise) at `sigma` of a denoiser ("edm": `preconditioning`) or a consistency function
    ("consistency": `consistency_preconditioning`); every denoiser family's `coefficients` method."""
    if parameterisation == "consistency":
        return consistency_preconditioning(sigma, sigma_data, sigma_min)
    return preconditioning(sigma, sigma_data)


def consistency_preconditioning(sigma: jax.Array, sigma_data: float, sigma_min: float
                                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The consistency-model (c_skip, c_out, c_in, c_noise) (Song, Dhariwal, Chen & Sutskever 2023, appendix C) at
    noise levels `sigma` >= sigma_min, in float32:

        c_skip = s_d^2 / ((sigma - sigma_min)^2 + s_d^2),  c_out = s_d (sigma - sigma_min) / sqrt(s_d^2 + sigma^2),

    c_in and c_noise as EDM's (`preconditioning`). c_skip(sigma_min) = 1 and c_out(sigma_min) = 0, so f(x; sigma_min)
    = x whatever the network outputs: the consistency function's boundary condition."""
    sigma = jnp.asarray(sigma, jnp.float32)
    _, _, c_in, c_noise = preconditioning(sigma, sigma_data)
    shifted = sigma - sigma_min
    c_skip = sigma_data**2 / (shifted**2 + sigma_data**2)
    c_out = sigma_data * shifted * jax.lax.rsqrt(sigma_data**2 + sigma**2)
    return c_skip, c_out, c_in, c_noise


class OneStepGenerator(nn.Module):
    """A one-step generator made of an EDM U-Net denoiser (DMD's generator: Yin et al. 2023, 2024):

        G(z) = D(sigma_init z; sigma_init),   z (B, R R C) ~ N(0, I) reshaped to (B, R, R, C),

    the denoiser's one-step estimate of a clean image from pure noise at level `sigma_init` (EDM's sigma_max). Its
    parameters are {"denoiser": the EDMUNet's}, so it starts from a denoiser teacher's weights (`from_denoiser`),
    as DMD starts its generator. z_dim = R R C. The output is not squashed (a denoiser's estimate is about in [-1,
    1]); samplers and judges clip it. `__call__(z, labels=None, *, train=False, return_features=False)` follows the
    generator interface (`interface.GeneratorSpec`); features are the U-Net's ("mid", f"dec{r}")."""

    resolution: int = 32  # from the data
    channels: int = 1  # from the data
    num_classes: int = 0  # from the data when conditional
    sigma_data: float = 0.5
    widths: tuple[int, ...] = (32, 64, 64)
    num_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8,)
    dropout: float = 0.0
    sigma_init: float = 80.0  # the noise level the latent is scaled to and the denoiser is called at
    dtype: Any = jnp.float32

    KIND: ClassVar[str] = "generator"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"resolution": "resolution", "channels": "channels",
                                             "num_classes": "num_classes"}
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def spec(self) -> GeneratorSpec:
        return GeneratorSpec(self.resolution * self.resolution * self.channels, self.num_classes, self.resolution,
                             self.channels)

    def denoiser_fields(self) -> dict[str, Any]:
        """The fields of the U-Net inside (an `EDMUNet`; its variables are this model's params["denoiser"])."""
        return dict(resolution=self.resolution, channels=self.channels, num_classes=self.num_classes,
                    sigma_data=self.sigma_data, widths=tuple(self.widths), num_blocks=self.num_blocks,
                    attention_resolutions=tuple(self.attention_resolutions), dropout=self.dropout, dtype=self.dtype)

    def check(self) -> None:
        if not self.sigma_init > 0:
            raise ValueError(f"sigma_init={self.sigma_init} must be > 0.")
        EDMUNet(**self.denoiser_fields()).check()

    @nn.compact
    def __call__(self, z: jax.Array, labels: jax.Array | None = None, *, train: bool = False,
                 return_features: bool = False):
        """G(z) (class docstring)."""
        self.check()
        shape = (self.resolution, self.resolution, self.channels)
        if z.ndim != 2 or z.shape[1] != self.spec.z_dim:
            raise ValueError(f"z must have shape (B, {self.spec.z_dim}), got {z.shape}.")
        x = self.sigma_init * z.astype(jnp.float32).reshape(z.shape[0], *shape)
        sigma = jnp.full((z.shape[0],), self.sigma_init, jnp.float32)
        return EDMUNet(**self.denoiser_fields(), name="denoiser")(x, sigma, labels, train=train,
                                                                  return_features=return_features)


def one_step_kwargs(denoiser_kwargs: dict[str, Any], sigma_init: float) -> dict[str, Any]:
    """The `OneStepGenerator` fields of an `EDMUNet` with fields `denoiser_kwargs` (e.g. a teacher bundle's
    kwargs), its parameterisation fields dropped."""
    fields = {f.name for f in dataclasses.fields(OneStepGenerator)} - {"parent", "name"}
    return {**{k: v for k, v in denoiser_kwargs.items() if k in fields}, "sigma_init": sigma_init}


def from_denoiser(denoiser_params: Any) -> Any:
    """A `OneStepGenerator`'s params from its EDMUNet's: {"denoiser": params}."""
    return {"denoiser": denoiser_params}


class RealismHead(nn.Module):
    """DMD2's realism classifier head (Yin et al. 2024, their `cls_pred_branch`) on a denoiser's middle map h (B, r,
    r, C) (the "mid" feature of `EDMUNet`, the fake denoiser's bottleneck):

        conv 4x4 stride 2 ("same": to ceil(r/2)) -> GroupNorm -> SiLU -> conv ceil(r/2) x ceil(r/2) (valid: to 1 x 1)
        -> GroupNorm -> SiLU -> Dense(1),

    `features` channels throughout (0: C), GroupNorm groups as EDM's (`norm_groups`); returns the logits (B,) in
    float32 that an image is real. (DMD2's head for 8 x 8 maps is the same with a 4x4 stride-4 second conv.)"""

    features: int = 0

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        channels = self.features or h.shape[-1]
        h = nn.Conv(channels, (4, 4), strides=(2, 2), padding="SAME", name="down")(h.astype(jnp.float32))
        h = nn.silu(nn.GroupNorm(num_groups=norm_groups(channels), name="norm0")(h))
        h = nn.Conv(channels, h.shape[1:3], padding="VALID", name="pool")(h)
        h = nn.silu(nn.GroupNorm(num_groups=norm_groups(channels), name="norm1")(h))
        return nn.Dense(1, name="logit")(h.reshape(h.shape[0], -1))[:, 0]
