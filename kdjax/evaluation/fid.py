"""Frechet distance (FID) and kernel distance (KID) between two sets of features.

Both are computed on host in float64 from feature arrays (N, D): the features of real and generated
images under one extractor (the judge classifier, or InceptionV3 pool features for the FID of papers).

- FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to the two sets,
  ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)). Biased upwards at small N (the bias falls roughly as
  1/N), so FIDs are comparable only at equal N; `fid` warns below `SMALL_N` real samples.
- KID (Binkowski et al. 2018): the unbiased estimate of the squared MMD with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets. Unbiased at any N, so usable on small sets.

The matrix square root: only its trace is needed, Tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i), where
lambda_i are the eigenvalues of S1 S2, which equal those of the symmetric PSD matrix
M = S1^(1/2) S2 S1^(1/2) (similar matrices). We take S1^(1/2) and the eigenvalues of M with `eigh`, the
symmetric eigensolver: the result is real by construction (no imaginary residue to discard), it needs no
eps offset when a covariance is singular (N < D, or dead features), since eigenvalues only get clipped at
zero, and it is several times faster than `scipy.linalg.sqrtm`'s Schur method at D = 2048. Tests check it
against `sqrtm` and against closed forms.
"""

from __future__ import annotations

import warnings
from typing import Union

import numpy as np

# Below this many real samples FID is noticeably biased (and the 2048-d Inception covariance is singular).
SMALL_N = 2048


def check_finite_rows(x: np.ndarray, name: str) -> None:
    """Raises ValueError naming the set and how many of its (N, D) feature rows hold NaN or inf.

    One such row makes a mean and covariance NaN (FID: a LinAlgError from the eigensolver) or a kernel sum
    NaN (KID), so non-finite features are refused rather than turned into a number.
    """
    bad = int(np.count_nonzero(~np.isfinite(x).all(axis=1)))
    if bad:
        raise ValueError(f"{name} features: {bad} of {x.shape[0]} rows hold NaN or inf (a diverged generator, or "
                         "a broken feature extractor); metrics need finite features.")


class FeatureStats:
    """Streaming first and second moments of features, accumulated in float64.

    Keeps the count, the sum and the sum of outer products of the features minus a shift (the mean of the
    first batch), which avoids the cancellation of E[x x^T] - mu mu^T when features have a large mean.

    Usage: `stats = FeatureStats(); for f in batches: stats.update(f)`, then `stats.mean`, `stats.cov`.
    `name` ("real", "fake") names the set in errors; a batch with NaN or inf rows raises ValueError.
    """

    def __init__(self, name: str = "the") -> None:
        self.name = name
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._sum_outer: np.ndarray | None = None

    @classmethod
    def from_features(cls, feats: np.ndarray, name: str = "the") -> "FeatureStats":
        """Statistics of a whole (N, D) array at once."""
        return cls(name).update(feats)

    def update(self, feats: np.ndarray) -> "FeatureStats":
        """Adds a batch of features (B, ...) (flattened to (B, D)); returns self."""
        x = np.asarray(feats, dtype=np.float64)
        x = x.reshape(x.shape[0], -1)
        if x.shape[0] == 0:
            return self
        check_finite_rows(x, self.name)
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros(x.shape[1])
            self._sum_outer = np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != self._shift.shape[0]:
            raise ValueError(f"Feature dimension {x.shape[1]} != {self._shift.shape[0]} of earlier batches.")
        xc = x - self._shift
        self._sum += xc.sum(axis=0)
        self._sum_outer += xc.T @ xc
        self.count += x.shape[0]
        return self

    @property
    def dim(self) -> int:
        if self._shift is None:
            raise ValueError("FeatureStats is empty.")
        return int(self._shift.shape[0])

    @property
    def mean(self) -> np.ndarray:
        """The sample mean, (D,)."""
        if self.count == 0:
            raise ValueError("FeatureStats is empty.")
        return self._shift + self._sum / self.count

    @property
    def cov(self) -> np.ndarray:
        """The unbiased sample covariance (divisor N - 1, as `np.cov` and pytorch-fid), (D, D)."""
        if self.count < 2:
            raise ValueError(f"A covariance needs at least 2 samples, got {self.count}.")
        cov = (self._sum_outer - np.outer(self._sum, self._sum) / self.count) / (self.count - 1)
        return (cov + cov.T) / 2


def _clip_psd(w: np.ndarray, what: str) -> np.ndarray:
    """Eigenvalues of a matrix that should be PSD: clips round-off negatives to 0, raises on real ones."""
    tol = 1e-6 * max(float(np.abs(w).max(initial=0.0)), 1e-300)
    if w.min(initial=0.0) < -tol:
        raise ValueError(f"{what} is not positive semi-definite (smallest eigenvalue {w.min():.3g}).")
    return np.clip(w, 0.0, None)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Frechet distance between two Gaussians.

    Tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S1^(1/2) S2 S1^(1/2) (see the module docstring). All in float64.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"Shape mismatch: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}.")
    for name, value in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} holds NaN or inf; the Frechet distance needs finite statistics.")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w1, v1 = np.linalg.eigh(s1)
    sqrt_s1 = (v1 * np.sqrt(_clip_psd(w1, "sigma1"))) @ v1.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(_clip_psd(w, "sigma2 (via S1^(1/2) S2 S1^(1/2))")).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


FeaturesOrStats = Union[np.ndarray, FeatureStats]


def _as_stats(x: FeaturesOrStats, name: str) -> FeatureStats:
    return x if isinstance(x, FeatureStats) else FeatureStats.from_features(x, name)


def _warn_small(num_real: int, dim: int, what: str) -> None:
    if num_real < SMALL_N:
        warnings.warn(
            f"{what} on only {num_real} real samples (< {SMALL_N}; feature dim {dim}): FID is biased upwards "
            "at small N and comparable only between evaluations with the same N; prefer KID for small sets.",
            UserWarning, stacklevel=3)


def fid(real: FeaturesOrStats, fake: FeaturesOrStats) -> dict[str, float | int]:
    """FID between real and generated features.

    Args:
      real: real-image features (N, D), or their `FeatureStats`.
      fake: generated-image features (M, D), or their `FeatureStats`.

    Returns:
      {"fid": float, "num_real": N, "num_fake": M}. Warns (UserWarning) when N < `SMALL_N`.
    Raises:
      ValueError: a set holds NaN or inf features (naming the set and how many rows).
    """
    sr, sf = _as_stats(real, "real"), _as_stats(fake, "fake")
    if sr.dim != sf.dim:
        raise ValueError(f"Feature dimensions differ: real {sr.dim}, fake {sf.dim}.")
    _warn_small(sr.count, sr.dim, "FID")
    value = frechet_distance(sr.mean, sr.cov, sf.mean, sf.cov)
    return {"fid": value, "num_real": sr.count, "num_fake": sf.count}


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3 for all pairs of rows: (n, d), (m, d) -> (n, m)."""
    t = x @ y.T / x.shape[1] + 1.0
    return t * t * t  # much faster than t ** 3 (a general power) in numpy


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel between two samples of equal size m.

    sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
      - 2 sum_{i,j} k(x_i, y_j) / m^2.
    """
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise ValueError(f"Need two samples of equal size >= 2, got {x.shape[0]} and {y.shape[0]}.")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    off = m * (m - 1)
    return float((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2.0 * kxy.mean())


def kid(real: np.ndarray, fake: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> dict[str, float | int]:
    """KID: unbiased MMD^2 (cubic polynomial kernel) averaged over random subsets, in float64.

    Each subset draws min(subset_size, N, M) real and as many generated samples without replacement.

    Args:
      real: real-image features (N, D).
      fake: generated-image features (M, D).
      num_subsets: number of subsets averaged.
      subset_size: samples per subset (capped at min(N, M)).
      seed: seed of the subset draws.

    Returns:
      {"kid_mean", "kid_std" (std over subsets, ddof=0 as torch-fidelity; not a standard error),
       "num_real", "num_fake", "subset_size", "num_subsets"}.
    Raises:
      ValueError: a set holds NaN or inf features (naming the set and how many rows).
    """
    x = np.asarray(real, np.float64).reshape(len(real), -1)
    y = np.asarray(fake, np.float64).reshape(len(fake), -1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"Feature dimensions differ: real {x.shape[1]}, fake {y.shape[1]}.")
    check_finite_rows(x, "real")
    check_finite_rows(y, "fake")
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x)} real and {len(y)} fake.")
    rng = np.random.default_rng(seed)
    values = np.array([
        mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
        for _ in range(num_subsets)])
    return {"kid_mean": float(values.mean()), "kid_std": float(values.std()), "num_real": len(x),
            "num_fake": len(y), "subset_size": size, "num_subsets": num_subsets}
