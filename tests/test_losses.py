"""Loss terms against hand-computed values and independent numpy formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses


def logits_of(probs):
    return jnp.log(jnp.asarray(probs, jnp.float32))


def test_kl_and_ce_hand_values():
    teacher, student = logits_of([[0.8, 0.2]]), logits_of([[0.7, 0.3]])
    # KL(t || s) = 0.8 ln(0.8/0.7) + 0.2 ln(0.2/0.3) = 0.02573 nats; CE with label 0 = -ln 0.7 = 0.35667.
    assert float(losses.kl_divergence(teacher, student, 1.0)) == pytest.approx(0.025731, abs=1e-5)
    assert float(losses.softmax_cross_entropy(student, jnp.array([0]))) == pytest.approx(0.356675, abs=1e-5)
    assert float(losses.distillation_kl(teacher, student, 1.0)) == pytest.approx(0.025731, abs=1e-5)


def _np_kl(t, s, temp):
    def softmax(z):
        z = z / temp - (z / temp).max(-1, keepdims=True)
        return np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    pt, ps = softmax(t), softmax(s)
    return np.mean(np.sum(pt * np.log(pt / ps), -1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0, 10.0])
def test_temperature_and_t_squared_factor(temperature):
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(16, 10)) * 3, rng.normal(size=(16, 10)) * 3
    kl = float(losses.kl_divergence(jnp.asarray(t), jnp.asarray(s), temperature))
    assert kl == pytest.approx(_np_kl(t, s, temperature), rel=1e-4)
    soft = float(losses.distillation_kl(jnp.asarray(t), jnp.asarray(s), temperature))
    assert soft == pytest.approx(temperature ** 2 * _np_kl(t, s, temperature), rel=1e-4)


def test_higher_temperature_softens_targets():
    t, s = jnp.array([[5.0, 0.0, -5.0]]), jnp.array([[0.0, 5.0, -5.0]])
    kls = [float(losses.kl_divergence(t, s, temp)) for temp in (1.0, 2.0, 8.0)]
    assert kls[0] > kls[1] > kls[2] > 0  # softened distributions are closer
    assert float(losses.kl_divergence(t, t, 3.0)) == pytest.approx(0.0, abs=1e-7)


def test_classic_kd_combination():
    rng = np.random.default_rng(1)
    t, s = jnp.asarray(rng.normal(size=(8, 5))), jnp.asarray(rng.normal(size=(8, 5)))
    y = jnp.asarray(rng.integers(0, 5, size=8))
    alpha, temp = 0.3, 2.0
    loss, terms = losses.classic_kd(s, t, y, alpha, temp)
    ce = -np.mean(np.log(np.exp(np.asarray(s)) / np.exp(np.asarray(s)).sum(-1, keepdims=True))[np.arange(8), y])
    expected = alpha * ce + (1 - alpha) * temp ** 2 * _np_kl(np.asarray(t), np.asarray(s), temp)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(terms["ce"]) == pytest.approx(ce, rel=1e-5)
    # alpha = 1 ignores the teacher entirely.
    only_ce, _ = losses.classic_kd(s, t * 100, y, 1.0, temp)
    assert float(only_ce) == pytest.approx(ce, rel=1e-5)
    assert math.isfinite(float(loss))


def _torch_kl(teacher, student, temperature):
    """torch's F.kl_div(log_softmax(z_s / T), softmax(z_t / T), reduction="batchmean"): an independent reference."""
    import torch
    import torch.nn.functional as F

    t, s = torch.tensor(np.asarray(teacher, np.float32)), torch.tensor(np.asarray(student, np.float32))
    return float(F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="batchmean"))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_matches_torch_and_stays_finite_with_masked_teacher_classes(temperature):
    rng = np.random.default_rng(2)
    t, s = rng.normal(size=(6, 5)).astype(np.float32) * 3, rng.normal(size=(6, 5)).astype(np.float32) * 3
    t[0, 1] = t[2, 4] = t[2, 0] = -np.inf  # classes the teacher rules out: p_t = 0
    kl = float(losses.kl_divergence(jnp.asarray(t), jnp.asarray(s), temperature))
    assert math.isfinite(kl)
    assert kl == pytest.approx(_torch_kl(t, s, temperature), rel=1e-5)
    # Finite gradients: the student's (what training uses) and the teacher's (should a caller not stop it).
    g_s = jax.grad(lambda x: losses.kl_divergence(jnp.asarray(t), x, temperature))(jnp.asarray(s))
    g_t = jax.grad(lambda x: losses.kl_divergence(x, jnp.asarray(s), temperature))(jnp.asarray(t))
    assert np.isfinite(np.asarray(g_s)).all() and np.isfinite(np.asarray(g_t)).all()
    # d KL / d z_s = (p_s - p_t) / (T B): the masked class pulls the student's probability to 0.
    p = lambda z: np.exp(z / temperature) / np.exp(z / temperature).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(g_s), (p(s) - p(t)) / (temperature * len(s)), atol=1e-6)
    # classic_kd with a masked teacher class: a finite loss and a finite student gradient too.
    y = jnp.asarray(rng.integers(0, 5, 6))
    grads = jax.grad(lambda x: losses.classic_kd(x, jnp.asarray(t), y, 0.1, temperature)[0])(jnp.asarray(s))
    assert np.isfinite(np.asarray(grads)).all()


def test_kl_unchanged_on_finite_logits_and_nan_still_propagates():
    rng = np.random.default_rng(3)
    t, s = jnp.asarray(rng.normal(size=(32, 10)) * 5, jnp.float32), jnp.asarray(rng.normal(size=(32, 10)) * 5, jnp.float32)
    log_pt, log_ps = jax.nn.log_softmax(t / 2.0), jax.nn.log_softmax(s / 2.0)
    written_out = jnp.mean(jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1))  # the formula, by hand
    assert float(losses.kl_divergence(t, s, 2.0)) == float(written_out)  # bitwise
    assert math.isnan(float(losses.kl_divergence(t.at[0, 0].set(jnp.nan), s, 2.0)))  # a NaN teacher is not hidden
