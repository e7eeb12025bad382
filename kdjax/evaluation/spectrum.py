"""Signal preservation: radially averaged power spectra of images, their distance, and a plot.

Generators differ most visibly in their high frequencies (upsampling artefacts, missing fine detail; Durall
et al. 2020), which FID barely sees. The spectrum of a batch (B, H, W, C):

  P(r) = mean over images, channels and frequencies (u, v) with round(sqrt(u^2 + v^2)) = r of
         |FFT2(x - mean(x))(u, v)|^2 / (H W),

with u, v integer frequencies in cycles per image (so r = 1 is one cycle across the image, r = H/2 the
Nyquist frequency of a square image); bins r = 0 .. min(H, W) // 2 (the corners beyond Nyquist are left out).
The per-image, per-channel mean is removed first, so the DC bin is ~0 and carries no information.
Dividing by H W makes sum_{u,v} |FFT|^2 / (H W) the image's energy (Parseval). Computed on host in float64.
"""

from __future__ import annotations

import pathlib
from typing import Mapping

import numpy as np


def _radius_bins(h: int, w: int) -> np.ndarray:
    """Integer radius of every (u, v) of an unshifted FFT2 grid, (H, W)."""
    fy = np.fft.fftfreq(h) * h
    fx = np.fft.fftfreq(w) * w
    return np.rint(np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)).astype(np.int64)


def radial_power_spectrum(images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Radially averaged power spectrum of a batch of NHWC images, (min(H, W) // 2 + 1,), float64.

    Element r is the mean power at integer radius r cycles per image (see the module docstring).
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"Expected NHWC images, got shape {images.shape}.")
    n, h, w, _ = images.shape
    radius = _radius_bins(h, w).ravel()
    num_bins = min(h, w) // 2 + 1
    counts = np.bincount(radius, minlength=num_bins)[:num_bins]
    power_sum = np.zeros((h, w))
    for start in range(0, n, batch_size):
        x = images[start:start + batch_size].astype(np.float64)
        x = x - x.mean(axis=(1, 2), keepdims=True)
        f = np.fft.fft2(x, axes=(1, 2))
        power_sum += (np.abs(f) ** 2).sum(axis=(0, 3))
    power = power_sum / (n * images.shape[3] * h * w)
    return np.bincount(radius, weights=power.ravel(), minlength=num_bins)[:num_bins] / counts


def spectral_distance(spec_a: np.ndarray, spec_b: np.ndarray, floor: float = 1e-20) -> float:
    """Mean over radii r >= 1 of |log10 P_a(r) - log10 P_b(r)|: how many decades apart two spectra are
    on average (0 for equal spectra; 1 if one has 10x the power at every frequency). The DC bin is left
    out (it is ~0 after mean removal); powers are floored at `floor` before the log.
    """
    a, b = np.asarray(spec_a, np.float64), np.asarray(spec_b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"Spectra differ in length: {a.shape} vs {b.shape} (images of different sizes?).")
    la, lb = np.log10(np.maximum(a[1:], floor)), np.log10(np.maximum(b[1:], floor))
    return float(np.mean(np.abs(la - lb)))


def plot_spectra(spectra: Mapping[str, np.ndarray], path: str | pathlib.Path,
                 title: str = "Radially averaged power spectrum") -> pathlib.Path:
    """Writes a PNG of the spectra (log power against radius, DC left out); returns the path.

    Uses matplotlib's object-oriented API with the Agg canvas (no pyplot, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, spec in spectra.items():
        spec = np.asarray(spec)
        ax.semilogy(np.arange(1, len(spec)), spec[1:], label=name)
    ax.set_xlabel("frequency (cycles per image)")
    ax.set_ylabel("power")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
