"""Consistency distillation (Song, Dhariwal, Chen & Sutskever 2023, Algorithm 2) of a diffusion denoiser teacher,
data-parallel.

The student is a consistency function f_theta(x; sigma) = c_skip(sigma) x + c_out(sigma) F_theta(x; sigma) with
the consistency models' coefficients (`kdjax.models.edm.consistency_preconditioning`: c_skip(sigma_min) = 1,
c_out(sigma_min) = 0, so f(x; sigma_min) = x, the boundary condition), e.g. `mlp_denoiser` or any denoiser model
with `parameterisation="consistency"`. It learns to map every point of a probability-flow ODE trajectory to the
trajectory's end at sigma_min. On a decreasing grid sigma_0 = sigma_max > ... > sigma_{K-1} = sigma_min (EDM's
levels without the final 0, `consistency_levels`), for a clean image y, an index n uniform in {0, ..., K-2} and
z ~ N(0, I), with s = sigma_n > s' = sigma_{n+1}:

    x = y + s z,   x_hat = one Heun step of the teacher's ODE dx/dsigma = (x - D_T(x; sigma)) / sigma from s to s'
                   (`heun_step`, two teacher evaluations),

    L = mean_b d(f_theta(x_b; s_b), sg(f_target(x_hat_b; s'_b)))            (`losses.consistency_loss`),

d = squared L2 or pseudo-Huber (`losses.CONSISTENCY_DISTANCES`), lambda = 1 as in the paper. The target network's
parameters are an exponential moving average of the student's, theta^- <- mu theta^- + (1 - mu) theta after each
optimizer step (`optax.incremental_update`), kept in the state and never trained. A function with f(x; s) =
f(x_hat; s') along every teacher step and f(x; sigma_min) = x is the flow map of the teacher's Heun discretisation,
which makes L = 0 (tested). The student starts from the teacher's parameters when it has the same network (the
paper's initialisation), or from its own initialisation; the target starts equal to it.

Images come from `diffusion_samplers.consistency_sample` (one step, or a few with re-noising, Algorithm 1).

n and z are drawn for the global batch from fold_in(fold_in(key, step), DRAW_SALT) (`kdjax.steps.shell`); the
gradient is that of `lax.pmean(loss, DATA_AXIS)` (the shard_map gradient trap). Dropout, if the student has it,
draws from fold_in(fold_in(key, step), device index); the target network runs without dropout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from kdjax import losses
from kdjax.core.parallel import DATA_AXIS
from kdjax.models import diffusion_samplers
from kdjax.steps.progressive import Teacher, expand, index_draw
from kdjax.steps.shell import data_parallel_step

METRICS = ("loss",)


@flax.struct.dataclass
class ConsistencyState:
    step: jax.Array  # int32 scalar; every random draw is fold_in(key, step)
    params: Any  # the student theta
    opt_state: Any
    target: Any  # theta^-: the EMA of theta the loss's target is computed with (not trained)


def init_state(params: Any, tx: optax.GradientTransformation) -> ConsistencyState:
    """The initial state from the student's initial parameters (the teacher's, when it has the same network);
    the target network equal to them."""
    params = jax.tree.map(jnp.copy, params)
    return ConsistencyState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                            target=jax.tree.map(jnp.copy, params))


def consistency_levels(num_levels: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
                       ) -> jax.Array:
    """The K = num_levels >= 2 decreasing levels sigma_max ... sigma_min (EDM's rho schedule without its final 0)."""
    if num_levels < 2:
        raise ValueError(f"num_levels={num_levels} must be >= 2.")
    return diffusion_samplers.edm_sigmas(num_levels, sigma_min, sigma_max, rho)[:-1]


def heun_step(denoise: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, sigma: jax.Array,
              sigma_next: jax.Array) -> jax.Array:
    """One Heun step of dx/dsigma = (x - D(x; sigma)) / sigma from sigma to sigma_next > 0, per example (sigmas
    (B,)): d = (x - D(x; s)) / s, x_e = x + (s' - s) d, d' = (x_e - D(x_e; s')) / s', x + (s' - s) (d + d') / 2."""
    d = (x - denoise(x, sigma)) / expand(sigma)
    x_euler = x + expand(sigma_next - sigma) * d
    d_next = (x_euler - denoise(x_euler, sigma_next)) / expand(sigma_next)
    return x + expand(sigma_next - sigma) * 0.5 * (d + d_next)


def make_consistency_step(student: nn.Module, teacher: Teacher, levels: jax.Array, tx: optax.GradientTransformation,
                          mesh: Mesh, key: jax.Array, *, distance: str = "pseudo_huber", target_decay: float = 0.95
                          ) -> Callable:
    """The jitted data-parallel step `(state, batch, teacher_variables) -> (state, metrics)` (module docstring).

    Args:
      student: a denoiser-kind model with `parameterisation="consistency"` and `sigma_min` = levels[-1].
      teacher: the frozen teacher (`progressive.network_teacher(model)`, or a wrapped `GaussianMixture`).
      levels: K decreasing levels > 0 (`consistency_levels`).
      distance: "l2" or "pseudo_huber" (`losses.CONSISTENCY_DISTANCES`).
      target_decay: mu, the target network's EMA decay (the CM paper's CD uses 0.95 on CIFAR-10).
    `batch` holds "image" (B, H, W, C), the data y, and "label" (B,) (used when conditional).
    """
    spec = student.spec
    levels = jnp.asarray(levels, jnp.float32)
    if getattr(student, "parameterisation", "edm") != "consistency":
        raise ValueError("consistency distillation needs a student with parameterisation='consistency' (f(x; "
                         f"sigma_min) = x), got {getattr(student, 'parameterisation', 'edm')!r}.")
    if levels.ndim != 1 or levels.shape[0] < 2 or abs(float(levels[-1]) - student.sigma_min) > 1e-6 * student.sigma_min:
        raise ValueError(f"levels must be >= 2 decreasing noise levels ending at the student's sigma_min="
                         f"{student.sigma_min}, got shape {levels.shape} ending at {float(levels[-1])}.")
    if distance not in losses.CONSISTENCY_DISTANCES:
        raise ValueError(f"distance={distance!r}; valid: {list(losses.CONSISTENCY_DISTANCES)}.")
    if not 0.0 <= target_decay < 1.0:
        raise ValueError(f"target_decay={target_decay} must be in [0, 1).")

    def per_device(state: ConsistencyState, batch: dict, index: jax.Array, noise: jax.Array, teacher_variables: Any):
        device_key = jax.random.fold_in(jax.random.fold_in(key, state.step), jax.lax.axis_index(DATA_AXIS))
        clean = batch["image"]
        labels = batch["label"] if spec.num_classes else None
        sigma, sigma_next = levels[index], levels[index + 1]
        noisy = clean + expand(sigma) * noise
        x_hat = heun_step(lambda x, s: teacher(teacher_variables, x, s, labels), noisy, sigma, sigma_next)
        target = jax.lax.stop_gradient(student.apply({"params": state.target}, x_hat, sigma_next, labels))

        def loss_fn(params):
            f = student.apply({"params": params}, noisy, sigma, labels, train=True, rngs={"dropout": device_key})
            return jax.lax.pmean(losses.consistency_loss(f, target, distance), DATA_AXIS)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        target_params = optax.incremental_update(params, state.target, 1.0 - target_decay)
        return (state.replace(step=state.step + 1, params=params, opt_state=opt_state, target=target_params),
                {"loss": loss})

    draw = index_draw(key, (spec.resolution, spec.resolution, spec.channels), levels.shape[0] - 1)
    return data_parallel_step(per_device, mesh, METRICS, draw)
