"""One-step distribution-matching distillation (DMD / DMD2) of a diffusion teacher, on the analytic Gaussian-mixture
teacher (`kdjax.models.gaussian_mixture`), the tiny `mlp_denoiser` as the fake denoiser and the tiny `mlp_generator`:
the distribution-matching direction is 0 when the generator's distribution is the teacher's and, between two
Gaussians, has the expectation (and, normalised, the per-sample direction and weight) computed here by hand; the
generator's surrogate loss has the direction as its gradient (through a linear generator too, by hand); the fake
denoiser's loss is smallest at the exact denoiser of the generator's distribution, by the amount the squared
error predicts; DMD2 trained for 2000 CPU steps brings the generator's one-step samples close to the mixture
(per-component mass, mean and spread, exact given the samples) where the initial generator is far, and a
class-conditional generator to each class's component; DMD2's GAN term with zero weights leaves the step as it was,
and its classifier learns real mixture draws from a generator's far-off samples (its loss well below chance, 2 ln 2);
the step on 8 devices equals 1 (with the GAN term too), a resumed step equals an uninterrupted one bitwise; bad
settings fail clearly."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax.core import parallel
from kdjax.models.dcgan import Generator as DCGANGenerator
from kdjax.models.gaussian_mixture import GaussianMixture
from kdjax.models.mlp_denoiser import MLPDenoiser
from kdjax.models.mlp_generator import MLPGenerator
from kdjax.steps import distribution_matching as dm
from kdjax.steps import progressive

# The mixture of tests/test_diffusion_distill.py (copied: test modules do not import each other).
WEIGHTS = np.array([0.5, 0.3, 0.2])
MEANS = np.array([[-0.8, -0.4], [0.6, 0.6], [0.4, -0.8]])  # three 1x1x2 "images", >= 1.26 apart
STD = 0.1
SHAPE = (1, 1, 2)
MIXTURE = GaussianMixture(WEIGHTS, MEANS.reshape(3, *SHAPE), STD)
TEACHER = lambda variables, x, sigma, labels: MIXTURE(x, sigma, labels)
SIGMA_MAX, SIGMA_MIN = 10.0, 0.002  # the data's scale is ~0.6: sigma_max = 10 hides it
NUM_SAMPLES = 2000  # each component's sample mass has a standard error <= sqrt(0.25 / 2000) = 0.011


def mixture_draws(weights, means, std, count, seed):
    """`count` draws of sum_k w_k N(mu_k, std^2 I) by numpy, (count, *image shape) float32."""
    rng = np.random.default_rng(seed)
    components = rng.choice(len(weights), size=count, p=weights)
    return (means[components] + std * rng.standard_normal((count, *means.shape[1:]))).astype(np.float32)


def mixture_errors(samples):
    """(largest |sample mass - w_k|, largest ||sample mean - mu_k||, smallest and largest sample std of a component
    (the mean of its two coordinates' stds; STD for the mixture)) with samples assigned to the nearest mean."""
    y = np.asarray(samples, np.float64).reshape(len(samples), -1)
    nearest = np.argmin(((y[:, None] - MEANS[None]) ** 2).sum(-1), axis=1)
    mass = np.bincount(nearest, minlength=3) / len(y)
    means = np.array([y[nearest == k].mean(0) if np.sum(nearest == k) > 1 else np.full(2, np.inf) for k in range(3)])
    stds = np.array([y[nearest == k].std(0).mean() if np.sum(nearest == k) > 1 else 0.0 for k in range(3)])
    return (float(np.abs(mass - WEIGHTS).max()), float(np.linalg.norm(means - MEANS, axis=1).max()),
            float(stds.min()), float(stds.max()))


def noised(x, seed, sigmas=None):
    """x + sigma n with sigma log-uniform in [0.01, 10] per example (or the given ones); (x_t, sigma) float32."""
    rng = np.random.default_rng(seed)
    sigma = np.exp(rng.uniform(np.log(0.01), np.log(10.0), len(x))) if sigmas is None else sigmas
    sigma = np.asarray(sigma, np.float32)
    return (x + sigma[:, None, None, None] * rng.standard_normal(x.shape)).astype(np.float32), sigma


def weight_by_hand(x, denoised_real):
    """DMD's w_b = 1 / mean |x_b - D_real,b| in float64."""
    x, d = np.asarray(x, np.float64), np.asarray(denoised_real, np.float64)
    return 1.0 / np.abs(x - d).reshape(len(x), -1).mean(-1)


# ------------------------------------------------------------------------------------- the direction, by hand
def test_direction_vanishes_when_the_generator_matches_the_teacher():
    """Generated samples from the mixture itself, noised at levels from 0.01 to 10: with the mixture's exact
    denoiser as both D_real and D_fake the direction is exactly 0; with D_fake the exact denoiser of the same
    mixture written with its components in another order, 0 up to rounding; with D_fake that of the mixture with
    every mean shifted by (0.3, -0.2), far from 0, and the weight is 1 / mean |x - D_real| (numpy)."""
    x = mixture_draws(WEIGHTS, MEANS.reshape(3, *SHAPE), STD, 4096, 0)
    x_t, sigma = noised(x, 1)
    permuted = GaussianMixture(WEIGHTS[[2, 0, 1]], MEANS[[2, 0, 1]].reshape(3, *SHAPE), STD)
    shifted = GaussianMixture(WEIGHTS, (MEANS + np.array([0.3, -0.2])).reshape(3, *SHAPE), STD)

    @jax.jit
    def directions(x, x_t, sigma):
        real = MIXTURE(x_t, sigma)
        return (real, dm.dmd_direction(x, real, MIXTURE(x_t, sigma)), dm.dmd_direction(x, real, permuted(x_t, sigma)),
                dm.dmd_direction(x, real, shifted(x_t, sigma)), dm.dmd_weight(x, real))

    real, same, reordered, different, weight = directions(x, x_t, sigma)
    np.testing.assert_array_equal(same, np.zeros_like(x))
    assert np.abs(np.asarray(reordered)).max() < 1e-4
    assert np.abs(np.asarray(different)).mean() > 0.1
    np.testing.assert_allclose(weight, weight_by_hand(x, real), rtol=1e-5)


def gaussian(mean, std):
    return GaussianMixture(np.ones(1), np.asarray(mean).reshape(1, *SHAPE), std)


def test_direction_between_two_gaussians_by_hand():
    """Real N(mu_r, s_r^2 I) and generated (fake) N(mu_f, s_f^2 I), each with its exact denoiser, a_r = s_r^2 / (s_r^2
    + sigma^2) (and a_f): per sample the unnormalised direction is (1 - a_f) mu_f + a_f x_t - (1 - a_r) mu_r - a_r x_t
    (numpy, float64), so its expectation over generated samples is (1 - a_r) (mu_f - mu_r); the mean over 20000
    samples at each of four levels is within 4 standard errors of it. With s_f = s_r the normalised direction of
    every sample is w_b (1 - a) (mu_f - mu_r), w_b by hand: parallel to the mean difference, and one SGD step of the
    surrogate on a shift generator x = theta + s eps moves theta towards mu_r."""
    mu_r, mu_f, s_r, s_f, count = np.array([0.3, -0.2]), np.array([-0.5, 0.4]), 0.2, 0.35, 20000
    rng = np.random.default_rng(2)
    eps = rng.standard_normal((count, *SHAPE)).astype(np.float32)
    real = gaussian(mu_r, s_r)

    @jax.jit
    def unnormalised(x, x_t, sigma):
        return dm.dmd_direction(x, real(x_t, sigma), gaussian(mu_f, s_f)(x_t, sigma), normalise=False)

    x = (mu_f.reshape(SHAPE) + s_f * eps).astype(np.float32)
    for level in (0.05, 0.3, 1.0, 5.0):
        x_t, sigma = noised(x, int(level * 100), np.full(count, level))
        a_r, a_f = s_r**2 / (s_r**2 + level**2), s_f**2 / (s_f**2 + level**2)
        flat_t = np.asarray(x_t, np.float64).reshape(count, 2)
        by_hand = (1 - a_f) * mu_f + a_f * flat_t - (1 - a_r) * mu_r - a_r * flat_t
        g = np.asarray(unnormalised(x, x_t, sigma), np.float64).reshape(count, 2)
        np.testing.assert_allclose(g, by_hand, rtol=1e-4, atol=1e-5)
        expected = (1 - a_r) * (mu_f - mu_r)
        standard_error = abs(a_f - a_r) * np.sqrt(s_f**2 + level**2) / np.sqrt(count)
        assert np.all(np.abs(g.mean(0) - expected) < 4 * standard_error + 1e-6), (level, g.mean(0), expected)

    # Equal spreads: the normalised direction of each sample is a positive multiple of mu_f - mu_r.
    x = (mu_f.reshape(SHAPE) + s_r * eps[:4096]).astype(np.float32)
    x_t, sigma = noised(x, 3)
    fake = gaussian(mu_f, s_r)
    g = np.asarray(jax.jit(lambda x, x_t, s: dm.dmd_direction(x, real(x_t, s), fake(x_t, s)))(x, x_t, sigma))
    a = s_r**2 / (s_r**2 + np.asarray(sigma, np.float64) ** 2)
    w = weight_by_hand(x, real(x_t, sigma))
    np.testing.assert_allclose(g.reshape(-1, 2), (w * (1 - a))[:, None] * (mu_f - mu_r)[None], rtol=1e-4, atol=1e-6)

    def surrogate(theta):  # the shift generator's samples are x above: theta = mu_f
        x_theta = theta + s_r * jnp.asarray(eps[:4096])
        direction = dm.dmd_direction(jax.lax.stop_gradient(x_theta), real(x_t, sigma), fake(x_t, sigma))
        return dm.generator_surrogate(x_theta, direction)

    step = -np.asarray(jax.grad(surrogate)(jnp.asarray(mu_f.reshape(SHAPE), jnp.float32))).reshape(2)
    towards = (mu_r - mu_f) / np.linalg.norm(mu_r - mu_f)
    assert step @ towards > 0.999 * np.linalg.norm(step) > 0


def test_surrogate_gradient_is_the_direction():
    """L_G = 0.5 mean (x - sg(x - g))^2: its value is 0.5 mean g^2 and jax.grad with respect to x is g / (B H W C)
    (up to the rounding of x - (x - g), bounded here by twice the float32 spacing of |x| + |g|); through a linear
    generator x = z A + b, the gradients are z^T g / (B H W C) and the sum of g / (B H W C) (numpy)."""
    rng = np.random.default_rng(4)
    x = rng.normal(0.0, 1.0, (8, 2, 2, 3)).astype(np.float32)
    g = rng.normal(0.0, 0.5, x.shape).astype(np.float32)
    numel = x.size
    value, grad = jax.value_and_grad(dm.generator_surrogate)(jnp.asarray(x), jnp.asarray(g))
    np.testing.assert_allclose(value, 0.5 * np.mean(g.astype(np.float64) ** 2), rtol=1e-5)
    spacing = 2 * np.finfo(np.float32).eps * (np.abs(x) + np.abs(g))
    assert np.all(np.abs(np.asarray(grad) * numel - g) <= spacing), np.abs(np.asarray(grad) * numel - g).max()

    z = rng.normal(size=(8, 5)).astype(np.float32)
    params = {"a": rng.normal(size=(5, 12)).astype(np.float32), "b": rng.normal(size=(12,)).astype(np.float32)}
    flat_g = g.reshape(8, 12)
    grads = jax.grad(lambda p: dm.generator_surrogate((z @ p["a"] + p["b"]).reshape(x.shape), jnp.asarray(g)))(params)
    np.testing.assert_allclose(grads["a"], z.T.astype(np.float64) @ flat_g / numel, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["b"], flat_g.sum(0, dtype=np.float64) / numel, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------- the fake denoiser's loss
def test_fake_loss_is_smallest_at_the_generators_own_denoiser():
    """The generator's distribution q: the mixture with its means shifted by (0.3, -0.2) and std 0.15. On 40000 of its
    samples at EDM's log-normal levels (the same draws for every denoiser), the fake denoiser's loss is smallest at
    q's exact denoiser D*_q, against 0.9 D*_q, D*_q + 0.05, the teacher's denoiser D*_p and that of q with std 0.3;
    each excess over D*_q is mean lambda ||D - D*_q||^2 / d within 15% (the cross term has expectation 0)."""
    count = 40000
    means_q = (MEANS + np.array([0.3, -0.2])).reshape(3, *SHAPE)
    q = GaussianMixture(WEIGHTS, means_q, 0.15)
    wider = GaussianMixture(WEIGHTS, means_q, 0.3)
    x = mixture_draws(WEIGHTS, means_q, 0.15, count, 5)
    rng = np.random.default_rng(6)
    sigma = np.exp(-1.2 + 1.2 * rng.standard_normal(count)).astype(np.float32)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    candidates = {"0.9 D*_q": lambda v, s: 0.9 * q(v, s), "D*_q + 0.05": lambda v, s: q(v, s) + 0.05,
                  "D*_p": MIXTURE, "std 0.3": wider}

    @jax.jit
    def losses_and_excess(x, sigma, noise):
        x_t = x + sigma[:, None, None, None] * noise
        lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        out = {"D*_q": (dm.fake_denoiser_loss(q, x, sigma, noise, 0.5), 0.0)}
        for name, denoise in candidates.items():
            excess = jnp.mean(lam * jnp.mean((denoise(x_t, sigma) - q(x_t, sigma)).reshape(count, -1) ** 2, -1))
            out[name] = (dm.fake_denoiser_loss(denoise, x, sigma, noise, 0.5), excess)
        return out

    results = jax.tree.map(float, losses_and_excess(x, sigma, noise))
    best = results.pop("D*_q")[0]
    for name, (loss, excess) in results.items():
        assert loss > best and loss - best == pytest.approx(excess, rel=0.15), (name, loss, best, excess)


# ------------------------------------------------------------------------------------- DMD2 on the mixture
def test_dmd_trains_a_one_step_generator_on_the_mixture():
    """Mixture teacher, an MLP generator (z_dim 2) and an MLP fake denoiser from their own initialisations, 5 fake
    updates per generator update (Adam 2e-3, the generator's decaying linearly to 1e-4), batch 128, 2000 steps (about
    5 s after a 9 s compilation on one busy CPU core). The generator's one-step samples against the mixture: mass
    error < 0.05, mean error < 0.06 and every component's spread within [0.07, 0.2] (the mixture's: 0.1; a generator
    collapsed onto the means would pass the first two), where the initial generator makes 0.14, 0.82 and spreads
    0.03 to 0.08 (asserted: it fails). Measured: 0.008, 0.018, spreads 0.12 to 0.14 (over five other seeds: masses
    0.015-0.022, means 0.019-0.029, spreads 0.11-0.15: the generator's transitions between clusters and the online
    fake denoiser's error leave it a little too spread). Mass threshold: 2.5 standard errors above the worst seed."""
    generator, fake = MLPGenerator(z_dim=2), MLPDenoiser(sigma_data=0.5)
    init = jax.jit(lambda k: (generator.init(k, jnp.zeros((2, 2)))["params"],
                              fake.init(jax.random.fold_in(k, 1), jnp.zeros((2, *SHAPE)), jnp.ones((2,)))["params"]))
    g_params, f_params = init(jax.random.key(0))
    num_steps = 2000
    tx_g = optax.adam(optax.linear_schedule(2e-3, 1e-4, num_steps))
    tx_fake = optax.adam(2e-3)
    step = dm.make_dmd_step(generator, fake, TEACHER, tx_g, tx_fake, parallel.make_mesh(jax.devices()[:1]),
                            jax.random.key(10), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, fake_updates_per_step=5)
    sample = jax.jit(lambda p: generator.apply({"params": p}, jax.random.normal(jax.random.key(7), (NUM_SAMPLES, 2))))
    initial = mixture_errors(sample(g_params))
    assert initial[0] > 0.1 and initial[1] > 0.5 and initial[2] < 0.05, initial
    state, batch = dm.init_state(g_params, f_params, tx_g, tx_fake), dm.latent_batch(128)
    for _ in range(num_steps):
        state, metrics = step(state, batch, {})
    assert int(state.step) == num_steps and all(np.isfinite(float(v)) for v in metrics.compute().values())
    mass, mean, low, high = mixture_errors(sample(state.generator))
    assert mass < 0.05 and mean < 0.06 and 0.07 < low <= high < 0.2, (mass, mean, low, high, initial)


def test_dmd_trains_a_class_conditional_generator():
    """Class-conditional: the labels the step draws reach the generator, the teacher (the mixture given the label is
    its component, N(mu_k, 0.1^2 I)) and the fake denoiser. 400 steps as above; 1000 samples of each class: every
    class mean within 0.03 of mu_k and its spread within [0.08, 0.12], where the initial generator's means are >=
    0.8 away. Measured: mean errors 0.005-0.008, spreads 0.099-0.108."""
    generator, fake = MLPGenerator(num_classes=3), MLPDenoiser(sigma_data=0.5, num_classes=3)
    y = jnp.zeros((2,), jnp.int32)
    g_params = generator.init(jax.random.key(0), jnp.zeros((2, 2)), y)["params"]
    f_params = fake.init(jax.random.key(1), jnp.zeros((2, *SHAPE)), jnp.ones((2,)), y)["params"]
    tx_g, tx_fake = optax.adam(optax.linear_schedule(2e-3, 1e-4, 400)), optax.adam(2e-3)
    step = dm.make_dmd_step(generator, fake, TEACHER, tx_g, tx_fake, parallel.make_mesh(jax.devices()[:1]),
                            jax.random.key(3), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    labels = jnp.arange(3).repeat(1000)
    sample = jax.jit(lambda p: generator.apply({"params": p}, jax.random.normal(jax.random.key(7), (3000, 2)), labels))
    state, batch = dm.init_state(g_params, f_params, tx_g, tx_fake), dm.latent_batch(128)
    for _ in range(400):
        state, _ = step(state, batch, {})
    errors = lambda p: (np.linalg.norm(np.asarray(sample(p)).reshape(3, 1000, 2).mean(1) - MEANS, axis=1),
                        np.asarray(sample(p)).reshape(3, 1000, 2).std(1).mean(1))
    assert errors(g_params)[0].min() > 0.8
    mean_errors, spreads = errors(state.generator)
    assert mean_errors.max() < 0.03 and 0.08 < spreads.min() <= spreads.max() < 0.12, (mean_errors, spreads)


# ------------------------------------------------------------------------------------------ the GAN term
class VectorHead(nn.Module):
    """A realism head for the MLP denoiser's "hidden" vector (B, width): one Dense layer, logits (B,)."""

    @nn.compact
    def __call__(self, h):
        return nn.Dense(1)(h)[:, 0]


def mixture_setup(seed=0):
    generator, fake = MLPGenerator(z_dim=2), MLPDenoiser(sigma_data=0.5)
    g_params = generator.init(jax.random.key(seed), jnp.zeros((2, 2)))["params"]
    f_params = fake.init(jax.random.key(seed + 1), jnp.zeros((2, *SHAPE)), jnp.ones((2,)))["params"]
    return generator, fake, g_params, f_params


def test_gan_term_with_zero_weights_leaves_the_step_as_it_was():
    """With both GAN weights 0 the GAN term's gradients vanish: after 3 steps (SGD, 2 fake updates) the generator
    and the fake denoiser equal those of the step without the term (its draws of z, sigma and n are the same) and
    the head has not moved; the term's metrics are reported, the classifier's near 2 ln 2 (logits near 0)."""
    generator, fake, g_params, f_params = mixture_setup()
    gan = dm.GANTerm(VectorHead(), generator_weight=0.0, classifier_weight=0.0, feature="hidden")
    head = dm.init_head(gan, fake, f_params, jax.random.key(5))
    tx = optax.sgd(0.05)
    mesh = parallel.make_mesh(jax.devices()[:1])
    real = {"image": mixture_draws(WEIGHTS, MEANS.reshape(3, *SHAPE), STD, 64, seed=3)}
    states = {}
    for name, term, batch, head_params in (("plain", None, dm.latent_batch(64), None), ("gan", gan, real, head)):
        step = dm.make_dmd_step(generator, fake, TEACHER, tx, tx, mesh, jax.random.key(9), sigma_min=SIGMA_MIN,
                                sigma_max=SIGMA_MAX, fake_updates_per_step=2, gan=term)
        state = dm.init_state(g_params, f_params, tx, tx, head_params=head_params)
        for _ in range(3):
            state, metrics = step(state, batch, {})
        states[name] = (parallel.to_host(state), jax.tree.map(float, metrics.compute()))
    (plain, _), (with_gan, metrics) = states["plain"], states["gan"]
    for a, b in zip(jax.tree.leaves((plain.generator, plain.fake)), jax.tree.leaves((with_gan.generator,
                                                                                     with_gan.fake)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(with_gan.head), jax.tree.leaves(head), strict=True):
        np.testing.assert_array_equal(a, b)
    assert set(metrics) == set(dm.METRICS + dm.GAN_METRICS)
    assert abs(metrics["gan_classifier"] - 2 * np.log(2)) < 0.3 and metrics["gan_generator"] > 0


def test_gan_classifier_learns_real_mixture_draws_from_a_generator_that_is_not_the_mixture():
    """The GAN term's classifier (the fake denoiser's hidden layer and a Dense head, w_cls = 1, Adam 2e-3) against a
    generator held at its initialisation (learning rate 0; its samples' component means are >= 0.5 from the
    mixture's), 300 steps of batch 128 of fresh mixture draws: its logistic loss falls well below chance, 2 ln 2 =
    1.386, which it starts near. Measured: 1.355 over the first 10 steps, 0.779 over the last 50 (asserted: < 1.086).
    """
    generator, fake, g_params, f_params = mixture_setup()
    gan = dm.GANTerm(VectorHead(), generator_weight=0.0, classifier_weight=1.0, feature="hidden")
    tx_g, tx_fake = optax.sgd(0.0), optax.adam(2e-3)
    step = dm.make_dmd_step(generator, fake, TEACHER, tx_g, tx_fake, parallel.make_mesh(jax.devices()[:1]),
                            jax.random.key(4), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, fake_updates_per_step=1,
                            gan=gan)
    state = dm.init_state(g_params, f_params, tx_g, tx_fake, head_params=dm.init_head(gan, fake, f_params,
                                                                                     jax.random.key(5)))
    losses = []
    for i in range(300):
        real = {"image": mixture_draws(WEIGHTS, MEANS.reshape(3, *SHAPE), STD, 128, seed=100 + i)}
        state, metrics = step(state, real, {})
        losses.append(float(metrics.compute()["gan_classifier"]))
    first, last = np.mean(losses[:10]), np.mean(losses[-50:])
    assert abs(first - 2 * np.log(2)) < 0.2 and last < 2 * np.log(2) - 0.3, (first, last)


# --------------------------------------------------------------------------------- devices, resume
@pytest.mark.parametrize("with_gan", [False, True])
def test_step_on_8_devices_equals_1_and_resumes_bitwise(with_gan):
    """Plain SGD (a gradient 8 times too large would show), 2 fake updates, a network teacher (its variables the
    step's replicated constant), global batch 16: one step on 8 devices gives the 1-device generator, fake denoiser
    and metrics. On 1 device, a step from a state fetched to the host and put back equals the second step of an
    uninterrupted run bitwise (the draws are fold_in(key, step)). With the GAN term (both weights 0.5, the real
    images sharded over the devices) the same, the head included."""
    generator, fake = MLPGenerator(z_dim=3), MLPDenoiser(sigma_data=0.5)
    rng = np.random.default_rng(1)
    move = lambda tree: jax.tree.map(lambda v: v + np.float32(0.1) * rng.standard_normal(v.shape, np.float32), tree)
    g_params = generator.init(jax.random.key(0), jnp.zeros((2, 3)))["params"]
    f_params = move(fake.init(jax.random.key(1), jnp.zeros((2, *SHAPE)), jnp.ones((2,)))["params"])
    teacher_variables = {"params": move(f_params)}
    tx = optax.sgd(0.05)
    gan = dm.GANTerm(VectorHead(), 0.5, 0.5, feature="hidden") if with_gan else None
    head = dm.init_head(gan, fake, f_params, jax.random.key(2)) if with_gan else None
    start = jax.tree.map(np.asarray, dm.init_state(g_params, f_params, tx, tx, head_params=head))
    batch = ({"image": mixture_draws(WEIGHTS, MEANS.reshape(3, *SHAPE), STD, 16, seed=4)} if with_gan
             else dm.latent_batch(16))
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        step = dm.make_dmd_step(generator, fake, progressive.network_teacher(fake), tx, tx, mesh, jax.random.key(9),
                                sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, fake_updates_per_step=2, gan=gan)
        state, metrics = step(parallel.replicate(start, mesh), parallel.global_batch(batch, mesh),
                              parallel.replicate(teacher_variables, mesh))
        results.append((parallel.to_host(state), jax.tree.map(float, metrics.compute()), step, mesh))
    assert len(jax.devices()) == 8
    (one, metrics_one, step, mesh), (eight, metrics_eight, _, _) = results
    assert metrics_one["generator_loss"] > 0 and metrics_one["fake_loss"] > 0
    for name in dm.METRICS + (dm.GAN_METRICS if with_gan else ()):
        assert metrics_eight[name] == pytest.approx(metrics_one[name], rel=1e-5), name
    moving = ((one.generator, start.generator), (one.fake, start.fake)) + ((one.head, start.head),) * with_gan
    for moved, before in moving:
        assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(before))) > 1e-4
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    put = lambda tree: parallel.replicate(tree, mesh)
    straight, _ = step(step(put(start), put(batch), put(teacher_variables))[0], put(batch), put(teacher_variables))
    resumed, _ = step(put(one), put(batch), put(teacher_variables))
    for a, b in zip(jax.tree.leaves(parallel.to_host(straight)), jax.tree.leaves(parallel.to_host(resumed)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_batch_norm_generator_on_8_devices_equals_1_and_its_statistics_move():
    """A DCGAN generator (BatchNorm, statistics reduced over the data axis) at 16x16x1, 1 fake update, SGD: one step
    on 8 devices gives the 1-device parameters and running statistics, and the statistics moved from their
    initial values (the generator's own pass updates them)."""
    build = lambda axis: DCGANGenerator(z_dim=8, resolution=16, img_channels=1, width=4, width_max=8,
                                        bn_axis_name=axis)
    generator, fake = build(parallel.DATA_AXIS), MLPDenoiser(resolution=16, channels=1, sigma_data=0.5)
    variables = build(None).init(jax.random.key(0), jnp.zeros((2, 8)))
    f_params = fake.init(jax.random.key(1), jnp.zeros((2, 16, 16, 1)), jnp.ones((2,)))["params"]
    rng = np.random.default_rng(2)
    teacher_variables = {"params": jax.tree.map(lambda v: v + np.float32(0.05) * rng.standard_normal(v.shape,
                                                                                                     np.float32),
                                                f_params)}
    tx = optax.sgd(0.05)
    start = jax.tree.map(np.asarray, dm.init_state(variables["params"], f_params, tx, tx,
                                                   {"batch_stats": variables["batch_stats"]}))
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        step = dm.make_dmd_step(generator, fake, progressive.network_teacher(fake), tx, tx, mesh, jax.random.key(3),
                                sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, fake_updates_per_step=1)
        state, _ = step(parallel.replicate(start, mesh), parallel.global_batch(dm.latent_batch(16), mesh),
                        parallel.replicate(teacher_variables, mesh))
        results.append(parallel.to_host(state))
    one, eight = results
    assert set(one.generator_state) == {"batch_stats"}
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(one.generator_state),
                                                 jax.tree.leaves(start.generator_state))]
    assert min(moved) > 1e-4
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


class CountingGenerator(MLPGenerator):
    """An MLP generator with a mutable collection the step does not carry."""

    @nn.compact
    def __call__(self, z, labels=None, *, train=False, return_features=False):
        calls = self.variable("counters", "calls", lambda: jnp.zeros((), jnp.int32))
        calls.value += 1
        return super().__call__(z, labels, train=train, return_features=return_features)


# ---------------------------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize("case,message", [
    ("sigma_order", "sigma_min=10.0 and sigma_max=0.002 must satisfy 0 < sigma_min < sigma_max"),
    ("sigma_zero", "sigma_min=0.0 and sigma_max=10.0 must satisfy 0 < sigma_min < sigma_max"),
    ("no_fake_updates", "fake_updates_per_step=0 must be an integer >= 1"),
    ("fractional_fake_updates", "fake_updates_per_step=1.5 must be an integer >= 1"),
    ("fake_p_std", "fake_p_std=0.0 must be > 0"),
    ("channels", ("the generator makes images of shape (1, 1, 3) but the fake denoiser (and the teacher) works "
                  "on (1, 1, 2)")),
    ("resolution", ("the generator makes images of shape (2, 2, 2) but the fake denoiser (and the teacher) works "
                    "on (1, 1, 2)")),
    ("classes", "the generator has num_classes=10 but the fake denoiser (and the teacher) 0"),
    ("consistency_fake", ("the fake denoiser must be a denoiser with EDM preconditioning, got "
                          "parameterisation='consistency'")),
    ("counting_generator", "the generator has mutable collections ['counters']; the distribution-matching step "
                           "carries only its parameters and BatchNorm statistics ('batch_stats')"),
    ("generator_fields", "z_dim=0 and width=64 must be >= 1, depth=3 >= 0"),
    ("gan_weight", "the GAN term's weights must be >= 0, got generator_weight=-1.0 and classifier_weight=0.01"),
    ("gan_feature", "the fake denoiser has no feature 'mid' for the GAN term's head; it has ['hidden']"),
])
def test_bad_settings_fail_with_one_clear_error(case, message):
    g, f = MLPGenerator(), MLPDenoiser()
    mesh, key, tx = parallel.make_mesh(jax.devices()[:1]), jax.random.key(0), optax.sgd(0.1)
    make = lambda generator=g, fake=f, **kw: dm.make_dmd_step(generator, fake, TEACHER, tx, tx, mesh, key,
                                                              **{"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, **kw})
    calls = {
        "sigma_order": lambda: make(sigma_min=SIGMA_MAX, sigma_max=SIGMA_MIN),
        "sigma_zero": lambda: make(sigma_min=0.0),
        "no_fake_updates": lambda: make(fake_updates_per_step=0),
        "fractional_fake_updates": lambda: make(fake_updates_per_step=1.5),
        "fake_p_std": lambda: make(fake_p_std=0.0),
        "channels": lambda: make(generator=MLPGenerator(channels=3)),
        "resolution": lambda: make(generator=MLPGenerator(resolution=2)),
        "classes": lambda: make(generator=MLPGenerator(num_classes=10)),
        "consistency_fake": lambda: make(fake=MLPDenoiser(parameterisation="consistency")),
        "counting_generator": lambda: make(generator=CountingGenerator()),
        "generator_fields": lambda: MLPGenerator(z_dim=0).check(),
        "gan_weight": lambda: make(gan=dm.GANTerm(VectorHead(), generator_weight=-1.0)),
        "gan_feature": lambda: dm.init_head(dm.GANTerm(VectorHead()), f, f.init(key, jnp.zeros((2, *SHAPE)),
                                                                                jnp.ones((2,)))["params"], key),
    }
    with pytest.raises(ValueError, match=re.escape(message)):
        calls[case]()
