"""Generator-distillation loss terms against independent numpy (and torch) computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses
from kdjax.evaluation import fidelity


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_l1_l2_against_numpy():
    rng = _rng(0)
    x, y = rng.normal(size=(3, 4, 5, 2)), rng.normal(size=(3, 4, 5, 2))
    assert float(losses.l1(jnp.asarray(x), jnp.asarray(y))) == pytest.approx(np.mean(np.abs(x - y)), rel=1e-5)
    assert float(losses.l2(jnp.asarray(x), jnp.asarray(y))) == pytest.approx(np.mean((x - y) ** 2), rel=1e-5)
    # bfloat16 inputs are compared in float32.
    xb, yb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
    assert losses.l2(xb, yb).dtype == jnp.float32


def _feats(rng, shapes):
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def test_feature_matching_against_numpy_and_stops_teacher_gradient():
    rng = _rng(1)
    s = _feats(rng, {"8": (2, 8, 8, 4), "16": (2, 16, 16, 3), "student_only": (2, 4, 4, 1)})
    t = _feats(rng, {"8": (2, 8, 8, 4), "16": (2, 16, 16, 3), "teacher_only": (2, 32, 32, 2)})
    expected = np.mean([np.mean((s[k] - t[k]) ** 2) for k in ("8", "16")])
    got = jax.jit(losses.feature_matching)(s, t)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    g_s, g_t = jax.grad(losses.feature_matching, argnums=(0, 1))(s, t)
    np.testing.assert_allclose(g_s["8"], 2 * (s["8"] - t["8"]) / s["8"].size / 2, rtol=1e-5)
    assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree_util.tree_leaves(g_t))


def test_feature_matching_errors_name_the_keys():
    rng = _rng(2)
    with pytest.raises(ValueError, match=r"no shared.*'a'.*'b'"):
        losses.feature_matching(_feats(rng, {"a": (1, 2, 2, 1)}), _feats(rng, {"b": (1, 2, 2, 1)}))
    with pytest.raises(ValueError, match=r"'a'.*\(1, 2, 2, 1\).*\(1, 2, 2, 3\)"):
        losses.feature_matching(_feats(rng, {"a": (1, 2, 2, 1)}), _feats(rng, {"a": (1, 2, 2, 3)}))


def _np_perceptual(fa, fb, eps=1e-10):
    def norm(f):
        f = f if f.ndim == 4 else f[:, None, None, :]
        return f / (np.sqrt(np.sum(f ** 2, axis=-1, keepdims=True)) + eps)
    return np.mean([np.mean(np.sum((norm(fa[k]) - norm(fb[k])) ** 2, axis=-1)) for k in fa])


def test_perceptual_against_numpy_and_fidelity():
    rng = _rng(3)
    shapes = {"conv1": (3, 8, 8, 5), "conv2": (3, 4, 4, 7), "pool": (3, 6)}
    a, b = _feats(rng, shapes), _feats(rng, shapes)
    got = float(jax.jit(losses.perceptual)(a, b))
    assert got == pytest.approx(_np_perceptual(a, b), rel=1e-5)
    # The same definition as the evaluation metric (per image there, batch mean here).
    assert got == pytest.approx(float(jnp.mean(fidelity.perceptual_distance(a, b))), rel=1e-6)
    assert float(losses.perceptual(a, a)) == pytest.approx(0.0, abs=1e-7)
    # Scale-invariant per position: channel normalisation removes a positive per-position factor.
    scaled = {k: v * (1.0 + rng.uniform(size=v.shape[:-1] + (1,))).astype(np.float32) for k, v in a.items()}
    assert float(losses.perceptual(scaled, b)) == pytest.approx(got, rel=1e-4)


def test_perceptual_gradient_finite_at_all_zero_channel_vectors():
    a = np.ones((1, 2, 2, 3), np.float32)
    a[0, 0, 0] = 0.0  # e.g. a position where every channel is cut by a ReLU
    b = _rng(4).normal(size=(1, 2, 2, 3)).astype(np.float32)
    g = jax.grad(lambda f: losses.perceptual({"x": f}, {"x": jnp.asarray(b)}))(jnp.asarray(a))
    assert np.all(np.isfinite(np.asarray(g)))
    assert float(losses.perceptual({"x": a}, {"x": b})) == pytest.approx(
        float(jnp.mean(fidelity.perceptual_distance({"x": a}, {"x": b}))), rel=1e-6)


def test_perceptual_errors():
    rng = _rng(5)
    with pytest.raises(ValueError, match=r"'a'.*'b'"):
        losses.perceptual(_feats(rng, {"a": (1, 2, 2, 1)}), _feats(rng, {"b": (1, 2, 2, 1)}))
    with pytest.raises(ValueError, match=r"'a'.*shapes differ"):
        losses.perceptual(_feats(rng, {"a": (1, 2, 2, 1)}), _feats(rng, {"a": (1, 4, 4, 1)}))


def test_logistic_against_numpy_and_finite_at_large_magnitudes():
    rng = _rng(6)
    real, fake = rng.normal(size=8) * 3, rng.normal(size=8) * 3
    np_sp = lambda v: np.log1p(np.exp(v))  # noqa: E731
    d = losses.d_logistic(jnp.asarray(real), jnp.asarray(fake))
    assert float(d) == pytest.approx(np.mean(np_sp(-real)) + np.mean(np_sp(fake)), rel=1e-5)
    assert float(losses.g_nonsaturating(jnp.asarray(fake))) == pytest.approx(np.mean(np_sp(-fake)), rel=1e-5)
    big = jnp.array([-1e4, 1e4, -200.0, 200.0], jnp.float32)
    d_big, g_big = losses.d_logistic(big, big), losses.g_nonsaturating(big)
    # softplus(x) = max(x, 0) at these magnitudes: each side sums to 1e4 + 200 over 4 logits.
    assert float(d_big) == pytest.approx(2 * (1e4 + 200) / 4, rel=1e-6)
    assert float(g_big) == pytest.approx((1e4 + 200) / 4, rel=1e-6)
    grads = jax.grad(losses.d_logistic, argnums=(0, 1))(big, big) + (jax.grad(losses.g_nonsaturating)(big),)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_hinge_against_numpy():
    rng = _rng(7)
    real, fake = rng.normal(size=8) * 2, rng.normal(size=8) * 2
    expected = np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake))
    assert float(losses.d_hinge(jnp.asarray(real), jnp.asarray(fake))) == pytest.approx(expected, rel=1e-5)
    assert float(losses.g_hinge(jnp.asarray(fake))) == pytest.approx(-np.mean(fake), rel=1e-5)
    # Confident, correct logits give zero discriminator loss.
    assert float(losses.d_hinge(jnp.full(4, 2.0), jnp.full(4, -2.0))) == 0.0


def test_r1_linear_and_quadratic_discriminators():
    rng = _rng(8)
    x = jnp.asarray(rng.normal(size=(4, 3, 3, 2)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(3, 3, 2)).astype(np.float32))
    d_linear = lambda imgs: jnp.sum(imgs * w, axis=(1, 2, 3))  # noqa: E731  D(x) = <w, x>
    assert float(losses.r1_penalty(d_linear, x)) == pytest.approx(float(jnp.sum(w ** 2)), rel=1e-6)
    d_quad = lambda imgs: jnp.sum(imgs ** 2, axis=(1, 2, 3))  # noqa: E731  grad = 2x
    expected = np.mean(4 * np.sum(np.asarray(x) ** 2, axis=(1, 2, 3)))
    assert float(jax.jit(losses.r1_penalty, static_argnums=0)(d_quad, x)) == pytest.approx(expected, rel=1e-6)


def test_r1_against_torch_autograd():
    torch = pytest.importorskip("torch")
    rng = _rng(9)
    x = rng.normal(size=(5, 4, 4, 3)).astype(np.float32)
    w1, w2 = rng.normal(size=(48, 16)).astype(np.float32) / 7, rng.normal(size=16).astype(np.float32)

    def d_jax(imgs):
        return jnp.tanh(imgs.reshape(imgs.shape[0], -1) @ w1) @ w2

    xt = torch.tensor(x, requires_grad=True)
    logits = torch.tanh(xt.reshape(5, -1) @ torch.tensor(w1)) @ torch.tensor(w2)
    (g,) = torch.autograd.grad(logits.sum(), xt)
    expected = g.pow(2).reshape(5, -1).sum(1).mean().item()
    assert float(losses.r1_penalty(d_jax, jnp.asarray(x))) == pytest.approx(expected, rel=1e-5)
