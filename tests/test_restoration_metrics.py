"""Restoration metrics (Y channel, shaved border) against scikit-image on a real photograph."""

import numpy as np
import pytest
import skimage.color
import skimage.data
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from kdjax.core.images import to_model_range
from kdjax.evaluation import restoration


def _bicubic_x2_round_trip(img: np.ndarray) -> np.ndarray:
    """A synthetic super-resolution result: PIL bicubic /2 then x2."""
    h, w = img.shape[:2]
    pil = Image.fromarray(img)
    return np.asarray(pil.resize((w // 2, h // 2), Image.BICUBIC).resize((w, h), Image.BICUBIC))


def _skimage_y(img: np.ndarray) -> np.ndarray:
    return skimage.color.rgb2ycbcr(img)[..., 0]  # uint8 in, Y in [16, 235] out


def test_rgb_to_y_matches_skimage_and_matlab_constants():
    img = skimage.data.astronaut()[::16, ::16]
    np.testing.assert_allclose(restoration.rgb_to_y(img.astype(np.float64))[..., 0], _skimage_y(img), atol=1e-9)
    corners = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.float64)
    np.testing.assert_allclose(restoration.rgb_to_y(corners)[:, 0], [16.0, 235.0, 81.481, 144.553, 40.966])


def test_shave():
    x = np.arange(2 * 7 * 9 * 3).reshape(2, 7, 9, 3)
    np.testing.assert_array_equal(restoration.shave(x, 2), x[:, 2:5, 2:7])
    np.testing.assert_array_equal(restoration.shave(x, 0), x)
    with pytest.raises(ValueError, match="shave 4 leaves nothing of a 7 x 9 image"):
        restoration.shave(x, 4)


def test_y_channel_metrics_match_skimage_on_a_photograph():
    target = np.stack([skimage.data.astronaut()[80:176, 160:256], skimage.data.astronaut()[300:396, 200:296]])
    pred = np.stack([_bicubic_x2_round_trip(t) for t in target])
    got = restoration.restoration_metrics(to_model_range(pred), to_model_range(target), shave=2)
    for i in range(2):
        y_pred, y_target = (_skimage_y(t)[2:-2, 2:-2] for t in (pred[i], target[i]))
        want_psnr = peak_signal_noise_ratio(y_target, y_pred, data_range=255)
        want_ssim = structural_similarity(y_target, y_pred, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=255)
        assert got["psnr"][i] == pytest.approx(want_psnr, abs=1e-3)
        assert got["ssim"][i] == pytest.approx(want_ssim, abs=1e-4)
        assert 20 < want_psnr < 40 and want_ssim < 0.95  # the degradation is real
    rgb = restoration.restoration_metrics(to_model_range(pred), to_model_range(target), shave=2, y_channel=False)
    want = peak_signal_noise_ratio(target[0, 2:-2, 2:-2], pred[0, 2:-2, 2:-2], data_range=255)
    assert rgb["psnr"][0] == pytest.approx(want, abs=1e-3) and rgb["psnr"][0] != pytest.approx(got["psnr"][0], abs=0.1)


def test_grey_images_and_quantisation():
    # Same shapes as above (two 96 x 96 crops, shave 2), so no new compilation.
    target = np.stack([skimage.data.camera()[100:196, 200:296], skimage.data.camera()[300:396, 100:196]])
    pred = np.stack([_bicubic_x2_round_trip(t) for t in target])
    # Off-grid model outputs are measured as the 8-bit image they would be saved as.
    off_grid = to_model_range(pred)[..., None] + np.float32(0.3 / 127.5)
    got = restoration.restoration_metrics(off_grid, to_model_range(target)[..., None], shave=2)
    for i in range(2):
        want = peak_signal_noise_ratio(target[i, 2:-2, 2:-2], pred[i, 2:-2, 2:-2], data_range=255)
        assert got["psnr"][i] == pytest.approx(want, abs=1e-3)
    with pytest.raises(ValueError, match="equal shape"):
        restoration.restoration_metrics(off_grid, off_grid[:, :32])
