"""The gated PixelCNN: causal in raster and channel order with no blind spot (from its Jacobian), bits/dim and
per-pixel KD against numpy, and ancestral sampling that reproduces a known distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax, softmax

from kdjax import losses
from kdjax.models import build_model
from kdjax.models.pixelcnn import sample, to_model_input


def dependencies(channels: int, num_classes: int = 0, size: int = 5) -> np.ndarray:
    """(N, N) 0/1: does output position p (raster order, channels innermost) depend on input position q? (At
    any of 3 random inputs: at one input a position's ReLUs can all be off, hiding its dependencies.)"""
    model = build_model("pixelcnn", resolution=size, channels=channels, levels=4, num_classes=num_classes,
                        features=6 * channels, layers=3, kernel_size=5)
    x = jax.random.uniform(jax.random.key(0), (1, size, size, channels), minval=-1, maxval=1)
    labels = jnp.zeros((1,), jnp.int32) if num_classes else None
    variables = model.init(jax.random.key(1), x, labels)
    # Random non-zero biases, so no unit sits at a kink of its activation for every input.
    variables = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(2), v.shape), variables)
    weights = jax.random.normal(jax.random.key(3), (4,))

    def f(img):
        return jnp.sum(model.apply(variables, img, labels)[0] * weights, axis=-1)  # (H, W, C)

    n = size * size * channels
    found = np.zeros((n, n), bool)
    jacobian = jax.jit(jax.jacrev(f))  # compiled once for the 3 inputs
    for seed in range(3):
        x = jax.random.uniform(jax.random.key(10 + seed), (1, size, size, channels), minval=-1, maxval=1)
        jac = jacobian(x)[:, :, :, 0]  # (H, W, C, H, W, C)
        found |= np.abs(np.asarray(jac).reshape(n, n)) > 0
    return found.astype(int)


@pytest.mark.parametrize("channels", [1, 3])
def test_causal_without_blind_spot(channels):
    dep = dependencies(channels)
    n = dep.shape[0]
    # Exactly the positions before p: nothing on or above the diagonal, everything below it.
    np.testing.assert_array_equal(dep, np.tril(np.ones((n, n), int), k=-1))


def test_conditional_model_is_causal_too():
    dep = dependencies(1, num_classes=3, size=4)
    np.testing.assert_array_equal(np.triu(dep), 0)


def test_bits_per_dim_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 4, 2, 17)).astype(np.float32)
    levels = rng.integers(0, 17, size=(3, 4, 4, 2))
    logp = log_softmax(logits.astype(np.float64), axis=-1)
    nll_bits = -np.take_along_axis(logp, levels[..., None], axis=-1)[..., 0] / np.log(2)
    want = np.mean(nll_bits.reshape(3, -1).sum(1) / (4 * 4 * 2))
    np.testing.assert_allclose(float(losses.bits_per_dim(jnp.asarray(logits), jnp.asarray(levels))), want, rtol=1e-6)
    per_image = nll_bits.reshape(3, -1).mean(1)
    np.testing.assert_allclose(losses.bits_per_image(jnp.asarray(logits), jnp.asarray(levels)), per_image, rtol=1e-6)


@pytest.mark.parametrize("alpha,temperature", [(0.5, 2.0), (0.0, 1.0), (1.0, 4.0)])
def test_pixel_kd_against_numpy(alpha, temperature):
    rng = np.random.default_rng(1)
    zs = rng.normal(size=(2, 3, 3, 1, 5)) * 2
    zt = rng.normal(size=(2, 3, 3, 1, 5)) * 2
    x = rng.integers(0, 5, size=(2, 3, 3, 1))
    ce = -np.take_along_axis(log_softmax(zs, -1), x[..., None], -1)[..., 0]
    pt, log_pt = softmax(zt / temperature, -1), log_softmax(zt / temperature, -1)
    log_ps = log_softmax(zs / temperature, -1)
    kl = np.sum(pt * (log_pt - log_ps), -1)
    want = np.mean(alpha * ce + (1 - alpha) * temperature ** 2 * kl)
    loss, terms = losses.pixel_kd(jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32), jnp.asarray(x),
                                  alpha, temperature)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(terms["ce"]), ce.mean(), rtol=1e-5)


def test_sampling_a_model_that_ignores_its_input():
    """Every weight 0 and the last bias b: each pixel is drawn from softmax(b) of its channel, independently;
    the sampled levels' frequencies must match it (4 standard errors)."""
    levels, channels = 5, 2
    model = build_model("pixelcnn", resolution=4, channels=channels, levels=levels, features=4, layers=2,
                        kernel_size=3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, channels)))
    variables = jax.tree.map(jnp.zeros_like, variables)
    bias = np.array([[2.0, 0.0, -1.0, 1.0, 0.5], [-1.0, 1.5, 0.0, 0.0, -2.0]], np.float32)
    variables["params"]["head2"]["bias"] = jnp.asarray(bias.reshape(-1))
    x = jax.jit(sample, static_argnums=(0, 3))(model, variables, jax.random.key(5), 2000)
    assert x.shape == (2000, 4, 4, channels) and x.dtype == jnp.int32
    x = np.asarray(x)
    n = x[..., 0].size
    for c in range(channels):
        freq = np.bincount(x[..., c].ravel(), minlength=levels) / n
        p = softmax(bias[c])
        assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n)), (c, freq, p)


def test_sampling_follows_the_model():
    """Each sampled level is a draw from the model's conditional at that position given the levels before it:
    over many samples, the first pixel's levels follow softmax(logits at position 0), which no earlier pixel
    affects."""
    model = build_model("pixelcnn", resolution=3, channels=1, levels=3, features=4, layers=2, kernel_size=3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 3, 3, 1)))
    variables["params"]["head2"]["bias"] = jnp.array([1.0, -0.5, 0.3])
    x = np.asarray(jax.jit(sample, static_argnums=(0, 3))(model, variables, jax.random.key(1), 4000))
    first = model.apply(variables, to_model_input(jnp.zeros((1, 3, 3, 1), jnp.int32), 3))[0, 0, 0, 0]
    p = np.asarray(jax.nn.softmax(first))
    freq = np.bincount(x[:, 0, 0, 0], minlength=3) / len(x)
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / len(x))), (freq, p)
