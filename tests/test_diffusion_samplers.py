"""The diffusion foundations against independent computations: the exact Gaussian-mixture denoiser against numerical
integration, the noise levels against their formulas, the samplers' evaluation counts by counting calls, DDIM
against Euler, the mixture recovered by Heun with the exact denoiser as the steps grow, Euler's first and Heun's
second order of convergence, and EDM's loss weighting by hand."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from kdjax import losses
from kdjax.models import diffusion_samplers as ds
from kdjax.models.edm import preconditioning
from kdjax.models.gaussian_mixture import GaussianMixture

WEIGHTS = np.array([0.5, 0.3, 0.2])
MEANS_2D = np.array([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]])  # three 1x1x2 "images"
STD = 0.3
MIXTURE = GaussianMixture(WEIGHTS, MEANS_2D.reshape(3, 1, 1, 2), STD)
LONGEST = 513  # every grid below is padded to this many levels: one compilation per sampler


@functools.partial(jax.jit, static_argnames="method")
def run(method, x, sigmas, num_steps):
    return ds.SAMPLERS[method](MIXTURE, x, sigmas, num_steps)


def solve(method, noise, num_steps, sigmas=None):
    """The samples of `method` over `num_steps` steps of its grid (or `sigmas`) from sigma_0 * noise, (n, 2)."""
    sigmas = ds.noise_levels(method, num_steps) if sigmas is None else sigmas
    y, nfe = run(method, sigmas[0] * noise, ds.padded(sigmas, LONGEST), jnp.int32(num_steps))
    return np.asarray(y).reshape(len(noise), -1), int(nfe)


def nearest(y, means):
    return np.argmin(((y[:, None] - means[None]) ** 2).sum(-1), axis=1)


# ----------------------------------------------------------------------------------------- the exact denoiser
def test_mixture_denoiser_against_quadrature_in_1d():
    """E[y | x] by scipy's adaptive quadrature of y p(y) N(x; y, sigma^2) over p(y) N(x; y, sigma^2), against
    D*(x; sigma), at noise levels from 0.01 to 20 and points between and beyond the components."""
    weights, means, s = np.array([0.2, 0.5, 0.3]), np.array([-1.0, 0.2, 1.5]), 0.25
    mixture = GaussianMixture(weights, means.reshape(3, 1, 1, 1), s)
    prior = lambda y: sum(w * np.exp(-(y - m) ** 2 / (2 * s * s)) / s for w, m in zip(weights, means))
    xs = np.array([-2.0, -0.4, 0.0, 0.7, 1.1, 3.0])
    def posterior_mean(x, sigma):
        likelihood = lambda y: prior(y) * np.exp(-(x - y) ** 2 / (2 * sigma * sigma))
        points = sorted({*means, x})
        num = integrate.quad(lambda y: y * likelihood(y), -8, 8, points=points, limit=200, epsabs=1e-13)[0]
        return num / integrate.quad(likelihood, -8, 8, points=points, limit=200, epsabs=1e-13)[0]

    for sigma in (0.01, 0.3, 1.0, 20.0):
        expected = [posterior_mean(x, sigma) for x in xs]
        got = np.asarray(mixture(jnp.asarray(xs).reshape(-1, 1, 1, 1), jnp.full((len(xs),), sigma))).ravel()
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5, err_msg=f"sigma={sigma}")


def test_mixture_denoiser_against_a_grid_sum_in_2d_and_given_the_component():
    """The same in 2-D (1x1x2 images) by a Riemann sum over a fine grid (exact to float precision for Gaussians),
    and the class-conditional denoiser against the sum over its one component."""
    step = 0.02
    axis = np.arange(-5, 5, step)
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    component = np.exp(-((grid[:, None] - MEANS_2D[None]) ** 2).sum(-1) / (2 * STD**2))  # (G, K), unnormalised
    xs = np.array([[0.0, 0.0], [-1.2, 0.4], [2.0, -2.0]])
    for sigma in (0.05, 0.8, 3.0):
        like = np.exp(-((xs[:, None] - grid[None]) ** 2).sum(-1) / (2 * sigma**2))  # (X, G)
        posterior = like[:, :, None] * component[None] * WEIGHTS  # (X, G, K)
        expected = np.einsum("xgk,gd->xd", posterior, grid) / posterior.sum((1, 2))[:, None]
        got = np.asarray(MIXTURE(jnp.asarray(xs).reshape(-1, 1, 1, 2), sigma)).reshape(-1, 2)
        np.testing.assert_allclose(got, expected, atol=3e-5, err_msg=f"sigma={sigma}")
        labels = np.array([2, 0, 1])
        given = np.einsum("xg,xgd->xd", posterior[np.arange(3), :, labels], np.broadcast_to(grid, (3, *grid.shape)))
        given = given / posterior[np.arange(3), :, labels].sum(1)[:, None]
        got = np.asarray(MIXTURE(jnp.asarray(xs).reshape(-1, 1, 1, 2), sigma, jnp.asarray(labels))).reshape(-1, 2)
        np.testing.assert_allclose(got, given, atol=3e-5)


def test_mixture_samples_have_its_weights_means_and_spread():
    images, components = MIXTURE.sample(jax.random.key(3), 20000)
    images, components = np.asarray(images).reshape(-1, 2), np.asarray(components)
    n = len(components)
    np.testing.assert_allclose(np.bincount(components) / n, WEIGHTS, atol=4 * np.sqrt(0.25 / n))
    for k in range(3):
        mine = images[components == k]
        np.testing.assert_allclose(mine.mean(0), MEANS_2D[k], atol=4 * STD / np.sqrt(len(mine)))
        np.testing.assert_allclose(mine.std(0), STD, rtol=0.05)


@pytest.mark.parametrize("weights,std,message", [
    ([0.5, 0.6, -0.1], 0.3, "must be > 0 and sum to 1"), ([0.4, 0.4, 0.2], -1.0, "std=-1.0 must be >= 0")])
def test_mixture_rejects_bad_weights_and_std(weights, std, message):
    with pytest.raises(ValueError, match=message):
        GaussianMixture(weights, MEANS_2D.reshape(3, 1, 1, 2), std)


# ----------------------------------------------------------------------------------------- noise levels and NFE
def test_noise_levels_against_their_formulas():
    rho, lo, hi = 7.0, 0.002, 80.0
    sigmas = np.asarray(ds.edm_sigmas(4))
    expected = [(hi ** (1 / rho) + i / 3 * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(4)] + [0.0]
    np.testing.assert_allclose(sigmas, expected, rtol=1e-6)
    assert sigmas[0] == np.float32(80.0) and np.isclose(sigmas[3], 0.002) and sigmas[4] == 0.0
    np.testing.assert_array_equal(ds.edm_sigmas(1), np.float32([80.0, 0.0]))
    betas = np.linspace(1e-4, 0.02, 1000)
    alphas = np.cumprod(1 - betas)
    ddpm = np.asarray(ds.ddpm_sigmas(3))  # timesteps 999, 500 (499.5 rounded to even), 0
    np.testing.assert_allclose(ddpm, [np.sqrt((1 - alphas[t]) / alphas[t]) for t in (999, 500, 0)] + [0.0], rtol=1e-5)
    assert 157 < ddpm[0] < 158 and abs(ddpm[2] - 0.01) < 1e-4
    with pytest.raises(ValueError, match="num_steps=0 must be an integer >= 1"):
        ds.edm_sigmas(0)


@pytest.mark.parametrize("method", ["heun", "euler", "ddim"])
def test_evaluations_are_counted_as_they_are_made(method):
    """Without jit the samplers' loops run in Python, so a denoiser that counts its calls counts the real NFE:
    Heun 2N - 1, Euler and DDIM N; the padded grid with num_steps gives the same samples."""
    x = jax.random.normal(jax.random.key(0), (4, 1, 1, 2))
    for num_steps in (1, 2, 5):
        calls = []

        def counting(x, sigma, calls=calls):
            calls.append(sigma)
            return MIXTURE(x, sigma)

        sigmas = ds.noise_levels(method, num_steps)
        with jax.disable_jit():
            y, nfe = ds.SAMPLERS[method](counting, sigmas[0] * x, sigmas)
            y_padded, nfe_padded = ds.SAMPLERS[method](MIXTURE, sigmas[0] * x, ds.padded(sigmas, 9), num_steps)
        expected = 2 * num_steps - 1 if method == "heun" else num_steps
        assert len(calls) == int(nfe) == int(nfe_padded) == ds.nfe(method, num_steps) == expected
        assert all(c.shape == (4,) and float(c[0]) > 0 for c in calls)  # sigma = 0 is never evaluated
        np.testing.assert_allclose(y_padded, y, rtol=1e-6, atol=1e-6)


def test_ddim_is_the_euler_step_on_the_same_noise_levels():
    """DDIM's variance-preserving update equals Euler's variance-exploding one on any grid (module docstring of
    diffusion_samplers); they differ only by rounding, and on their default grids they do differ."""
    noise = np.asarray(jax.random.normal(jax.random.key(1), (256, 1, 1, 2)))
    for grid in (ds.edm_sigmas(6), ds.ddpm_sigmas(6), ds.edm_sigmas(40)):
        y_ddim, n_ddim = solve("ddim", noise, grid.shape[0] - 1, grid)
        y_euler, n_euler = solve("euler", noise, grid.shape[0] - 1, grid)
        assert n_ddim == n_euler == grid.shape[0] - 1
        np.testing.assert_allclose(y_ddim, y_euler, atol=2e-5 * float(grid[0]))
    assert np.abs(solve("ddim", noise, 6)[0] - solve("euler", noise, 6)[0]).max() > 0.01


# ----------------------------------------------------------------------------------------- convergence
def test_samplers_recover_the_mixture_as_steps_grow():
    """Samples of the exact denoiser's ODE, assigned to their nearest mean. Against the mixture: the component
    masses and the means of the assigned samples are far off at few steps and, at many, match within the sampling
    error of 4096 draws. Against a 512-step Heun solution from the same noise (the ODE's own answer, free of
    sampling error): the share of samples that land on another component shrinks with every doubling of the steps.
    One step gives D(x; 80), about the data's mean for every sample (at sigma = 80 the responsibilities are nearly
    the weights)."""
    n = 4096
    noise = np.asarray(jax.random.normal(jax.random.key(2), (n, 1, 1, 2)))
    reference = nearest(solve("heun", noise, 512)[0], MEANS_2D)

    def errors(y):
        assigned = nearest(y, MEANS_2D)
        mass = np.abs(np.bincount(assigned, minlength=3) / n - WEIGHTS).max()
        means = max(np.linalg.norm(y[assigned == k].mean(0) - MEANS_2D[k]) if (assigned == k).any() else np.inf
                    for k in range(3))
        return mass, means, np.mean(assigned != reference)

    one_step, _ = solve("heun", noise, 1)
    np.testing.assert_allclose(one_step, np.broadcast_to(WEIGHTS @ MEANS_2D, (n, 2)), atol=0.15)
    mass_tol, mean_tol = 4 * np.sqrt(0.25 / n), 4 * STD / np.sqrt(WEIGHTS.min() * n)
    for method, steps in (("heun", (2, 4, 8, 16, 64)), ("euler", (4, 8, 16, 64, 256)), ("ddim", (4, 8, 16, 64, 256))):
        errs = np.array([errors(solve(method, noise, s)[0]) for s in steps])  # (steps, [mass, means, moved])
        assert errs[0, 0] > mass_tol and errs[0, 1] > 10 * mean_tol, (method, errs)
        assert errs[-1, 0] < mass_tol and errs[-1, 1] < mean_tol, (method, errs)
        moved = errs[:, 2]
        assert np.all((moved[1:] < moved[:-1]) | (moved[1:] == 0)) and moved[-1] < 0.005, (method, errs)


def test_euler_converges_to_heuns_answer_at_first_order_and_heun_at_second():
    """Median distance of each sample to a 512-step Heun solution from the same noise: halved per doubling of
    Euler's steps (first order), quartered per doubling of Heun's (second order)."""
    noise = np.asarray(jax.random.normal(jax.random.key(4), (1024, 1, 1, 2)))
    reference, _ = solve("heun", noise, 512)
    distance = lambda method, n: np.median(np.linalg.norm(solve(method, noise, n)[0] - reference, axis=1))
    euler = np.array([distance("euler", n) for n in (16, 32, 64, 128)])
    heun = np.array([distance("heun", n) for n in (16, 32, 64)])
    assert euler[-1] < 0.03 and heun[-1] < 0.005, (euler, heun)
    np.testing.assert_allclose(euler[:-1] / euler[1:], 2.0, rtol=0.2)
    assert np.all(heun[:-1] / heun[1:] > 3.5), heun


# ----------------------------------------------------------------------------------------- EDM's loss
def test_edm_loss_weighting_against_hand_computation():
    """sigma_data 0.5: lambda(0.5) = (0.25 + 0.25) / 0.25^2 = 8, lambda(2) = (4 + 0.25) / 1^2 = 4.25; errors of 0.1
    and 0.2 at every pixel give per-example losses 8 * 0.01 = 0.08 and 4.25 * 0.04 = 0.17, mean 0.125."""
    clean = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 2, 2, 1)), jnp.float32)
    denoised = clean + jnp.asarray([0.1, -0.2])[:, None, None, None]
    sigma = jnp.asarray([0.5, 2.0])
    np.testing.assert_allclose(losses.edm_weight(sigma, 0.5), [8.0, 4.25], rtol=1e-6)
    np.testing.assert_allclose(losses.edm_loss_per_example(denoised, clean, sigma, 0.5), [0.08, 0.17], rtol=1e-5)
    np.testing.assert_allclose(losses.edm_loss(denoised, clean, sigma, 0.5), 0.125, rtol=1e-5)
    # lambda = 1 / c_out^2: the weighted loss is the preconditioned network's unweighted error.
    _, c_out, _, _ = preconditioning(jnp.asarray([0.01, 0.5, 7.0]), 0.5)
    np.testing.assert_allclose(losses.edm_weight(jnp.asarray([0.01, 0.5, 7.0]), 0.5), 1 / c_out**2, rtol=1e-5)


def test_edm_loss_is_smallest_at_the_exact_denoiser():
    """E lambda ||D(y + sigma n; sigma) - y||^2 over the mixture's samples: the exact denoiser beats shrunk and
    shifted versions of itself (it is the minimiser, E[y | x])."""
    key_y, key_n, key_s = jax.random.split(jax.random.key(5), 3)
    y, _ = MIXTURE.sample(key_y, 20000)
    sigma = jnp.exp(-1.2 + 1.2 * jax.random.normal(key_s, (20000,)))
    x = y + sigma[:, None, None, None] * jax.random.normal(key_n, y.shape)
    exact = MIXTURE(x, sigma)
    best = float(losses.edm_loss(exact, y, sigma, 0.5))
    for other in (0.95 * exact, exact + 0.05, exact + 0.02 * (x - exact)):
        assert float(losses.edm_loss(other, y, sigma, 0.5)) > best
