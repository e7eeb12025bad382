"""Radially averaged power spectrum: known sinusoids, Parseval's amplitude, the distance and the plot."""

import numpy as np
import pytest

from kdjax.evaluation import spectrum


def _sinusoid(size, u, v, amplitude=1.0, phase=0.0):
    """size x size image of amplitude * cos(2 pi (v x + u y) / size + phase): frequency (u, v) in cycles."""
    y, x = np.mgrid[0:size, 0:size]
    return amplitude * np.cos(2 * np.pi * (v * x + u * y) / size + phase)


@pytest.mark.parametrize("u,v,radius", [(0, 5, 5), (7, 0, 7), (3, 4, 5), (6, 8, 10)])
def test_spectrum_of_a_sinusoid_peaks_at_its_frequency(u, v, radius):
    rng = np.random.default_rng(0)
    size, amplitude = 64, 0.8
    # (4, 64, 64, 3): random phases, and constant offsets that the mean removal must take out.
    imgs = np.stack([np.stack([_sinusoid(size, u, v, amplitude, rng.uniform(0, 6)) + rng.uniform(-0.2, 0.2)
                               for _ in range(3)], axis=-1) for _ in range(4)])
    spec = spectrum.radial_power_spectrum(imgs, batch_size=3)
    assert spec.shape == (size // 2 + 1,)
    assert int(np.argmax(spec)) == radius
    # Parseval: a cosine of amplitude A has energy A^2 / 2 per pixel, all of it at radius r, spread over
    # the frequencies of that ring (counted here by brute force).
    ring = sum(1 for fy in range(-32, 32) for fx in range(-32, 32) if round(np.hypot(fy, fx)) == radius)
    assert spec[radius] == pytest.approx(amplitude**2 / 2 * size * size / ring, rel=1e-6)
    others = np.delete(spec, radius)
    assert others.max() < 1e-12 * spec[radius]


def test_white_noise_has_a_flat_spectrum():
    imgs = np.random.default_rng(1).standard_normal((64, 32, 32, 1))
    spec = spectrum.radial_power_spectrum(imgs)
    assert spec[1:] == pytest.approx(np.ones(16), rel=0.15)  # unit variance -> unit power per frequency


def test_spectral_distance():
    spec = spectrum.radial_power_spectrum(np.random.default_rng(2).standard_normal((8, 16, 16, 3)))
    assert spectrum.spectral_distance(spec, spec) == 0.0
    assert spectrum.spectral_distance(spec, 10 * spec) == pytest.approx(1.0)
    assert spectrum.spectral_distance(spec, spec / 100) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="length"):
        spectrum.spectral_distance(spec, spec[:-1])


def test_plot_spectra_writes_a_png(tmp_path):
    rng = np.random.default_rng(3)
    spectra = {"teacher": spectrum.radial_power_spectrum(rng.standard_normal((4, 16, 16, 3))),
               "student": spectrum.radial_power_spectrum(rng.standard_normal((4, 16, 16, 3)) * 0.5)}
    path = spectrum.plot_spectra(spectra, tmp_path / "plots" / "spectra.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
