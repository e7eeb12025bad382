"""Precision/recall and density/coverage of generated features against real ones.

k-nearest-neighbour manifolds: around each real feature x_i a ball of radius r_i = its distance to its k-th
nearest other real feature (likewise s_j for generated features y_j). With closed balls:

- precision (Kynkaanniemi et al. 2019): fraction of generated y_j inside some real ball (fidelity);
- recall: fraction of real x_i inside some generated ball (how much of the real data is covered);
- density (Naeem et al. 2020): (1 / (k M)) sum_j #{i : y_j in ball(x_i)}; 1 in expectation when the two
  distributions are equal, above 1 when samples crowd into dense real regions;
- coverage (Naeem et al. 2020): fraction of real x_i whose ball contains at least one generated y_j;
  1 - 2^-k (0.875 at k = 3) in expectation for equal distributions of equal size.

Distances are Euclidean, computed on host in float64 in row blocks (block_size x N at a time), so 10k x 10k
sets of 2048-d features need a few hundred MB at most: one pass each over real x real and fake x fake for the
radii, and one pass over real x fake for all four numbers.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


def _blocks(n: int, block_size: int) -> Iterator[slice]:
    for start in range(0, n, block_size):
        yield slice(start, min(start + block_size, n))


def _distances(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of a (n, d) and b (m, d), given their squared norms."""
    d2 = a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(d2, 0.0))


def _as_features(x: np.ndarray, name: str, k: int) -> np.ndarray:
    """(N, D) float64 features; ValueError for N <= k or for rows holding NaN or inf.

    A non-finite row breaks the k-NN balls silently: an inf row's distances are inf or NaN, its ball and
    every comparison with it come out False, and the fractions move (one inf fake row moved precision
    from 0.756 to 0.86 in a review), so such features are refused.
    """
    x = np.asarray(x, np.float64)
    x = x.reshape(x.shape[0], -1)
    if x.shape[0] <= k:
        raise ValueError(f"{name}: need more than k={k} samples, got {x.shape[0]}.")
    bad = int(np.count_nonzero(~np.isfinite(x).all(axis=1)))
    if bad:
        raise ValueError(f"{name} features: {bad} of {x.shape[0]} rows hold NaN or inf (a diverged generator, or "
                         "a broken feature extractor); precision/recall/density/coverage need finite features.")
    return x


def knn_radii(feats: np.ndarray, k: int = 3, block_size: int = 1024) -> np.ndarray:
    """Distance of each row of `feats` (N, D) to its k-th nearest other row, (N,), in float64."""
    x = _as_features(feats, "feats", k)
    sq = np.einsum("ij,ij->i", x, x)
    radii = np.empty(len(x))
    for rows in _blocks(len(x), block_size):
        d = _distances(x[rows], sq[rows], x, sq)
        d[np.arange(d.shape[0]), np.arange(rows.start, rows.stop)] = 0.0  # self, exactly
        # Sorted row: [self (0), 1st, ..., k-th neighbour, ...]; index k is the k-th neighbour.
        radii[rows] = np.partition(d, k, axis=1)[:, k]
    return radii


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 3, block_size: int = 1024) -> dict[str, float | int]:
    """Precision, recall, density and coverage (k-NN balls, k = 3 by default).

    Args:
      real: real features (N, D).
      fake: generated features (M, D).
      k: the neighbour whose distance sets each ball's radius.
      block_size: rows per block of the pairwise distance computation (memory ~ block_size * max(N, M) * 8 B).

    Returns:
      {"precision", "recall", "density", "coverage", "num_real": N, "num_fake": M, "k": k}.
    Raises:
      ValueError: a set holds NaN or inf features (naming the set, real or fake, and how many rows).
    """
    x = _as_features(real, "real", k)
    y = _as_features(fake, "fake", k)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"Feature dimensions differ: real {x.shape[1]}, fake {y.shape[1]}.")
    real_radii = knn_radii(x, k, block_size)
    fake_radii = knn_radii(y, k, block_size)
    x_sq, y_sq = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)

    fake_in_real_ball = np.zeros(len(y), bool)   # precision
    real_balls_per_fake = np.zeros(len(y), np.int64)  # density
    real_in_fake_ball = np.zeros(len(x), bool)   # recall
    real_ball_has_fake = np.zeros(len(x), bool)  # coverage
    for rows in _blocks(len(x), block_size):
        d = _distances(x[rows], x_sq[rows], y, y_sq)  # (b, M)
        inside_real = d <= real_radii[rows, None]
        fake_in_real_ball |= inside_real.any(axis=0)
        real_balls_per_fake += inside_real.sum(axis=0)
        real_ball_has_fake[rows] = inside_real.any(axis=1)
        real_in_fake_ball[rows] = (d <= fake_radii[None, :]).any(axis=1)
    return {
        "precision": float(fake_in_real_ball.mean()),
        "recall": float(real_in_fake_ball.mean()),
        "density": float(real_balls_per_fake.sum() / (k * len(y))),
        "coverage": float(real_ball_has_fake.mean()),
        "num_real": len(x),
        "num_fake": len(y),
        "k": k,
    }
