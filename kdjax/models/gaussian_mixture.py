"""An isotropic Gaussian mixture of "images" and its exact denoiser: an analytic diffusion teacher for tests.

The data: y ~ sum_k w_k N(mu_k, s^2 I), images of shape (H, W, C) flattened to d = H W C dimensions (weights w_k
> 0 summing to 1, means mu_k, one common standard deviation s >= 0; s = 0 is a mixture of points). Noised at
level sigma, x = y + sigma n with n ~ N(0, I), so x ~ sum_k w_k N(mu_k, (s^2 + sigma^2) I). Given the component
k, y and x are jointly Gaussian and E[y | x, k] = mu_k + s^2 / (s^2 + sigma^2) (x - mu_k). Hence the exact
(minimum mean-squared-error) denoiser

    D*(x; sigma) = E[y | x] = sum_k r_k(x, sigma) (mu_k + s^2 / (s^2 + sigma^2) (x - mu_k)),

    r_k(x, sigma) = w_k N(x; mu_k, (s^2 + sigma^2) I) / sum_j w_j N(x; mu_j, (s^2 + sigma^2) I)
                  = softmax_k( ln w_k - ||x - mu_k||^2 / (2 (s^2 + sigma^2)) ),

the posterior responsibilities (the Gaussians' normalisers are equal and cancel). By Tweedie's formula the
score of the noised density is grad_x ln p(x; sigma) = (D*(x; sigma) - x) / sigma^2, so D* also gives the exact
probability-flow ODE dx/dsigma = (x - D*(x; sigma)) / sigma that `kdjax.models.diffusion_samplers` integrates:
with D* the samplers' only error is their discretisation. Given a label k (a class-conditional teacher) the
posterior is that component alone: D*(x; sigma | k) = mu_k + s^2 / (s^2 + sigma^2) (x - mu_k).

`GaussianMixture(x, sigma, labels=None)` has the call signature of a denoiser network's `apply` after its
variables (`kdjax.models.edm.EDMUNet`): samplers and distillation steps take either.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """The mixture sum_k w_k N(mu_k, s^2 I) over images of shape `means.shape[1:]` (module docstring)."""

    weights: Any  # (K,) w_k > 0, summing to 1
    means: Any  # (K, H, W, C) mu_k
    std: float  # s >= 0, the common standard deviation of every component

    def __post_init__(self) -> None:
        weights, means = np.asarray(self.weights, np.float64), np.asarray(self.means, np.float64)
        if weights.ndim != 1 or means.ndim != 4 or means.shape[0] != weights.shape[0]:
            raise ValueError(f"weights must be (K,) and means (K, H, W, C); got {weights.shape} and {means.shape}.")
        if np.any(weights <= 0) or abs(weights.sum() - 1.0) > 1e-6:
            raise ValueError(f"weights={weights.tolist()} must be > 0 and sum to 1.")
        if not self.std >= 0:
            raise ValueError(f"std={self.std} must be >= 0.")
        object.__setattr__(self, "weights", weights.astype(np.float32))
        object.__setattr__(self, "means", means.astype(np.float32))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(self.means.shape[1:])

    def responsibilities(self, x: jax.Array, sigma: jax.Array) -> jax.Array:
        """r_k(x, sigma) (module docstring): (B, K) posterior probabilities of the components given x (B, H, W, C)
        at noise levels sigma (B,) or a scalar."""
        x = jnp.asarray(x, jnp.float32)
        variance = self.std**2 + jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (x.shape[0],)) ** 2
        flat, means = x.reshape(x.shape[0], 1, -1), jnp.asarray(self.means).reshape(1, self.means.shape[0], -1)
        logits = jnp.log(jnp.asarray(self.weights))[None] - jnp.sum((flat - means) ** 2, -1) / (2 * variance[:, None])
        return jax.nn.softmax(logits, axis=-1)

    def __call__(self, x: jax.Array, sigma: jax.Array, labels: jax.Array | None = None, *,
                 train: bool = False) -> jax.Array:
        """D*(x; sigma) (module docstring), float32 of x's shape; with labels (B,), D*(x; sigma | k = label).
        `train` is accepted for the network's signature and ignored."""
        del train
        x = jnp.asarray(x, jnp.float32)
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (x.shape[0],))
        shrink = (self.std**2 / (self.std**2 + sigma**2))[:, None, None, None]  # s^2 / (s^2 + sigma^2)
        if labels is None:
            r = self.responsibilities(x, sigma)
            mean = jnp.einsum("bk,khwc->bhwc", r, jnp.asarray(self.means), precision=jax.lax.Precision.HIGHEST)
        else:
            mean = jnp.asarray(self.means)[labels]
        # sum_k r_k (mu_k + shrink (x - mu_k)) = (1 - shrink) sum_k r_k mu_k + shrink x, as sum_k r_k = 1.
        return (1.0 - shrink) * mean + shrink * x

    def sample(self, key: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
        """`count` draws y of the mixture: (images (count, H, W, C) float32, their components (count,) int32)."""
        k_component, k_noise = jax.random.split(key)
        components = jax.random.categorical(k_component, jnp.log(jnp.asarray(self.weights)), shape=(count,))
        noise = jax.random.normal(k_noise, (count, *self.shape), jnp.float32)
        return jnp.asarray(self.means)[components] + self.std * noise, components.astype(jnp.int32)
