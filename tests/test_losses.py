"""Loss terms against hand-computed values and independent numpy formulas."""

import math

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
