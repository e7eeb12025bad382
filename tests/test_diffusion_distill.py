"""Few-step and one-step students of a diffusion teacher, on the analytic Gaussian-mixture teacher
(`kdjax.models.gaussian_mixture`) and the tiny `mlp_denoiser`: the progressive-distillation target equals two
deterministic teacher steps; the consistency-distillation loss is 0 for the flow map of the teacher's Heun steps
(computed here, independently, in float64) and positive for a perturbed one, the true ODE flow map (a fine solve)
nearly so; the consistency student's boundary condition; the distances and the multistep sampler by hand; each
method, trained for a few hundred CPU steps, brings the student's few-step samples close to the mixture (per-
component mass and mean errors, exact given the samples) where the teacher's own sampler at the same NFE is far;
each step on 8 devices equals 1, a resumed step equals an uninterrupted one bitwise; bad settings fail clearly."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import losses
from kdjax.core import parallel
from kdjax.models import bundles
from kdjax.models import diffusion_samplers as ds
from kdjax.models.edm import consistency_preconditioning
from kdjax.models.gaussian_mixture import GaussianMixture
from kdjax.models.mlp_denoiser import MLPDenoiser
from kdjax.steps import consistency, progressive

WEIGHTS = np.array([0.5, 0.3, 0.2])
MEANS = np.array([[-0.8, -0.4], [0.6, 0.6], [0.4, -0.8]])  # three 1x1x2 "images", >= 1.26 apart
STD = 0.1
MIXTURE = GaussianMixture(WEIGHTS, MEANS.reshape(3, 1, 1, 2), STD)
TEACHER = lambda variables, x, sigma, labels: MIXTURE(x, sigma, labels)
SIGMA_MAX, SIGMA_MIN = 10.0, 0.002  # the data's scale is ~0.6: sigma_max = 10 hides it
SHAPE = (1, 1, 2)
NUM_SAMPLES = 2000  # each component's sample mass has a standard error <= sqrt(0.25 / 2000) = 0.011


@pytest.fixture(scope="module")
def student():
    """The EDM-preconditioned MLP student, its initial parameters, and the same parameters moved off their initial
    values (so F is not 0)."""
    model = MLPDenoiser(sigma_data=0.5)
    params = jax.jit(lambda k: model.init(k, jnp.zeros((2, *SHAPE)), jnp.ones((2,))))(
        jax.random.key(0, impl="rbg"))["params"]
    rng = np.random.default_rng(1)
    moved = jax.tree.map(lambda v: v + np.float32(0.1) * rng.standard_normal(v.shape, np.float32), params)
    return model, params, moved


def mixture_errors(samples):
    """(largest |sample mass - w_k|, largest ||sample mean - mu_k||) with samples assigned to the nearest mean
    (the components are >= 1.26 apart and have std 0.1: a mixture sample is assigned to its own component)."""
    y = np.asarray(samples, np.float64).reshape(len(samples), -1)
    nearest = np.argmin(((y[:, None] - MEANS[None]) ** 2).sum(-1), axis=1)
    mass = np.bincount(nearest, minlength=3) / len(y)
    means = np.array([y[nearest == k].mean(0) if np.any(nearest == k) else np.full(2, np.inf) for k in range(3)])
    return float(np.abs(mass - WEIGHTS).max()), float(np.linalg.norm(means - MEANS, axis=1).max())


def mixture_draws(weights, means, std, count, seed):
    """`count` draws of sum_k w_k N(mu_k, std^2 I) by numpy, (count, *image shape) float32."""
    rng = np.random.default_rng(seed)
    components = rng.choice(len(weights), size=count, p=weights)
    return (means[components] + std * rng.standard_normal((count, *means.shape[1:]))).astype(np.float32)


DATA = mixture_draws(WEIGHTS, MEANS.reshape(3, *SHAPE), STD, 8192, 1)  # the students' training data


def train(step, state, teacher_variables, num_steps, batch_size=128):
    """`num_steps` steps over a fixed set of mixture samples, in order."""
    data = DATA
    labels = np.zeros((batch_size,), np.int32)
    for i in range(num_steps):
        rows = (np.arange(batch_size) + i * batch_size) % len(data)
        state, _ = step(state, {"image": data[rows], "label": labels}, teacher_variables)
    return state


# ------------------------------------------------------------------------------------- progressive distillation
def test_progressive_target_is_two_teacher_steps():
    """On random images and random levels per example (the last step to 0 included), one Euler step with the target
    x_tilde lands where the samplers' own Euler (`diffusion_samplers.euler`) lands after two teacher steps over
    (s, s_m, s'), row by row; for s' = 0 the target is that point itself."""
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 2.0, (6, *SHAPE)).astype(np.float32)
    sigma = np.array([8.0, 3.0, 1.0, 0.5, 0.2, 0.05], np.float32)
    sigma_mid = (sigma * rng.uniform(0.2, 0.8, 6)).astype(np.float32)
    sigma_next = np.array([2.0, 0.0, 0.1, 0.0, 0.01, 0.002], np.float32) * (sigma_mid > 0)
    target = progressive.progressive_target(MIXTURE, jnp.asarray(x), jnp.asarray(sigma), jnp.asarray(sigma_mid),
                                            jnp.asarray(sigma_next))
    one_step = x + (sigma_next - sigma)[:, None, None, None] * (x - np.asarray(target)) / sigma[:, None, None, None]
    euler = jax.jit(lambda row, grid: ds.euler(MIXTURE, row, grid))  # one compilation for the six rows
    for b in range(6):
        two_steps, nfe = euler(jnp.asarray(x[b:b + 1]), jnp.asarray([sigma[b], sigma_mid[b], sigma_next[b]]))
        assert int(nfe) == 2
        np.testing.assert_allclose(one_step[b], np.asarray(two_steps)[0], rtol=2e-5, atol=2e-5)
        if sigma_next[b] == 0:
            np.testing.assert_allclose(np.asarray(target)[b], np.asarray(two_steps)[0], rtol=1e-5, atol=1e-6)


def test_stage_grids_halve_down_to_one_step():
    """A 64-step base grid: each stage's student grid (every other level) is the next stage's teacher grid, down to
    the 1-step student (sigma_max, 0); a step count that does not halve the base grid is refused."""
    base = ds.edm_sigmas(64)
    grids = {n: progressive.stage_grid(base, n) for n in (64, 32, 16, 8, 4, 2)}
    for n in (64, 32, 16, 8, 4):
        np.testing.assert_array_equal(grids[n][::2], grids[n // 2])
    np.testing.assert_array_equal(grids[2][::2], [80.0, 0.0])
    with pytest.raises(ValueError, match="teacher_steps=6 must be even, >= 2 and divide the base grid's 64 steps"):
        progressive.stage_grid(base, 6)


def test_progressive_distillation_in_two_stages_on_the_mixture(student):
    """Mixture teacher, Euler on 8 levels -> a 4-step MLP student (150 Adam steps) -> its own 2-step student (150
    steps, initialised from and taught by the first). The 2-step student's samples (2 NFE) against the mixture:
    mass error < 0.06 and mean error < 0.2, where the teacher's own Euler at the same 2 NFE makes 0.12 and 0.27
    (asserted: above the thresholds), the untrained student 0.17 and 0.66, and the 8-step teacher it distils 0.007
    and 0.11 (its floor: the student copies the 8-step sampler, bias included). Measured: 0.024 and 0.16. With
    2000 samples a mass has a standard error <= 0.011: the mass threshold is 3 of them above the measured value and
    5 below the teacher's; the mean threshold sits half-way between the 8-step floor and the 2-step teacher."""
    model, params, _ = student
    tx = optax.adam(4e-3)
    mesh = parallel.make_mesh(jax.devices()[:1])
    base = ds.edm_sigmas(8, SIGMA_MIN, SIGMA_MAX)
    first = progressive.make_progressive_step(model, TEACHER, progressive.stage_grid(base, 8), tx, mesh,
                                              jax.random.key(3))
    four = train(first, progressive.init_state(params, tx), {}, 150).params
    second = progressive.make_progressive_step(model, progressive.network_teacher(model),
                                               progressive.stage_grid(base, 4), tx, mesh, jax.random.key(4))
    two = train(second, progressive.init_state(four, tx), {"params": four}, 150).params

    @jax.jit  # one compilation for the student's sampler and the teacher's
    def sample():
        x = SIGMA_MAX * jax.random.normal(jax.random.key(7), (NUM_SAMPLES, *SHAPE))
        return (progressive.student_sample(lambda v, s: model.apply({"params": two}, v, s), x,
                                           progressive.stage_grid(base, 4)), ds.euler(MIXTURE, x, base[::4]))

    (samples, nfe), (teacher_samples, teacher_nfe) = sample()
    assert int(nfe) == int(teacher_nfe) == 2
    mass, mean = mixture_errors(samples)
    teacher_mass, teacher_mean = mixture_errors(teacher_samples)
    assert teacher_mass > 0.1 and teacher_mean > 0.25, (teacher_mass, teacher_mean)
    assert mass < 0.06 and mean < 0.2, (mass, mean, teacher_mass, teacher_mean)


# ------------------------------------------------------------------------------------- consistency distillation
def test_consistency_coefficients_and_boundary_condition(student):
    """c_skip and c_out by their formulas at hand values; with every parameter moved (F != 0), the consistency MLP
    returns x itself at sigma_min and something else above it, and the EDM one is not the identity at sigma_min."""
    c_skip, c_out, _, _ = consistency_preconditioning(jnp.array([0.002, 0.502, 2.0]), 0.5, 0.002)
    np.testing.assert_allclose(c_skip, [1.0, 0.5, 0.25 / (1.998**2 + 0.25)], rtol=1e-6)
    np.testing.assert_allclose(c_out, [0.0, 0.5 * 0.5 / np.sqrt(0.25 + 0.502**2), 0.5 * 1.998 / np.sqrt(4.25)],
                               rtol=1e-6, atol=1e-9)
    model, _, moved = student
    cm = model.clone(parameterisation="consistency")
    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, *SHAPE)), jnp.float32)
    at = jax.jit(lambda sigma: (cm.apply({"params": moved}, x, sigma), model.apply({"params": moved}, x, sigma)))
    consistent, denoised = at(jnp.float32(SIGMA_MIN))
    np.testing.assert_array_equal(consistent, x)
    assert np.abs(np.asarray(denoised) - np.asarray(x)).max() > 1e-4
    assert np.abs(np.asarray(at(jnp.float32(0.5))[0]) - np.asarray(x)).min() > 1e-3


def test_distances_against_hand_computation():
    """L2: ||a - b||^2 / d; pseudo-Huber: sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(d) or given; the batch
    loss their mean; an unknown distance refused."""
    a = np.array([[[[1.0, 2.0]], [[0.0, -1.0]]], [[[0.5, 0.5]], [[0.5, 0.5]]]], np.float32)  # (2, 2, 1, 2)
    b = np.zeros_like(a)
    sq = np.array([1 + 4 + 0 + 1, 4 * 0.25])
    np.testing.assert_allclose(losses.squared_l2_per_example(a, b), sq / 4, rtol=1e-6)
    c = 0.00054 * 2.0  # sqrt(d) = sqrt(4)
    np.testing.assert_allclose(losses.pseudo_huber_per_example(a, b), np.sqrt(sq + c**2) - c, rtol=1e-6)
    np.testing.assert_allclose(losses.pseudo_huber_per_example(a, b, 1.0), np.sqrt(sq + 1) - 1, rtol=1e-6)
    np.testing.assert_allclose(losses.consistency_loss(a, b, "pseudo_huber"), np.mean(np.sqrt(sq + c**2) - c),
                               rtol=1e-6)
    with pytest.raises(ValueError, match=r"distance='l1'; valid: \['l2', 'pseudo_huber'\]"):
        losses.consistency_loss(a, b, "l1")


# A 1-D mixture and its exact denoiser in float64, written here independently of `GaussianMixture`.
W1, M1, S1 = np.array([0.3, 0.7]), np.array([-1.0, 0.8]), 0.2
MIXTURE_1D = GaussianMixture(W1, M1.reshape(2, 1, 1, 1), S1)


def denoise_1d(x, sigma):
    var = S1**2 + sigma**2
    logits = np.log(W1)[None] - (x[:, None] - M1[None]) ** 2 / (2 * var)
    r = np.exp(logits - logits.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    shrink = S1**2 / var
    return (1 - shrink) * (r @ M1) + shrink * x


def heun_1d(x, s, s_next):
    d = (x - denoise_1d(x, s)) / s
    x_euler = x + (s_next - s) * d
    return x + (s_next - s) * 0.5 * (d + (x_euler - denoise_1d(x_euler, s_next)) / s_next)


def flow_map(x, start, levels, substeps):
    """x carried by Heun from levels[start_b] down to levels[-1], each interval in `substeps` geometric sub-steps
    (1: the teacher's own discretisation; many: the ODE's exact flow map, to float64 accuracy)."""
    x = np.array(x, np.float64)
    for k in range(len(levels) - 1):
        fine = np.geomspace(levels[k], levels[k + 1], substeps + 1)
        moving = start <= k
        for s, s_next in zip(fine[:-1], fine[1:]):
            x = np.where(moving, heun_1d(x, s, s_next), x)
    return x


def test_consistency_loss_vanishes_at_the_flow_map():
    """The step's pair (x = y + s_n z, x_hat = the step's Heun teacher step to s_{n+1}) on a 1-D mixture over the CM
    paper's 18 levels: the loss of the flow map of the teacher's Heun steps (computed in float64 here) is 0 up to the
    float32 rounding of x_hat (measured 1e-15 for L2); perturbing it by 0.2 tanh(x) (sigma - sigma_min) / (sigma +
    0.5), which keeps the boundary condition, gives a loss > 1e6 times larger (2e-4); the true ODE flow map (32 Heun
    sub-steps per interval) is nearly consistent, < 0.1 of the perturbed loss (measured 0.01 for L2, 0.05 for
    pseudo-Huber: the teacher's single Heun steps are not exact; on 8 levels it is no better than the perturbation)."""
    levels = np.asarray(consistency.consistency_levels(18, SIGMA_MIN, SIGMA_MAX), np.float64)
    rng = np.random.default_rng(3)
    y = mixture_draws(W1, M1.reshape(2, 1), S1, 256, 5).reshape(-1)
    n = rng.integers(0, len(levels) - 1, 256)
    x = (y + levels[n] * rng.standard_normal(256)).astype(np.float32)
    x_hat = np.asarray(consistency.heun_step(MIXTURE_1D, jnp.asarray(x).reshape(-1, 1, 1, 1),
                                             jnp.asarray(levels[n], jnp.float32),
                                             jnp.asarray(levels[n + 1], jnp.float32))).reshape(-1)
    as_image = lambda v: jnp.asarray(v, jnp.float32).reshape(-1, 1, 1, 1)
    perturb = lambda v, k: 0.2 * np.tanh(v) * (levels[k] - SIGMA_MIN) / (levels[k] + 0.5)
    grid_x, grid_hat = flow_map(x, n, levels, 1), flow_map(x_hat, n + 1, levels, 1)
    true_x, true_hat = flow_map(x, n, levels, 32), flow_map(x_hat, n + 1, levels, 32)
    for distance in ("l2", "pseudo_huber"):
        def loss(f_x, f_hat, distance=distance):
            return float(losses.consistency_loss(as_image(f_x), as_image(f_hat), distance))

        exact, true = loss(grid_x, grid_hat), loss(true_x, true_hat)
        perturbed = loss(grid_x + perturb(x, n), grid_hat + perturb(x_hat, n + 1))
        assert exact < 1e-6 * perturbed and true < 0.1 * perturbed, (distance, exact, true, perturbed)


def test_multistep_consistency_sampling_by_hand():
    """With f the identity, Algorithm 1 returns sigma_0 n_0 + sum_k sqrt(tau_k^2 - sigma_min^2) n_k, n_k from
    fold_in(key, k); nfe = the number of levels."""
    key, taus = jax.random.key(4), np.array([10.0, 2.0, 0.5], np.float32)
    images, nfe = ds.consistency_sample(lambda x, s: x, key, (3, *SHAPE), jnp.asarray(taus), SIGMA_MIN)
    noise = [np.asarray(jax.random.normal(jax.random.fold_in(key, k), (3, *SHAPE))) for k in range(3)]
    expected = taus[0] * noise[0] + sum(np.sqrt(taus[k] ** 2 - SIGMA_MIN**2) * noise[k] for k in (1, 2))
    np.testing.assert_allclose(images, expected, rtol=1e-5, atol=1e-5)
    assert int(nfe) == 3


def test_consistency_distillation_on_the_mixture(student):
    """Mixture teacher, 10 levels, pseudo-Huber, target EMA 0.95, a consistency MLP from the student's
    initialisation, 300 Adam steps. One-step samples (1 NFE) and two-step samples (re-noised to 0.8, 2 NFE) of the
    target network against the mixture: mass error < 0.05 and mean error < 0.1. The teacher's own Heun at 1 NFE
    (D(x; sigma_max): every sample near the data mean, a component left without samples, so an infinite mean error)
    makes 0.47 and inf (asserted: far above), the untrained student 0.48 and 0.86. Measured: 0.011 and 0.036 in one
    step, 0.016 and 0.055 in two (the 10-level Heun teacher's discretisation is the floor)."""
    model, params, _ = student
    cm = model.clone(parameterisation="consistency", sigma_min=SIGMA_MIN)
    tx = optax.adam(4e-3)
    levels = consistency.consistency_levels(10, SIGMA_MIN, SIGMA_MAX)
    step = consistency.make_consistency_step(cm, TEACHER, levels, tx, parallel.make_mesh(jax.devices()[:1]),
                                             jax.random.key(5), distance="pseudo_huber", target_decay=0.95)
    target = train(step, consistency.init_state(params, tx), {}, 300).target
    key, shape = jax.random.key(7), (NUM_SAMPLES, *SHAPE)
    all_taus = ([SIGMA_MAX], [SIGMA_MAX, 0.8])

    @jax.jit  # one compilation for the student's two samplers and the teacher's
    def sample():
        student = [ds.consistency_sample(lambda x, s: cm.apply({"params": target}, x, s), key, shape,
                                         jnp.asarray(taus), SIGMA_MIN) for taus in all_taus]
        x = SIGMA_MAX * jax.random.normal(jax.random.fold_in(key, 0), shape)
        return student, ds.heun(MIXTURE, x, ds.edm_sigmas(1, SIGMA_MIN, SIGMA_MAX))

    student_samples, (teacher_samples, teacher_nfe) = sample()
    for taus, (samples, nfe) in zip(all_taus, student_samples, strict=True):
        assert int(nfe) == len(taus)
        mass, mean = mixture_errors(samples)
        assert mass < 0.05 and mean < 0.1, (taus, mass, mean)
    assert int(teacher_nfe) == 1
    teacher_mass, teacher_mean = mixture_errors(teacher_samples)
    assert teacher_mass > 0.4 and teacher_mean > 0.5, (teacher_mass, teacher_mean)


def test_a_consistency_student_saves_and_loads_as_a_bundle(student, tmp_path):
    """The consistency MLP is a registered denoiser: its bundle records the parameterisation and loads to the same
    function."""
    _, _, moved = student
    kwargs = dict(sigma_data=0.5, parameterisation="consistency", sigma_min=SIGMA_MIN)
    bundles.save_model_bundle(tmp_path / "cm", "mlp_denoiser", kwargs, {"params": moved})
    assert bundles.check_model_bundle(tmp_path / "cm", "student", kind="denoiser")["model"] == "mlp_denoiser"
    loaded, variables, _ = bundles.load_model(tmp_path / "cm")
    x = jnp.ones((2, *SHAPE))
    np.testing.assert_array_equal(loaded.apply(variables, x, 0.7), MLPDenoiser(**kwargs).apply({"params": moved}, x,
                                                                                                0.7))


# --------------------------------------------------------------------------------- both steps: devices, resume
@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_step_on_8_devices_equals_1_and_resumes_bitwise(student, method):
    """One plain-SGD step (a gradient 8 times too large would show) on a batch of 16 from the same state: 8 devices
    give the 1-device parameters, EMA / target network and loss. On 1 device, a step from a state fetched to the host
    and put back equals the second step of an uninterrupted run bitwise (the draws are fold_in(key, step))."""
    model, params, moved = student
    tx = optax.sgd(0.05)
    key = jax.random.key(9)
    if method == "progressive":  # a network teacher: its variables are the step's replicated constant
        make = lambda mesh: progressive.make_progressive_step(
            model, progressive.network_teacher(model), ds.edm_sigmas(4, SIGMA_MIN, SIGMA_MAX), tx, mesh, key,
            ema_decay=0.9)
        start, teacher_variables = jax.tree.map(np.asarray, progressive.init_state(moved, tx)), {"params": params}
    else:
        cm = model.clone(parameterisation="consistency", sigma_min=SIGMA_MIN)
        make = lambda mesh: consistency.make_consistency_step(
            cm, TEACHER, consistency.consistency_levels(6, SIGMA_MIN, SIGMA_MAX), tx, mesh, key, distance="l2",
            target_decay=0.9)
        start, teacher_variables = jax.tree.map(np.asarray, consistency.init_state(moved, tx)), {}
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(0.0, 0.6, (16, *SHAPE)).astype(np.float32), "label": np.zeros((16,), np.int32)}
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        step = make(mesh)
        state, metrics = step(parallel.replicate(start, mesh), parallel.global_batch(batch, mesh),
                              parallel.replicate(teacher_variables, mesh))
        results.append((parallel.to_host(state), float(metrics.compute()["loss"]), step, mesh))
    assert len(jax.devices()) == 8
    (one, loss_one, step, mesh), (eight, loss_eight, _, _) = results
    assert loss_one > 0 and loss_eight == pytest.approx(loss_one, rel=1e-5)
    moved_by = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(start.params))]
    assert max(moved_by) > 1e-4
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    put = lambda tree: parallel.replicate(tree, mesh)
    straight, _ = step(step(put(start), put(batch), put(teacher_variables))[0], put(batch), put(teacher_variables))
    resumed, _ = step(put(one), put(batch), put(teacher_variables))
    for a, b in zip(jax.tree.leaves(parallel.to_host(straight)), jax.tree.leaves(parallel.to_host(resumed)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize("case,message", [
    ("pd_consistency_student", "progressive distillation needs a student with EDM preconditioning"),
    ("pd_even_grid", "teacher_sigmas must hold 2N + 1 >= 3 levels (an even number of teacher steps), got shape (4,)"),
    ("cd_edm_student", "consistency distillation needs a student with parameterisation='consistency'"),
    ("cd_levels_end", "levels must be >= 2 decreasing noise levels ending at the student's sigma_min=0.002"),
    ("cd_distance", "distance='l1'; valid: ['l2', 'pseudo_huber']"),
    ("cd_decay", "target_decay=1.0 must be in [0, 1)"),
    ("mlp_parameterisation", "parameterisation='ve'; valid: ['edm', 'consistency']"),
])
def test_bad_settings_fail_with_one_clear_error(case, message):
    edm, cm = MLPDenoiser(), MLPDenoiser(parameterisation="consistency")
    mesh, key, tx = parallel.make_mesh(jax.devices()[:1]), jax.random.key(0), optax.sgd(0.1)
    levels = consistency.consistency_levels(4, SIGMA_MIN, SIGMA_MAX)
    calls = {
        "pd_consistency_student": lambda: progressive.make_progressive_step(cm, TEACHER, ds.edm_sigmas(4), tx, mesh,
                                                                            key),
        "pd_even_grid": lambda: progressive.make_progressive_step(edm, TEACHER, ds.edm_sigmas(3), tx, mesh, key),
        "cd_edm_student": lambda: consistency.make_consistency_step(edm, TEACHER, levels, tx, mesh, key),
        "cd_levels_end": lambda: consistency.make_consistency_step(cm, TEACHER, levels[:-1], tx, mesh, key),
        "cd_distance": lambda: consistency.make_consistency_step(cm, TEACHER, levels, tx, mesh, key, distance="l1"),
        "cd_decay": lambda: consistency.make_consistency_step(cm, TEACHER, levels, tx, mesh, key, target_decay=1.0),
        "mlp_parameterisation": lambda: MLPDenoiser(parameterisation="ve").check(),
    }
    with pytest.raises(ValueError, match=re.escape(message)):
        calls[case]()
