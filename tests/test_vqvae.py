"""The VQ-VAE: nearest-code quantisation, the straight-through gradient, the commitment term and the EMA
codebook update against hand computations; its train step on 8 devices equals 1 and moves the codebook as the
EMA formula says for the whole global batch; the PixelCNN over embedded codes stays causal."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import losses, models
from kdjax.core import parallel
from kdjax.models.vqvae import assignment_stats, ema_codebook_update, nearest_code, straight_through
from kdjax.steps.state import TrainState
from kdjax.steps.vqvae import make_train_step


def test_nearest_code_is_the_brute_force_argmin():
    rng = np.random.default_rng(0)
    z, codebook = rng.normal(size=(5, 3, 4)), rng.normal(size=(7, 4))
    want = np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
    np.testing.assert_array_equal(nearest_code(jnp.asarray(z, jnp.float32), jnp.asarray(codebook, jnp.float32)), want)


def test_straight_through_has_the_value_of_z_q_and_the_gradient_of_z_e():
    z_e, z_q, w = jnp.array([0.3, -1.2]), jnp.array([1.0, 2.0]), jnp.array([2.0, -3.0])
    np.testing.assert_array_equal(straight_through(z_e, z_q), z_q)
    g_e, g_q = jax.grad(lambda a, b: jnp.sum(w * straight_through(a, b) ** 2), argnums=(0, 1))(z_e, z_q)
    # d/dz_e sum w * st^2 = 2 w st evaluated at st = z_q; nothing reaches z_q.
    np.testing.assert_allclose(g_e, 2 * w * z_q)
    np.testing.assert_array_equal(g_q, 0.0)


def test_commitment_term_and_its_gradient_by_hand():
    z_e, z_q = jnp.array([[1.0, 2.0], [0.0, -1.0]]), jnp.array([[0.0, 2.0], [1.0, 1.0]])
    assert float(losses.vq_commitment(z_e, z_q)) == pytest.approx((1 + 0 + 1 + 4) / 4)
    g_e, g_q = jax.grad(losses.vq_commitment, argnums=(0, 1))(z_e, z_q)
    np.testing.assert_allclose(g_e, 2 * (z_e - z_q) / 4)
    np.testing.assert_array_equal(g_q, 0.0)


def test_ema_codebook_update_by_hand():
    # Codes 0 and 1 at 0 and 10 (cluster sizes 1, sums = the entries); the batch assigns 1, 2 to code 0 and 9 to 1.
    vq = {"codebook": jnp.array([[0.0], [10.0]]), "cluster_size": jnp.ones(2), "embed_sum": jnp.array([[0.0], [10.0]])}
    z = jnp.array([[1.0], [2.0], [9.0]])
    counts, sums = assignment_stats(z, jnp.array([0, 0, 1]), 2)
    np.testing.assert_array_equal(counts, [2, 1])
    np.testing.assert_array_equal(sums, [[3.0], [9.0]])
    new = ema_codebook_update(vq, counts, sums, decay=0.5, eps=0.0)
    # N = 0.5 * 1 + 0.5 * (2, 1) = (1.5, 1); m = 0.5 * (0, 10) + 0.5 * (3, 9) = (1.5, 9.5); e = m / N.
    np.testing.assert_allclose(new["cluster_size"], [1.5, 1.0])
    np.testing.assert_allclose(new["embed_sum"], [[1.5], [9.5]])
    np.testing.assert_allclose(new["codebook"], [[1.0], [9.5]])
    # Laplace smoothing: N~_k = (N_k + eps) / (sum N + K eps) * sum N.
    eps = 0.1
    smoothed = (np.array([1.5, 1.0]) + eps) / (2.5 + 2 * eps) * 2.5
    np.testing.assert_allclose(ema_codebook_update(vq, counts, sums, 0.5, eps)["codebook"][:, 0],
                               np.array([1.5, 9.5]) / smoothed, rtol=1e-6)


def test_unused_code_keeps_its_entry():
    vq = {"codebook": jnp.array([[0.0], [10.0]]), "cluster_size": jnp.ones(2), "embed_sum": jnp.array([[0.0], [10.0]])}
    new = ema_codebook_update(vq, jnp.array([3.0, 0.0]), jnp.array([[3.0], [0.0]]), decay=0.9, eps=0.0)
    np.testing.assert_allclose(new["codebook"][1], [10.0], rtol=1e-6)


def test_code_perplexity():
    assert float(losses.code_perplexity(jnp.array([5.0, 5.0, 5.0, 5.0]))) == pytest.approx(4.0)
    assert float(losses.code_perplexity(jnp.array([0.0, 7.0, 0.0]))) == pytest.approx(1.0)
    p = np.array([1.0, 2.0, 3.0, 0.0]) / 6
    assert float(losses.code_perplexity(jnp.array([1.0, 2.0, 3.0, 0.0]))) == pytest.approx(
        np.exp(-np.sum(p[:3] * np.log(p[:3]))), rel=1e-6)


def tiny_vqvae():
    model = models.build_model("vqvae", resolution=8, channels=1, num_codes=6, code_dim=3, features=8,
                               downsamples=1, res_blocks=1)
    return model, model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


def test_step_on_8_devices_equals_1_and_moves_the_codebook_by_the_global_ema():
    model, variables = tiny_vqvae()
    images = jax.random.uniform(jax.random.key(1), (16, 8, 8, 1), minval=-1, maxval=1)
    tx = optax.sgd(0.1)
    states = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        step = make_train_step(model, tx, mesh, beta=0.25, decay=0.8)
        state = parallel.replicate(TrainState.create(variables, tx), mesh)
        state, metrics = step(state, parallel.global_batch({"image": images}, mesh))
        states.append(parallel.to_host(state))
    assert len(jax.devices()) == 8
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The codebook step, by hand from the encoder's outputs on all 16 images before the update.
    out = model.apply(variables, images)
    counts, sums = assignment_stats(out["z_e"], out["codes"], 6)
    want = ema_codebook_update(variables["vq"], counts, sums, 0.8)
    np.testing.assert_allclose(states[1].model_state["vq"]["codebook"], want["codebook"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(want["codebook"], variables["vq"]["codebook"])
    assert np.isfinite(float(metrics.compute()["perplexity"]))


def test_encoder_gets_the_reconstruction_gradient_through_the_quantiser():
    model, variables = tiny_vqvae()
    x = jax.random.uniform(jax.random.key(2), (4, 8, 8, 1), minval=-1, maxval=1)

    def rec(params):
        return losses.l2(model.apply({**variables, "params": params}, x)["reconstruction"], x)

    grads = jax.grad(rec)(variables["params"])
    encoder = [k for k in grads if k.startswith("enc_")]
    assert encoder and all(float(jnp.abs(v).sum()) > 0 for k in encoder for v in jax.tree.leaves(grads[k]))


def test_pixelcnn_over_embedded_codes_is_causal():
    """Changing the code at one position changes no logits at or before it, and some after it."""
    model = models.build_model("pixelcnn", resolution=4, channels=1, levels=6, features=6, layers=3, kernel_size=3,
                               embed=3)
    codes = jax.random.randint(jax.random.key(3), (1, 4, 4, 1), 0, 6)
    to_input = lambda c: c * (2.0 / 5) - 1.0  # noqa: E731 (pixelcnn.to_model_input)
    variables = model.init(jax.random.key(4), to_input(codes))
    base = model.apply(variables, to_input(codes)).reshape(16, 6)
    for p in range(16):
        changed = codes.reshape(16).at[p].set((codes.reshape(16)[p] + 1) % 6).reshape(1, 4, 4, 1)
        diff = np.abs(np.asarray(model.apply(variables, to_input(changed)).reshape(16, 6) - base)).max(axis=1)
        np.testing.assert_array_equal(diff[:p + 1], 0.0)
        if p < 15:
            assert diff[p + 1:].max() > 0
