"""Progressive distillation (Salimans & Ho 2022) of a diffusion denoiser, in EDM's variance-exploding sigma
parameterisation, data-parallel.

A teacher samples with N_T = 2N deterministic Euler (= DDIM, `kdjax.models.diffusion_samplers`) steps down a grid
sigma_0 > sigma_1 > ... > sigma_{2N} (the last may be 0). The student takes N steps down every other level,
sigma_0 > sigma_2 > ... > sigma_{2N}, and learns to make each of its steps equal two of the teacher's. For a clean
image y (the data), an index i uniform in {0, ..., N-1} and n ~ N(0, I), with s = sigma_{2i}, s_m = sigma_{2i+1},
s' = sigma_{2i+2} and x = y + s n:

    x_m = x + (s_m - s) (x - D_T(x; s)) / s,   x'' = x_m + (s' - s_m) (x_m - D_T(x_m; s_m)) / s_m,

two teacher steps. One student Euler step x' = x + (s' - s) (x - D_S(x; s)) / s lands on x'' exactly when

    D_S(x; s) = x_tilde = x - s (x'' - x) / (s' - s)            (`progressive_target`)

(for s' = 0 this is x'' itself: the last step returns the denoised image). The loss is EDM's, with x_tilde in place
of the clean image:

    L = mean_b lambda(s_b) ||D_S(x_b; s_b) - sg(x_tilde_b)||^2 / (H W C),   lambda(s) = (s^2 + s_d^2) / (s s_d)^2

(`losses.edm_loss_per_example`). Weighting: Salimans & Ho use "truncated SNR", max(SNR, 1) = max(1 / s^2, 1) in
this parameterisation, on the error of the denoised image; EDM's lambda = 1 / c_out^2 has the same two regimes (1 /
s^2 at low noise, the constant 1 / s_d^2 at high noise) joined smoothly at s ~ s_d rather than at s = 1, and it
makes the preconditioned network's own target unit-variance at every s, as in the teacher's training.

The student starts from the teacher's parameters (`init_state`); a stage's student, sampling with N steps, is the
next stage's teacher with grid sigma_0 > sigma_2 > ... (`stage_grid`), so a 64-step teacher becomes a 1-step
student in 6 stages. The teacher is frozen: its variables are an argument of the step (a constant), not state.

i and n are drawn for the global batch from fold_in(fold_in(key, step), DRAW_SALT) (`kdjax.steps.shell`); the
gradient is that of `lax.pmean(loss, DATA_AXIS)` (the shard_map gradient trap). An EMA of the parameters follows
them (`ema_decay`; 0 keeps the EMA equal to the parameters). Dropout, if the student has it, draws from the
per-device key fold_in(fold_in(key, step), device index).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from kdjax import losses
from kdjax.core.parallel import DATA_AXIS
from kdjax.models import diffusion_samplers
from kdjax.steps.diffusion import DiffusionState
from kdjax.steps.shell import DRAW_SALT, Draw, data_parallel_step

METRICS = ("loss",)

# A frozen teacher: (its variables, x (B, H, W, C), sigma (B,), labels (B,) or None) -> D_T(x; sigma).
Teacher = Callable[[Any, jax.Array, jax.Array, jax.Array | None], jax.Array]


def network_teacher(model: nn.Module) -> Teacher:
    """A denoiser network as a teacher: its variables are the step's constant."""
    return lambda variables, x, sigma, labels: model.apply(variables, x, sigma, labels)


def expand(v: jax.Array) -> jax.Array:
    """(B,) -> (B, 1, 1, 1), to scale images."""
    return v[:, None, None, None]


def progressive_target(denoise: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, sigma: jax.Array,
                       sigma_mid: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """x_tilde (module docstring): the denoised image whose one Euler step from `sigma` to `sigma_next` equals the
    teacher's two Euler steps sigma -> sigma_mid -> sigma_next. x (B, H, W, C); sigmas (B,), sigma > sigma_mid >
    0, sigma_next >= 0; `denoise(x, sigma)` the teacher. Two teacher evaluations."""
    x_mid = x + expand(sigma_mid - sigma) * (x - denoise(x, sigma)) / expand(sigma)
    x_two = x_mid + expand(sigma_next - sigma_mid) * (x_mid - denoise(x_mid, sigma_mid)) / expand(sigma_mid)
    return x - expand(sigma) * (x_two - x) / expand(sigma_next - sigma)


def stage_grid(base: jax.Array, teacher_steps: int) -> jax.Array:
    """The teacher's grid of a stage: every (N_0 / teacher_steps)-th level of the base grid of N_0 steps (N_0 + 1
    levels, e.g. `diffusion_samplers.edm_sigmas(64)`), teacher_steps + 1 levels; the student uses every other."""
    total = base.shape[0] - 1
    if teacher_steps < 2 or teacher_steps % 2 or total % teacher_steps:
        raise ValueError(f"teacher_steps={teacher_steps} must be even, >= 2 and divide the base grid's {total} "
                         "steps.")
    return base[:: total // teacher_steps]


def index_draw(key: jax.Array, image_shape: tuple[int, int, int], count: int) -> Draw:
    """The step's global draws: an index (B,) uniform in [0, count) and n (B, H, W, C) ~ N(0, I), from
    fold_in(fold_in(key, step), DRAW_SALT)."""
    def draw(step: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
        draw_key = jax.random.fold_in(jax.random.fold_in(key, step), DRAW_SALT)
        index = jax.random.randint(jax.random.fold_in(draw_key, 0), (batch_size,), 0, count)
        noise = jax.random.normal(jax.random.fold_in(draw_key, 1), (batch_size, *image_shape))
        return index, noise

    return draw


def init_state(params: Any, tx: optax.GradientTransformation) -> DiffusionState:
    """The student's initial state from the teacher's (or the previous stage's) parameters (copied: the state is
    donated to the step, the teacher's variables are not); the EMA equal to them."""
    params = jax.tree.map(jnp.copy, params)
    return DiffusionState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          ema=jax.tree.map(jnp.copy, params))


def make_progressive_step(student: nn.Module, teacher: Teacher, teacher_sigmas: jax.Array,
                          tx: optax.GradientTransformation, mesh: Mesh, key: jax.Array, *, ema_decay: float = 0.0
                          ) -> Callable:
    """The jitted data-parallel step `(state, batch, teacher_variables) -> (state, metrics)` (module docstring).

    Args:
      student: the denoiser network (kind "denoiser", EDM preconditioning).
      teacher: the frozen teacher (`network_teacher(model)`, or a `GaussianMixture` wrapped as
        `lambda v, x, s, l: mixture(x, s, l)`).
      teacher_sigmas: the teacher's grid, 2N + 1 decreasing levels (`stage_grid`); the student takes every other.
      key: the run's key; i and n from fold_in(fold_in(key, step), DRAW_SALT).
      ema_decay: ema <- decay * ema + (1 - decay) * params.
    `batch` holds "image" (B, H, W, C), the data y, and "label" (B,) (used when conditional).
    """
    spec = student.spec
    sigmas = jnp.asarray(teacher_sigmas, jnp.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 3 or sigmas.shape[0] % 2 == 0:
        raise ValueError(f"teacher_sigmas must hold 2N + 1 >= 3 levels (an even number of teacher steps), got "
                         f"shape {sigmas.shape}.")
    if getattr(student, "parameterisation", "edm") != "edm":
        raise ValueError("progressive distillation needs a student with EDM preconditioning (a denoiser), got "
                         f"parameterisation={student.parameterisation!r}.")
    student_steps = (sigmas.shape[0] - 1) // 2

    def per_device(state: DiffusionState, batch: dict, index: jax.Array, noise: jax.Array, teacher_variables: Any):
        device_key = jax.random.fold_in(jax.random.fold_in(key, state.step), jax.lax.axis_index(DATA_AXIS))
        clean = batch["image"]
        labels = batch["label"] if spec.num_classes else None
        sigma, sigma_mid, sigma_next = sigmas[2 * index], sigmas[2 * index + 1], sigmas[2 * index + 2]
        noisy = clean + expand(sigma) * noise
        target = jax.lax.stop_gradient(progressive_target(
            lambda x, s: teacher(teacher_variables, x, s, labels), noisy, sigma, sigma_mid, sigma_next))

        def loss_fn(params):
            denoised = student.apply({"params": params}, noisy, sigma, labels, train=True,
                                     rngs={"dropout": device_key})
            return jax.lax.pmean(losses.edm_loss(denoised, target, sigma, spec.sigma_data), DATA_AXIS)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = optax.incremental_update(params, state.ema, 1.0 - ema_decay)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), {"loss": loss}

    draw = index_draw(key, (spec.resolution, spec.resolution, spec.channels), student_steps)
    return data_parallel_step(per_device, mesh, METRICS, draw)


def student_sample(denoise: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, teacher_sigmas: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """The student's sampler: Euler (= DDIM) down every other level of its teacher's grid; (images, nfe = N)."""
    return diffusion_samplers.euler(denoise, x, jnp.asarray(teacher_sigmas)[::2])
