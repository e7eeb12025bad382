"""A convolutional VAE (Kingma & Welling 2014, "Auto-Encoding Variational Bayes") with a KL-regularised latent,
the shape of Stable Diffusion's autoencoder (Rombach et al. 2022) at a small size: the teacher whose decoder
and encoder `kdjax.models.tiny_autoencoder` distils into tiny ones.

- Encoder: a 3x3 conv to widths[0]; at each level l, `res_blocks` residual blocks of widths[l] channels, then
  (except at the last level) a stride-2 3x3 conv to widths[l + 1]; a residual block at the bottom; GroupNorm,
  SiLU and a 3x3 conv to 2 * latent_channels: the posterior's mean and log-variance (B, H / f, W / f,
  latent_channels), f = 2^(len(widths) - 1), the log-variance clipped to `LOGVAR_RANGE` as Stable Diffusion's
  `DiagonalGaussianDistribution` does.
- Decoder: the mirror, a 3x3 conv from the latent to widths[-1], a residual block, then per level from the
  bottom up `res_blocks` residual blocks and (except at level 0) nearest 2x upsampling and a 3x3 conv to the
  next level's width; GroupNorm, SiLU and a 3x3 conv to the image channels. Outputs are not clipped.
- Residual block: x + conv3x3(silu(norm(conv3x3(silu(norm(x)))))), a 1x1 conv on the skip where the width
  changes; norm = GroupNorm with `norm_groups` groups (0: none; per image, so no cross-device statistics).

`__call__(x, *, train=False, eps=None)` returns {"reconstruction", "mean", "logvar", "z"}: z = mean at
evaluation; in training z = mean + exp(logvar / 2) * eps (the reparameterisation), eps ~ N(0, I) given by the
caller (the train step draws it for the whole global batch) or else from the `latent` rng stream. Methods:
`encode` (images -> (mean, logvar)), `decode` (latents -> images), `snap` (a latent onto the latent space: the
identity here). Fully convolutional: H and W any multiples of the factor.

With `num_codes` = K > 0 the latent is vector-quantised instead (VQ-VAE, van den Oord et al. 2017, as
`kdjax.models.vqvae` but in this architecture): the encoder's last conv gives z_e (latent_channels channels, no
log-variance), each vector is replaced by its nearest entry of a K x latent_channels codebook (the `vq`
collection, moved by EMA in the train step `kdjax.steps.vqvae`), and the decoder reads z_q, the gradient passing
z_q straight through to z_e in training. Then `encode` returns (z_q, logvar at its floor: a point mass), `snap`
quantises any latent, and `__call__` returns also "z_e", "z_q" and "codes" (B, h, w) for that step; "mean" and
"z" are z_q.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.interface import LatentAutoencoderSpec
from kdjax.models.vqvae import nearest_code, straight_through

LOGVAR_RANGE = (-30.0, 20.0)  # Stable Diffusion's clamp of the posterior's log-variance
STRIDE2_PADDING = ((1, 1), (1, 1))  # PyTorch's padding=1: a stride-2 3x3 conv halves an even side


def reparameterize(mean: jax.Array, logvar: jax.Array, eps: jax.Array) -> jax.Array:
    """z = mean + exp(logvar / 2) * eps: a draw of N(mean, exp(logvar)) for eps ~ N(0, I), differentiable in
    mean and logvar (Kingma & Welling 2014)."""
    return mean + jnp.exp(0.5 * logvar) * eps


def check_image_input(x: jax.Array, channels: int, factor: int) -> None:
    """x is (B, H, W, channels) with H and W multiples of `factor` (ValueError otherwise)."""
    if x.ndim != 4 or x.shape[-1] != channels or x.shape[1] % factor or x.shape[2] % factor:
        raise ValueError(f"x must be (B, H, W, {channels}) with H and W multiples of {factor}, got {x.shape}.")


def upsample_nearest(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, 2H, 2W, C), each pixel repeated 2 x 2 (PyTorch's nn.Upsample(scale_factor=2))."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResBlock(nn.Module):
    """x + conv3x3(silu(norm(conv3x3(silu(norm(x)))))), to `features` channels (a 1x1 conv on the skip when
    the input has another width)."""

    features: int
    norm_groups: int = 0
    dtype: Any = jnp.float32

    def norm(self, x: jax.Array, name: str) -> jax.Array:
        if not self.norm_groups:
            return x
        return nn.GroupNorm(num_groups=self.norm_groups, dtype=self.dtype, name=name)(x)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Conv(self.features, (3, 3), dtype=self.dtype, name="conv1")(nn.silu(self.norm(x, "norm1")))
        h = nn.Conv(self.features, (3, 3), dtype=self.dtype, name="conv2")(nn.silu(self.norm(h, "norm2")))
        if x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


class VAEEncoder(nn.Module):
    """Images (B, H, W, C) -> (mean, logvar), each (B, H / f, W / f, latent_channels) float32; with `moments` = 1
    the one map z_e (a VQ-VAE's)."""

    latent_channels: int
    widths: tuple[int, ...]
    res_blocks: int
    norm_groups: int
    dtype: Any = jnp.float32
    moments: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array] | jax.Array:
        g, d = self.norm_groups, self.dtype
        h = nn.Conv(self.widths[0], (3, 3), dtype=d, name="conv_in")(x.astype(d))
        for level, w in enumerate(self.widths):
            for i in range(self.res_blocks):
                h = ResBlock(w, g, d, name=f"level{level}_block{i}")(h)
            if level < len(self.widths) - 1:
                h = nn.Conv(self.widths[level + 1], (3, 3), strides=(2, 2), padding=STRIDE2_PADDING, dtype=d,
                            name=f"down{level}")(h)
        h = ResBlock(self.widths[-1], g, d, name="mid")(h)
        h = nn.GroupNorm(num_groups=g, dtype=d, name="norm_out")(h) if g else h
        moments = nn.Conv(self.moments * self.latent_channels, (3, 3), dtype=d, name="conv_out")(
            nn.silu(h)).astype(jnp.float32)
        if self.moments == 1:
            return moments
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)


class VAEDecoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> images (B, h f, w f, channels) float32, not clipped."""

    channels: int
    widths: tuple[int, ...]
    res_blocks: int
    norm_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        g, d = self.norm_groups, self.dtype
        h = nn.Conv(self.widths[-1], (3, 3), dtype=d, name="conv_in")(z.astype(d))
        h = ResBlock(self.widths[-1], g, d, name="mid")(h)
        for level in range(len(self.widths) - 1, -1, -1):
            for i in range(self.res_blocks):
                h = ResBlock(self.widths[level], g, d, name=f"level{level}_block{i}")(h)
            if level > 0:
                h = nn.Conv(self.widths[level - 1], (3, 3), dtype=d, name=f"up{level}")(upsample_nearest(h))
        h = nn.GroupNorm(num_groups=g, dtype=d, name="norm_out")(h) if g else h
        return nn.Conv(self.channels, (3, 3), dtype=d, name="conv_out")(nn.silu(h)).astype(jnp.float32)


class VAE(nn.Module):
    """Images (B, H, W, channels) in [-1, 1] -> {"reconstruction", "mean", "logvar", "z"} (module docstring).

    Defaults (RGB, widths (64, 128, 128), factor 4, 4 latent channels): 2.4M parameters.
    """

    channels: int = 3  # the data's
    latent_channels: int = 4
    widths: tuple[int, ...] = (64, 128, 128)  # per level, full resolution first; factor = 2^(len - 1)
    res_blocks: int = 1  # residual blocks per level (encoder and decoder)
    norm_groups: int = 8  # GroupNorm groups (divides every width); 0 = no normalisation
    num_codes: int = 0  # K > 0: a vector-quantised latent with a K-entry codebook (module docstring); 0: KL
    dtype: Any = jnp.float32  # compute dtype; parameters, codebook and outputs are float32

    KIND: ClassVar[str] = "latent_autoencoder"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"channels": "channels"}
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def spec(self) -> LatentAutoencoderSpec:
        return LatentAutoencoderSpec(self.channels, self.latent_channels, 2 ** (len(self.widths) - 1))

    def setup(self):
        if not self.widths or self.latent_channels < 1 or self.res_blocks < 0:
            raise ValueError(f"VAE needs widths (one per level), latent_channels >= 1 and res_blocks >= 0; got "
                             f"widths={self.widths}, latent_channels={self.latent_channels}, "
                             f"res_blocks={self.res_blocks}.")
        if self.norm_groups < 0 or (self.norm_groups and any(w % self.norm_groups for w in self.widths)):
            raise ValueError(f"norm_groups={self.norm_groups} must be 0 or divide every width {self.widths}.")
        if self.num_codes < 0:
            raise ValueError(f"num_codes={self.num_codes} must be >= 0 (0: a KL latent; K > 0: K codes).")
        kw = dict(widths=tuple(self.widths), res_blocks=self.res_blocks, norm_groups=self.norm_groups,
                  dtype=self.dtype)
        self.encoder = VAEEncoder(self.latent_channels, **kw, moments=1 if self.num_codes else 2)
        self.decoder = VAEDecoder(self.channels, **kw)
        if self.num_codes:  # as kdjax.models.vqvae.VQVAE: N(0, I) codes, EMA statistics started at them
            init = lambda k: jax.random.normal(k, (self.num_codes, self.latent_channels))
            key = self.make_rng("params") if self.is_initializing() else None
            self.codebook = self.variable("vq", "codebook", init, key)
            self.cluster_size = self.variable("vq", "cluster_size", jnp.ones, (self.num_codes,))
            self.embed_sum = self.variable("vq", "embed_sum", lambda: self.codebook.value)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, channels) -> the posterior's (mean, logvar), each (B, H / f, W / f, latent_channels);
        quantised: (z_q, the log-variance's floor)."""
        check_image_input(x, self.channels, self.spec.factor)
        if not self.num_codes:
            return self.encoder(x)
        z_q = self.quantize(self.encoder(x))[1]
        return z_q, jnp.full_like(z_q, LOGVAR_RANGE[0])

    def quantize(self, z_e: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(codes (...), z_q): each latent vector's nearest codebook entry (quantised latents only)."""
        if not self.num_codes:
            raise ValueError("quantize: this VAE has a KL latent (num_codes=0), no codebook.")
        codes = nearest_code(z_e, self.codebook.value)
        return codes, jnp.take(self.codebook.value, codes, axis=0)

    def snap(self, z: jax.Array) -> jax.Array:
        """A latent onto the latent space: z itself (KL), its nearest codes' vectors (quantised)."""
        return self.quantize(z)[1] if self.num_codes else z

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents (B, h, w, latent_channels) -> images (B, h f, w f, channels) float32, not clipped."""
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"z must be (B, h, w, {self.latent_channels}), got {z.shape}.")
        return self.decoder(z)

    def __call__(self, x: jax.Array, *, train: bool = False, eps: jax.Array | None = None) -> dict[str, jax.Array]:
        if self.num_codes:  # the codebook's EMA update is the train step's (kdjax.steps.vqvae)
            check_image_input(x, self.channels, self.spec.factor)
            z_e = self.encoder(x)
            codes, z_q = self.quantize(z_e)
            floor = jnp.full_like(z_q, LOGVAR_RANGE[0])
            return {"reconstruction": self.decode(straight_through(z_e, z_q) if train else z_q), "mean": z_q,
                    "logvar": floor, "z": z_q, "z_e": z_e, "z_q": z_q, "codes": codes}
        mean, logvar = self.encode(x)
        if train:
            eps = jax.random.normal(self.make_rng("latent"), mean.shape) if eps is None else eps
            z = reparameterize(mean, logvar, eps)
        else:
            z = mean
        return {"reconstruction": self.decode(z), "mean": mean, "logvar": logvar, "z": z}
