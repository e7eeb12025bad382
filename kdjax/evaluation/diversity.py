"""Diversity: the mean pairwise perceptual distance within a batch of generated images.

The distance between images i and j is `kdjax.losses.perceptual_distance`: mean over layers of the
position-averaged squared L2 distance between channel-normalised judge feature maps. A collapsed generator
scores ~0; the number is comparable across models only under the same judge, layers and batch size.

All pairs at once through Gram matrices: with n_i = ||f_i||^2 over (H, W, C) of the normalised maps,
||f_i - f_j||^2 = n_i + n_j - 2 <f_i, f_j>, divided by H W. Runs in JAX (accelerator) at full f32 precision.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses import as_maps, normalize_channels


@jax.jit
def pairwise_perceptual_distances(feats: Mapping[str, jax.Array]) -> jax.Array:
    """(B, B) matrix of perceptual distances between all pairs of a batch; zero diagonal.

    Args:
      feats: dict of layer name -> (B, H, W, C) maps (or (B, C) vectors) of one batch of images.
    """
    if not feats:
        raise ValueError("No features given.")
    total = 0.0
    for name in sorted(feats):
        f = normalize_channels(as_maps(feats[name]))
        bsz, h, w, _ = f.shape
        flat = f.reshape(bsz, -1)
        gram = jnp.matmul(flat, flat.T, precision=jax.lax.Precision.HIGHEST)
        sq = jnp.diagonal(gram)
        total = total + jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0) / (h * w)
    d = total / len(feats)
    return d * (1.0 - jnp.eye(d.shape[0], dtype=d.dtype))


def diversity(feats: Mapping[str, jax.Array]) -> dict[str, float | int]:
    """Mean perceptual distance over the B (B - 1) / 2 distinct pairs of a batch of generated images.

    Returns:
      {"diversity": float, "num_samples": B, "num_pairs": B (B - 1) / 2}.
    """
    d = np.asarray(pairwise_perceptual_distances(feats), np.float64)
    bsz = d.shape[0]
    if bsz < 2:
        raise ValueError(f"Diversity needs at least 2 images, got {bsz}.")
    iu = np.triu_indices(bsz, k=1)
    return {"diversity": float(d[iu].mean()), "num_samples": bsz, "num_pairs": len(iu[0])}
