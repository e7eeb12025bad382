"""Loss terms of every objective in kdjax: each a small pure function with its formula.

All functions take float arrays and return a scalar averaged over the batch (the first axis) unless
said otherwise. Logits are computed in float32 for the softmax, whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """CE(z, y) = mean_b [ -log softmax(z_b)[y_b] ].

    Args:
      logits: (B, C) unnormalised scores.
      labels: (B,) integer class indices.
    Returns:
      The batch-mean cross-entropy in nats.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


def kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array,
                  temperature: float = 1.0) -> jax.Array:
    """KL(p_t || p_s) with p = softmax(z / T), batch mean, in nats (no T^2 factor).

    KL = mean_b sum_c p_t[b, c] * (log p_t[b, c] - log p_s[b, c]). Gradients flow to both arguments;
    callers stop the teacher's gradient.
    """
    t = teacher_logits.astype(jnp.float32) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    log_pt = jax.nn.log_softmax(t, axis=-1)
    log_ps = jax.nn.log_softmax(s, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1))


def distillation_kl(teacher_logits: jax.Array, student_logits: jax.Array,
                    temperature: float) -> jax.Array:
    """Hinton et al. (2015) soft-target term: T^2 * KL(softmax(z_t / T) || softmax(z_s / T)).

    The T^2 factor keeps the gradient magnitude of the soft term comparable across temperatures
    (the gradient of the KL scales as 1 / T^2).
    """
    return temperature ** 2 * kl_divergence(teacher_logits, student_logits, temperature)


def classic_kd(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
               alpha: float, temperature: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Classic KD: alpha * CE(z_s, y) + (1 - alpha) * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)).

    alpha = 1 is training from hard labels alone (the teacher is ignored); alpha = 0 is pure
    distillation. The teacher logits are treated as constants.

    Returns:
      (loss, terms) with terms = {"ce": CE, "kl": T^2 * KL} (unweighted), for logging.
    """
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    ce = softmax_cross_entropy(student_logits, labels)
    kl = distillation_kl(teacher_logits, student_logits, temperature)
    return alpha * ce + (1.0 - alpha) * kl, {"ce": ce, "kl": kl}
