"""A tiny MLP generator for low-dimensional "images" (a few numbers, e.g. 1x1x2): the one-step student of
distribution-matching distillation (`kdjax.steps.distribution_matching`) on an analytic Gaussian-mixture teacher
(`kdjax.models.gaussian_mixture`), trained in seconds on a CPU. The same conventions as `mlp_denoiser` (and the
generator interface of `interface.GeneratorSpec`):

    G(z) = reshape(Dense(H W C)(SiLU(h_depth))),   h_0 = Dense(width)(z) (+ a learned label embedding),
    h_{i+1} = Dense(width)(SiLU(h_i)),

z (B, z_dim) -> images (B, R, R, C) float32. The output is linear (not squashed by tanh): a diffusion teacher's
data are about in [-1, 1] but not clipped to it (a mixture component's tail crosses it), and a tanh would bias
the one-step samples there.

Not in the model registry (`kdjax.models.REGISTRY`): registering a second-kind "generator" would add it to the
students the GAN and generator-distillation tasks accept; it is used by the distillation step's tests.

`__call__(z, labels=None, *, train=False, return_features=False)`: returns the images, or `(images, {"hidden":
last hidden layer})`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models.interface import GeneratorSpec


class MLPGenerator(nn.Module):
    """The MLP generator (module docstring). Defaults at 1x1x2 from z_dim = 2: 12,802 parameters."""

    z_dim: int = 2  # latent size
    resolution: int = 1  # from the data
    channels: int = 2  # from the data
    num_classes: int = 0  # from the data when conditional; 0 = unconditional
    width: int = 64  # units per hidden layer
    depth: int = 3  # hidden layers after the input layer
    dtype: Any = jnp.float32

    KIND: ClassVar[str] = "generator"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"resolution": "resolution", "channels": "channels",
                                             "num_classes": "num_classes"}
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def spec(self) -> GeneratorSpec:
        return GeneratorSpec(self.z_dim, self.num_classes, self.resolution, self.channels)

    def check(self) -> None:
        """Raises ValueError naming the first field that cannot work."""
        if self.z_dim < 1 or self.width < 1 or self.depth < 0:
            raise ValueError(f"z_dim={self.z_dim} and width={self.width} must be >= 1, depth={self.depth} >= 0.")
        if self.resolution < 1 or self.channels < 1 or self.num_classes < 0:
            raise ValueError(f"resolution={self.resolution} and channels={self.channels} must be >= 1, "
                             f"num_classes={self.num_classes} >= 0.")

    @nn.compact
    def __call__(self, z: jax.Array, labels: jax.Array | None = None, *, train: bool = False,
                 return_features: bool = False):
        """G(z) (module docstring)."""
        del train  # no dropout, no batch statistics
        self.check()
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape (B, {self.z_dim}), got {z.shape}.")
        if (labels is None) != (self.num_classes == 0):
            raise ValueError(f"labels must be given exactly when num_classes > 0 (num_classes={self.num_classes}).")
        h = nn.Dense(self.width, dtype=self.dtype, name="in")(z.astype(jnp.float32))
        if self.num_classes:
            h = h + nn.Embed(self.num_classes, self.width, name="label_embed")(labels).astype(h.dtype)
        for i in range(self.depth):
            h = nn.Dense(self.width, dtype=self.dtype, name=f"hidden{i}")(nn.silu(h))
        out = nn.Dense(self.resolution * self.resolution * self.channels, dtype=self.dtype, name="out")(nn.silu(h))
        images = out.astype(jnp.float32).reshape(z.shape[0], self.resolution, self.resolution, self.channels)
        return (images, {"hidden": h}) if return_features else images
