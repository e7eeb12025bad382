"""Degradations against independent implementations (PIL, scipy) on real photographs, masks, registry errors."""

import numpy as np
import pytest
import scipy.ndimage
import skimage.data
from PIL import Image

from kdjax.core import degradations
from kdjax.core.images import to_model_range, to_uint8

# 96 x 96 crops of two photographs: the astronaut's face (RGB) and the cameraman (grey).
PHOTOS = {"astronaut": lambda: skimage.data.astronaut()[80:176, 160:256],
          "camera": lambda: skimage.data.camera()[64:160, 192:288][..., None]}


def _pil_resize(img: np.ndarray, size: int) -> np.ndarray:
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    return np.asarray(pil.resize((size, size), Image.BICUBIC)).reshape(size, size, img.shape[-1])


def _levels(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    d = np.abs(a.astype(int) - b.astype(int))
    return int(d.max()), float(d.mean())


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_bicubic_matches_pil(name):
    img = PHOTOS[name]()
    for scale in (2, 3, 4):
        low = _pil_resize(img, 96 // scale)
        ours = to_uint8(degradations.downsample(to_model_range(img)[None], scale))[0]
        # Measured: max 1-2, mean 0.08-0.15 grey levels; PIL rounds to 8 bits between its two passes, we do not.
        max_diff, mean_diff = _levels(ours, low)
        assert max_diff <= 2 and mean_diff < 0.2, (scale, max_diff, mean_diff)
        up = to_uint8(degradations.upsample_bicubic(to_model_range(low)[None], scale))[0]
        max_diff, mean_diff = _levels(up, _pil_resize(low, 96))  # measured: max 1-5, mean 0.08-0.22
        assert max_diff <= 5 and mean_diff < 0.25, (scale, max_diff, mean_diff)


def _pil_fixed_point(img: np.ndarray, weights_h: np.ndarray, weights_w: np.ndarray) -> np.ndarray:
    """PIL's 8-bit path with given weights (Pillow Resample.c): coefficients in 22-bit fixed point rounded away
    from zero, horizontal pass first, each pass rounded half up and clipped to 0..255."""
    def one_pass(x, w, axis):
        k = w * (1 << 22)
        k = np.where(k >= 0, np.trunc(k + 0.5), np.trunc(k - 0.5)).astype(np.int64)
        out = np.moveaxis(np.tensordot(k, x, axes=([1], [axis])), 0, axis)
        return np.clip((out + (1 << 21)) >> 22, 0, 255)

    return one_pass(one_pass(img.astype(np.int64), weights_w, 1), weights_h, 0)


def test_bicubic_weights_are_pils_exactly():
    """Run through PIL's own integer arithmetic, our weights give PIL's output bit for bit."""
    img = PHOTOS["astronaut"]()[:, :80]  # 96 x 80
    for h, w in [(48, 40), (24, 20), (32, 16), (192, 160)]:
        pil = np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))
        ours = _pil_fixed_point(img, degradations.bicubic_weights(96, h), degradations.bicubic_weights(80, w))
        np.testing.assert_array_equal(ours, pil)


def test_bicubic_weights_by_hand():
    # x2 enlargement: output pixel 3 sits at 1.75 in input pixels; Keys (a = -0.5) at distances 1.25, 0.25,
    # 0.75, 1.75 from input pixels 0..3.
    w = degradations.bicubic_weights(6, 12)
    np.testing.assert_allclose(w[3], [-0.0703125, 0.8671875, 0.2265625, -0.0234375, 0, 0], atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    # /4 reduction: the kernel is stretched 4 times (support 8 input pixels a side), symmetric about the centre.
    w = degradations.bicubic_weights(32, 8)
    # Output pixel 3 sits at 14; |j + 0.5 - 14| < 8 for input pixels j = 6..21.
    assert np.count_nonzero(w[3]) == 16 and np.count_nonzero(w[3, 6:22]) == 16
    np.testing.assert_allclose(w[3, 6:22], w[3, 6:22][::-1], atol=1e-12)


def test_downsample_needs_a_dividing_scale():
    with pytest.raises(ValueError, match="scale 3 does not divide the image size 32 x 30"):
        degradations.downsample(np.zeros((1, 32, 30, 1), np.float32), 3)


def test_box_mask_fraction_and_determinism():
    a = degradations.box_mask((16, 64, 64), np.random.default_rng(3))
    assert a.shape == (16, 64, 64, 1) and a.dtype == np.float32 and set(np.unique(a)) == {0.0, 1.0}
    fractions = a.mean(axis=(1, 2, 3))
    assert fractions.min() >= 16 * 16 / 64**2 and fractions.max() <= 32 * 32 / 64**2  # sides 16..32 pixels
    for m in a[..., 0]:  # each is one filled rectangle
        rows, cols = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
        assert m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
    np.testing.assert_array_equal(a, degradations.box_mask((16, 64, 64), np.random.default_rng(3)))
    assert not np.array_equal(a, degradations.box_mask((16, 64, 64), np.random.default_rng(4)))


def test_stroke_mask_fraction_and_determinism():
    a = degradations.stroke_mask((24, 64, 64), np.random.default_rng(0))
    assert a.shape == (24, 64, 64, 1) and set(np.unique(a)) == {0.0, 1.0}
    fractions = a.mean(axis=(1, 2, 3))
    assert (fractions > 0).all() and (fractions < 0.6).all()
    assert 0.08 < fractions.mean() < 0.3  # measured 18% over 300 masks
    assert len({m.tobytes() for m in a}) == 24
    np.testing.assert_array_equal(a, degradations.stroke_mask((24, 64, 64), np.random.default_rng(0)))
    assert not np.array_equal(a, degradations.stroke_mask((24, 64, 64), np.random.default_rng(1)))
    thin = degradations.stroke_mask((24, 64, 64), np.random.default_rng(0), min_width=0.02, max_width=0.02)
    assert thin.mean() < fractions.mean()


def test_apply_mask_and_inpainting_input():
    x = np.array([0.5, -0.25, 1.0, -1.0], np.float32).reshape(1, 2, 2, 1) * np.ones(3, np.float32)
    mask = np.array([1.0, 0.0, 0.0, 1.0], np.float32).reshape(1, 2, 2, 1)
    masked = degradations.apply_mask(x, mask)
    np.testing.assert_array_equal(masked[0, :, :, 0], [[0.0, -0.25], [1.0, 0.0]])
    model_input = degradations.inpainting_input(x, mask)
    assert model_input.shape == (1, 2, 2, 4)
    np.testing.assert_array_equal(model_input[..., :3], masked)
    np.testing.assert_array_equal(model_input[..., 3:], mask)


def test_gaussian_noise_level_and_determinism():
    x = np.zeros((2, 64, 64, 3), np.float32)
    y = degradations.gaussian_noise(x, 25.0, np.random.default_rng(0))
    assert y.dtype == np.float32
    assert abs(y.std() - 2 * 25 / 255) < 0.005 and abs(y.mean()) < 0.005  # sigma 25 grey levels = 0.196
    np.testing.assert_array_equal(y, degradations.gaussian_noise(x, 25.0, np.random.default_rng(0)))
    assert not np.array_equal(y, degradations.gaussian_noise(x, 25.0, np.random.default_rng(1)))
    assert degradations.gaussian_noise(x + 1.0, 25.0, np.random.default_rng(0)).max() == 1.0  # clipped


@pytest.mark.parametrize("sigma", [0.7, 2.0, 4.0])
def test_gaussian_blur_matches_scipy(sigma):
    x = to_model_range(PHOTOS["astronaut"]()[:24, :20])[None].astype(np.float64)  # radius 16 > 10-pixel half-side
    want = scipy.ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0))
    np.testing.assert_allclose(degradations.gaussian_blur(x, sigma), want, atol=1e-6)


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_jpeg_quality_orders_the_error(name):
    img = PHOTOS[name]()
    x = to_model_range(img)[None]
    errors = {}
    for quality in (100, 75, 30, 10):
        y = degradations.jpeg(x, quality)
        assert y.shape == x.shape and y.dtype == np.float32
        errors[quality] = _levels(to_uint8(y), img)[1]
    # Measured mean error (grey levels) at quality 100 / 75 / 30 / 10: astronaut 1.4 / 3.9 / 5.7 / 8.6 (RGB, 4:2:0
    # chroma subsampling), camera 0.1 / 3.1 / 4.8 / 7.4.
    assert errors[100] < 2.0
    assert errors[100] < errors[75] < errors[30] < errors[10]


def test_registry_errors_are_clear():
    with pytest.raises(ValueError, match=r"degradation.name='foo' is not a degradation; valid: \[.*'downsample'"):
        degradations.check_degradation("foo", {}, crop=64)
    with pytest.raises(ValueError, match="scale=3 does not divide the crop size 64"):
        degradations.check_degradation("downsample", {"scale": 3}, crop=64)
    with pytest.raises(ValueError, match=r"scale=5 is not a super-resolution factor; valid: \[2, 3, 4\]"):
        degradations.check_degradation("downsample", {"scale": 5}, crop=60)
    with pytest.raises(ValueError, match=r"\['sigma'\] are not parameters of 'downsample'; valid: \['scale'\]"):
        degradations.check_degradation("downsample", {"sigma": 1.0}, crop=64)
    with pytest.raises(ValueError, match="quality=0 must be an integer in"):
        degradations.check_degradation("jpeg", {"quality": 0}, crop=64)
    with pytest.raises(ValueError, match="min_size=0.6, max_size=0.5 must satisfy"):
        degradations.check_degradation("box_inpainting", {"min_size": 0.6}, crop=64)
    with pytest.raises(ValueError, match="does not divide the crop size 30"):
        degradations.degrade("downsample", np.zeros((1, 32, 30, 1), np.float32), np.random.default_rng(0), scale=4)
    for name in degradations.DEGRADATIONS:  # every default is valid
        degradations.check_degradation(name, {}, crop=64)


def test_degrade_gives_each_models_input():
    x = to_model_range(PHOTOS["astronaut"]()[:64, :64])[None]
    rng = lambda: np.random.default_rng(5)
    assert degradations.degrade("downsample", x, rng(), scale=4).shape == (1, 16, 16, 3)
    for name in ("box_inpainting", "stroke_inpainting"):
        out = degradations.degrade(name, x, rng())
        assert out.shape == (1, 64, 64, 4) and set(np.unique(out[..., 3])) == {0.0, 1.0}
        np.testing.assert_array_equal(out, degradations.degrade(name, x, rng()))
    for name in ("noise", "blur", "jpeg"):
        out = degradations.degrade(name, x, rng())
        assert out.shape == x.shape and out.dtype == np.float32 and not np.array_equal(out, x)
    np.testing.assert_allclose(degradations.degrade("blur", x, rng(), sigma=2.0),
                               scipy.ndimage.gaussian_filter(x, (0, 2.0, 2.0, 0)), atol=1e-6)
