"""PSNR/SSIM against scikit-image on real photographs; L1, perceptual distance and diversity against numpy."""

import numpy as np
import pytest
import scipy.ndimage
import skimage.data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from kdjax.evaluation import diversity as diversity_lib
from kdjax.evaluation import fidelity


def _photo(name):
    img = getattr(skimage.data, name)().astype(np.float64) / 255.0
    return img[..., None] if img.ndim == 2 else img  # camera is grayscale


def _degraded(img, rng):
    noisy = np.clip(img + rng.normal(0.0, 0.1, img.shape), 0.0, 1.0)
    blurred = scipy.ndimage.gaussian_filter(img, sigma=(2.0, 2.0, 0.0))
    both = np.clip(blurred + rng.normal(0, 0.05, img.shape), 0, 1)
    return {"noise": noisy, "blur": blurred, "noise+blur": both}


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "camera"])
def test_ssim_and_psnr_match_skimage_on_photographs(name):
    rng = np.random.default_rng(0)
    ref = _photo(name)
    variants = _degraded(ref, rng)
    # kdjax images are in [-1, 1]; skimage sees the same images in [0, 1] with data range 1.
    to_model = lambda x: (2.0 * x - 1.0).astype(np.float32)[None]
    for kind, img in variants.items():
        want_ssim = structural_similarity(ref, img, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, channel_axis=-1, data_range=1.0)
        want_psnr = peak_signal_noise_ratio(ref, img, data_range=1.0)
        got_ssim = float(fidelity.ssim(to_model(ref), to_model(img))[0])
        got_psnr = float(fidelity.psnr(to_model(ref), to_model(img))[0])
        assert got_ssim == pytest.approx(want_ssim, abs=1e-3), kind
        assert got_psnr == pytest.approx(want_psnr, abs=1e-3), kind
        assert want_ssim < 0.95  # the degradation is real


def test_batched_metrics_are_per_image():
    rng = np.random.default_rng(1)
    ref = skimage.data.astronaut()[::8, ::8].astype(np.float64) / 255.0  # 64 x 64 x 3
    imgs = np.stack([np.clip(ref + rng.normal(0, s, ref.shape), 0, 1) for s in (0.02, 0.1, 0.3)])
    refs = np.broadcast_to(ref, imgs.shape)
    a, b = (2 * refs - 1).astype(np.float32), (2 * imgs - 1).astype(np.float32)
    ssim = np.asarray(fidelity.ssim(a, b))
    psnr = np.asarray(fidelity.psnr(a, b))
    for i in range(3):
        assert ssim[i] == pytest.approx(structural_similarity(
            ref, imgs[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1,
            data_range=1.0), abs=1e-3)
        assert psnr[i] == pytest.approx(peak_signal_noise_ratio(ref, imgs[i], data_range=1.0), abs=1e-3)
    np.testing.assert_allclose(np.asarray(fidelity.l1(a, b)), np.abs(a - b).mean(axis=(1, 2, 3)), rtol=1e-5)
    assert ssim[0] > ssim[1] > ssim[2]

    out = fidelity.fidelity_metrics(a, b, batch_size=3)
    assert out["num_samples"] == 3
    assert out["ssim"] == pytest.approx(ssim.mean(), abs=1e-6)
    assert out["psnr"] == pytest.approx(psnr.mean(), abs=1e-4)


def test_ssim_rejects_images_smaller_than_the_window():
    x = np.zeros((1, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="11 x 11"):
        fidelity.ssim(x, x)


def _random_feats(rng, b):
    return {"res8": rng.standard_normal((b, 8, 8, 16)).astype(np.float32),
            "res4": rng.standard_normal((b, 4, 4, 32)).astype(np.float32),
            "pool": rng.standard_normal((b, 64)).astype(np.float32)}


def _np_distance(fa, fb):
    """One pair, from the definition: per layer, normalise channels, squared L2 over channels, mean over
    positions; then mean over layers."""
    per_layer = []
    for name in fa:
        a, b = np.asarray(fa[name], np.float64), np.asarray(fb[name], np.float64)
        a = a / (np.linalg.norm(a, axis=-1, keepdims=True) + 1e-10)
        b = b / (np.linalg.norm(b, axis=-1, keepdims=True) + 1e-10)
        per_layer.append(np.mean(np.sum((a - b) ** 2, axis=-1)))
    return np.mean(per_layer)


def test_perceptual_distance_matches_numpy():
    rng = np.random.default_rng(2)
    fa, fb = _random_feats(rng, 4), _random_feats(rng, 4)
    got = np.asarray(fidelity.perceptual_distance(fa, fb))
    want = [_np_distance({k: v[i] for k, v in fa.items()}, {k: v[i] for k, v in fb.items()})
            for i in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.allclose(np.asarray(fidelity.perceptual_distance(fa, fa)), 0.0, atol=1e-6)
    # Invariant to a positive per-position rescaling of the channels (the normalisation).
    scaled = {k: v * 3.0 for k, v in fa.items()}
    assert np.allclose(np.asarray(fidelity.perceptual_distance(fa, scaled)), 0.0, atol=1e-6)

    zeros, halves = np.zeros((4, 16, 16, 3), np.float32), np.full((4, 16, 16, 3), 0.5, np.float32)
    out = fidelity.fidelity_metrics(zeros, halves, fa, fb, batch_size=3)
    assert out["perceptual"] == pytest.approx(np.mean(want), rel=1e-5)
    assert out["l1"] == pytest.approx(0.5, rel=1e-6)


def test_diversity_matches_all_pairs_by_hand():
    rng = np.random.default_rng(3)
    feats = _random_feats(rng, 6)
    want = [_np_distance({k: v[i] for k, v in feats.items()}, {k: v[j] for k, v in feats.items()})
            for i in range(6) for j in range(i + 1, 6)]
    out = diversity_lib.diversity(feats)
    assert out["diversity"] == pytest.approx(np.mean(want), rel=1e-5)
    assert (out["num_samples"], out["num_pairs"]) == (6, 15)


def test_collapsed_batch_has_zero_diversity():
    one = _random_feats(np.random.default_rng(4), 1)
    collapsed = {k: np.repeat(v, 5, axis=0) for k, v in one.items()}
    assert diversity_lib.diversity(collapsed)["diversity"] == pytest.approx(0.0, abs=1e-6)
