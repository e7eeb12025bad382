"""Retrieval metrics against hand computations and scikit-learn's average precision."""

import numpy as np
from sklearn.metrics import average_precision_score

from kdjax.evaluation.retrieval import retrieval_report


def test_hand_computed_case():
    # One query [1, 0]; gallery ranked by cosine: g0 (1.0, label 1), g2 (0.8, label 0), g1 (0, label 1).
    q, ql = np.array([[1.0, 0.0]]), np.array([1])
    g, gl = np.array([[2.0, 0.0], [0.0, 1.0], [0.8, 0.6]]), np.array([1, 1, 0])
    r = retrieval_report(q, ql, g, gl, ks=(1, 2))
    assert r["recall@1"] == 1.0 and r["recall@2"] == 1.0
    assert r["map"] == (1 / 1 + 2 / 3) / 2  # relevant at ranks 1 and 3


def test_against_sklearn_average_precision():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(40, 8)), rng.normal(size=(200, 8))
    ql, gl = rng.integers(0, 4, 40), rng.integers(0, 4, 200)
    r = retrieval_report(q, ql, g, gl, ks=(1, 5))
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    sims = qn @ gn.T
    want_map = np.mean([average_precision_score(gl == ql[i], sims[i]) for i in range(40)])
    np.testing.assert_allclose(r["map"], want_map, rtol=1e-12)
    top = np.argsort(-sims, axis=1)
    for k in (1, 5):
        assert r[f"recall@{k}"] == np.mean([(gl[top[i, :k]] == ql[i]).any() for i in range(40)])


def test_perfect_embedding():
    labels = np.repeat(np.arange(3), 5)
    emb = np.eye(3)[labels] + 0.01 * np.random.default_rng(1).normal(size=(15, 3))
    r = retrieval_report(emb, labels, emb, labels)
    assert r == {"recall@1": 1.0, "recall@5": 1.0, "map": 1.0}


def test_relational_distance_against_numpy():
    import jax.numpy as jnp

    from kdjax import losses

    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(6, 4)), rng.normal(size=(6, 9))

    def psi(e):
        d = np.linalg.norm(e[:, None] - e[None], axis=-1)
        return d / d[~np.eye(6, dtype=bool)].mean()

    x = (psi(s) - psi(t))[~np.eye(6, dtype=bool)]
    huber = np.where(np.abs(x) <= 1, 0.5 * x ** 2, np.abs(x) - 0.5)
    got = float(losses.relational_distance(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)))
    np.testing.assert_allclose(got, huber.mean(), rtol=1e-5)
    # Zero when the student's distances are the teacher's up to scale (and rotation), and finite gradients.
    q, _ = np.linalg.qr(rng.normal(size=(9, 9)))
    assert float(losses.relational_distance(jnp.asarray(3 * t @ q, jnp.float32), jnp.asarray(t, jnp.float32))) < 1e-10
    import jax

    g = jax.grad(lambda e: losses.relational_distance(e, jnp.asarray(t, jnp.float32)))(jnp.asarray(s, jnp.float32))
    assert np.all(np.isfinite(np.asarray(g)))


def test_relational_distance_is_finite_for_collapsed_embeddings():
    """Dead ReLUs can make student embeddings identical (even all zero): loss and gradient stay finite."""
    import jax
    import jax.numpy as jnp

    from kdjax import losses

    t = jnp.asarray(np.random.default_rng(3).normal(size=(5, 4)), jnp.float32)
    for s in (jnp.zeros((5, 3)), jnp.ones((5, 3)).at[0].set(2.0)):
        value, grad = jax.value_and_grad(lambda e: losses.relational_distance(e, t))(s)
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
