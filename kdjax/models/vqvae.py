"""VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning"), codebook learnt by EMA.

An encoder maps images (B, R, R, C) in [-1, 1] to vectors z_e (B, h, h, D), h = R / 2^downsamples; each
vector is replaced by its nearest codebook entry e_k (squared Euclidean distance), giving integer codes
(B, h, h) in 0 .. K-1 and z_q; a decoder maps z_q back to images. Training (`kdjax.steps.vqvae`) passes
the reconstruction's gradient to the encoder straight through the quantiser (`straight_through`), adds the
commitment term beta * ||z_e - sg(z_q)||^2, and moves the codebook by exponential moving averages of the
vectors assigned to each code (`ema_codebook_update`; van den Oord et al. 2017, appendix A.1), not by
gradient: the codebook lives in the `vq` collection, as model state.

Methods (`model.apply(variables, x, method=...)`): `encode` (images -> z_e), `quantize` (z_e -> codes,
z_q), `decode` (z_q -> images), `decode_codes` (codes -> images); `__call__` runs them all.
A PixelCNN over the codes (levels = K) is the prior whose samples `decode_codes` turns into images.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.interface import AutoencoderSpec


def nearest_code(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """argmin_k ||z - e_k||^2 for every vector z (..., D) against the codebook (K, D): integer codes (...)."""
    z = z.astype(jnp.float32)
    d2 = (jnp.sum(z * z, axis=-1, keepdims=True) - 2.0 * z @ codebook.T
          + jnp.sum(codebook * codebook, axis=-1))
    return jnp.argmin(d2, axis=-1).astype(jnp.int32)


def straight_through(z_e: jax.Array, z_q: jax.Array) -> jax.Array:
    """z_e + sg(z_q - z_e): the value of z_q, the gradient of z_e (the straight-through estimator)."""
    return z_e + jax.lax.stop_gradient(z_q - z_e)


def ema_codebook_update(vq: dict[str, jax.Array], counts: jax.Array, sums: jax.Array, decay: float,
                        eps: float = 1e-5) -> dict[str, jax.Array]:
    """One EMA step of the codebook from this batch's assignments (van den Oord et al. 2017, A.1).

    N_k <- decay * N_k + (1 - decay) * n_k,   m_k <- decay * m_k + (1 - decay) * sum_{i: code_i = k} z_i,
    e_k = m_k / N~_k with N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j (Laplace smoothing, so an
    unused code keeps a finite entry). `counts` n (K,) and `sums` (K, D) are over the whole global batch
    (psum them across devices first). `vq` holds "codebook" (K, D), "cluster_size" (K,), "embed_sum" (K, D).
    """
    size = decay * vq["cluster_size"] + (1.0 - decay) * counts
    embed_sum = decay * vq["embed_sum"] + (1.0 - decay) * sums
    total = jnp.sum(size)
    smoothed = (size + eps) / (total + size.shape[0] * eps) * total
    return {"codebook": embed_sum / smoothed[:, None], "cluster_size": size, "embed_sum": embed_sum}


def assignment_stats(z_e: jax.Array, codes: jax.Array, num_codes: int) -> tuple[jax.Array, jax.Array]:
    """(n_k, sum of the z_e assigned to k) over every vector of a batch: ((K,), (K, D))."""
    onehot = jax.nn.one_hot(codes.reshape(-1), num_codes, dtype=jnp.float32)
    flat = z_e.reshape(-1, z_e.shape[-1]).astype(jnp.float32)
    return jnp.sum(onehot, axis=0), onehot.T @ flat


class ResBlock(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Conv(self.features, (3, 3), dtype=self.dtype)(nn.relu(x))
        return x + nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype)(nn.relu(h))


class VQVAE(nn.Module):
    """images (B, R, R, C) in [-1, 1] -> {"reconstruction", "z_e", "z_q", "codes"}; codes (B, h, h) in 0..K-1."""

    resolution: int = 32
    channels: int = 1
    num_codes: int = 64  # K, the codebook size (the prior's levels)
    code_dim: int = 16  # D
    features: int = 64
    downsamples: int = 2  # stride-2 convolutions: h = resolution / 2^downsamples
    res_blocks: int = 2
    dtype: Any = jnp.float32  # compute dtype; the codebook, distances and outputs are float32

    KIND: ClassVar[str] = "autoencoder"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"resolution": "resolution", "channels": "channels"}
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def spec(self) -> AutoencoderSpec:
        return AutoencoderSpec(self.resolution, self.channels, self.resolution >> self.downsamples, self.num_codes)

    def setup(self):
        if self.resolution % (2 ** self.downsamples):
            raise ValueError(f"resolution={self.resolution} must be divisible by 2^downsamples="
                             f"{2 ** self.downsamples}.")
        f, d = self.features, self.dtype
        widths = [max(f // 2 ** (self.downsamples - 1 - i), 8) for i in range(self.downsamples)]
        self.enc_down = [nn.Conv(w, (4, 4), strides=(2, 2), dtype=d) for w in widths]
        self.enc_mid = nn.Conv(f, (3, 3), dtype=d)
        self.enc_res = [ResBlock(f // 2, dtype=d) for _ in range(self.res_blocks)]
        self.enc_out = nn.Conv(self.code_dim, (1, 1), dtype=d)
        self.dec_in = nn.Conv(f, (3, 3), dtype=d)
        self.dec_res = [ResBlock(f // 2, dtype=d) for _ in range(self.res_blocks)]
        self.dec_up = [nn.ConvTranspose(w, (4, 4), strides=(2, 2), dtype=d) for w in reversed(widths[:-1])]
        self.dec_out = nn.ConvTranspose(self.channels, (4, 4), strides=(2, 2), dtype=d)
        init = lambda k: jax.random.normal(k, (self.num_codes, self.code_dim))
        key = self.make_rng("params") if self.is_initializing() else None
        self.codebook = self.variable("vq", "codebook", init, key)
        self.cluster_size = self.variable("vq", "cluster_size", jnp.ones, (self.num_codes,))
        self.embed_sum = self.variable("vq", "embed_sum", lambda: self.codebook.value)

    def encode(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.channels:
            raise ValueError(f"x must be (B, H, W, {self.channels}), got {x.shape}.")
        h = x.astype(self.dtype)
        for conv in self.enc_down:
            h = nn.relu(conv(h))
        h = self.enc_mid(h)
        for block in self.enc_res:
            h = block(h)
        return self.enc_out(nn.relu(h)).astype(jnp.float32)

    def quantize(self, z_e: jax.Array) -> tuple[jax.Array, jax.Array]:
        codes = nearest_code(z_e, self.codebook.value)
        return codes, jnp.take(self.codebook.value, codes, axis=0)

    def decode(self, z_q: jax.Array) -> jax.Array:
        h = self.dec_in(z_q.astype(self.dtype))
        for block in self.dec_res:
            h = block(h)
        h = nn.relu(h)
        for up in self.dec_up:
            h = nn.relu(up(h))
        return self.dec_out(h).astype(jnp.float32)

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        return self.decode(jnp.take(self.codebook.value, codes, axis=0))

    def __call__(self, x: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        del train  # no train-only layers; the codebook's EMA update is the train step's
        z_e = self.encode(x)
        codes, z_q = self.quantize(z_e)
        return {"reconstruction": self.decode(straight_through(z_e, z_q)), "z_e": z_e, "z_q": z_q, "codes": codes}
