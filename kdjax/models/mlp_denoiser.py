"""A tiny MLP denoiser for low-dimensional "images" (a few numbers, e.g. 1x1x2): the student the diffusion
distillation methods are tested with on an analytic Gaussian-mixture teacher (`kdjax.models.gaussian_mixture`), in
seconds on a CPU. The same call shape and preconditioning as `kdjax.models.edm.EDMUNet`:

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)),

with `parameterisation` "edm" (EDM's coefficients, `edm.preconditioning`: a denoiser) or "consistency" (the
consistency model's, `edm.consistency_preconditioning`: c_skip(sigma_min) = 1, c_out(sigma_min) = 0, so the output
f(x; sigma) is a consistency function with f(x; sigma_min) = x). Both have the same parameters, so a consistency
student starts from a denoiser teacher's weights.

F: the flattened c_in x, c_noise and its sinusoidal embedding (`edm.positional_embedding`, `embedding` channels;
plus a learned label embedding when conditional) -> `depth` Dense(`width`) + SiLU layers -> a Dense to the image's
H W C numbers, initialised to zero (so at initialisation D(x; sigma) = c_skip(sigma) x, as EDMUNet).

`__call__(x, sigma, labels=None, *, train=False, return_features=False)` (`interface.DenoiserSpec`): x (B, R, R,
C), sigma (B,) or a scalar; returns D (B, R, R, C) float32, or `(D, {"hidden": last hidden layer})`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import edm
from kdjax.models.interface import DenoiserSpec


class MLPDenoiser(nn.Module):
    """The MLP denoiser (module docstring). Defaults at 1x1x2: 13,890 parameters."""

    resolution: int = 1  # from the data
    channels: int = 2  # from the data
    num_classes: int = 0  # from the data when conditional; 0 = unconditional
    sigma_data: float = 0.5  # the data's standard deviation s_d in the preconditioning
    width: int = 64  # units per hidden layer
    depth: int = 3  # hidden layers
    embedding: int = 16  # channels of the noise level's sinusoidal embedding
    parameterisation: str = "edm"  # "edm" (a denoiser) or "consistency" (a consistency function)
    sigma_min: float = 0.002  # the consistency function's boundary level (parameterisation "consistency")
    dtype: Any = jnp.float32

    KIND: ClassVar[str] = "denoiser"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"resolution": "resolution", "channels": "channels",
                                             "num_classes": "num_classes"}
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def spec(self) -> DenoiserSpec:
        return DenoiserSpec(self.resolution, self.channels, self.num_classes, self.sigma_data)

    def check(self) -> None:
        """Raises ValueError naming the first field that cannot work."""
        if self.parameterisation not in edm.PARAMETERISATIONS:
            raise ValueError(f"parameterisation={self.parameterisation!r}; valid: {list(edm.PARAMETERISATIONS)}.")
        if self.width < 1 or self.depth < 1 or self.embedding < 2 or self.embedding % 2:
            raise ValueError(f"width={self.width} and depth={self.depth} must be >= 1 and embedding="
                             f"{self.embedding} even and >= 2.")
        if not self.sigma_data > 0 or not self.sigma_min > 0:
            raise ValueError(f"sigma_data={self.sigma_data} and sigma_min={self.sigma_min} must be > 0.")
        if self.resolution < 1 or self.channels < 1 or self.num_classes < 0:
            raise ValueError(f"resolution={self.resolution} and channels={self.channels} must be >= 1, "
                             f"num_classes={self.num_classes} >= 0.")

    def coefficients(self, sigma: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(c_skip, c_out, c_in, c_noise) of the model's parameterisation at `sigma`."""
        return edm.coefficients(self.parameterisation, sigma, self.sigma_data, self.sigma_min)

    @nn.compact
    def __call__(self, x: jax.Array, sigma: jax.Array, labels: jax.Array | None = None, *, train: bool = False,
                 return_features: bool = False):
        """D(x; sigma) (module docstring)."""
        del train  # no dropout
        self.check()
        shape = (self.resolution, self.resolution, self.channels)
        if x.ndim != 4 or x.shape[1:] != shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, shape))}), got {x.shape}.")
        if (labels is None) != (self.num_classes == 0):
            raise ValueError(f"labels must be given exactly when num_classes > 0 (num_classes={self.num_classes}).")
        batch = x.shape[0]
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (batch,))
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        x = x.astype(jnp.float32)
        h = jnp.concatenate([c_in[:, None] * x.reshape(batch, -1), c_noise[:, None],
                             edm.positional_embedding(c_noise, self.embedding)], axis=-1)
        h = nn.Dense(self.width, dtype=self.dtype, name="in")(h)
        if self.num_classes:
            h = h + nn.Embed(self.num_classes, self.width, name="label_embed")(labels).astype(h.dtype)
        for i in range(self.depth):
            h = nn.Dense(self.width, dtype=self.dtype, name=f"hidden{i}")(nn.silu(h))
        out = nn.Dense(x[0].size, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="out")(nn.silu(h))
        expand = lambda c: c[:, None, None, None]
        denoised = expand(c_skip) * x + expand(c_out) * out.astype(jnp.float32).reshape(x.shape)
        return (denoised, {"hidden": h}) if return_features else denoised
