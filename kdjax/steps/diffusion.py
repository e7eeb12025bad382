"""The diffusion teacher's train step (EDM, Karras et al. 2022), data-parallel.

For a batch of clean images y (and labels, when conditional) the step draws, for the *global* batch from
`fold_in(fold_in(key, step), DRAW_SALT)` (`kdjax.steps.shell`, so the numbers do not depend on the device count),

    ln sigma ~ N(P_mean, P_std^2)  (EDM: P_mean = -1.2, P_std = 1.2),   n ~ N(0, I),

and minimises `losses.edm_loss(D(y + sigma n; sigma), y, sigma, sigma_data)` = mean_b lambda(sigma_b)
||D(y_b + sigma_b n_b; sigma_b) - y_b||^2 / (H W C), lambda = (sigma^2 + s_d^2) / (sigma s_d)^2, D the
preconditioned network (`kdjax.models.edm`). Dropout, if the network has it, draws from the per-device key
fold_in(fold_in(key, step), device index). The gradient is that of `lax.pmean(loss, DATA_AXIS)` (the shard_map
gradient trap, `kdjax.core.parallel`). The optimizer updates the parameters and an exponential moving average
ema <- decay * ema + (1 - decay) * params follows them (optax.incremental_update, as the GAN step's G EMA); the
EMA is what samples and the exported teacher use.

Metrics: `loss`, and the loss by noise level in three buckets of the sigma distribution, split at ln sigma =
P_mean -+ P_std: `loss_sigma_low` (probability p = Phi(-1) = 0.159), `loss_sigma_mid` (0.683), `loss_sigma_high`
(0.159). Each is mean_b L_b 1[sigma_b in bucket] / p, an unbiased estimate of the bucket's mean loss E[L | bucket]
that needs no division by a count that can be 0 (averaged over the steps between two logs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from kdjax import losses, models
from kdjax.core.parallel import DATA_AXIS
from kdjax.steps.shell import DRAW_SALT, Draw, data_parallel_step

METRICS = ("loss", "loss_sigma_low", "loss_sigma_mid", "loss_sigma_high")
P_LOW = 0.5 * (1.0 + math.erf(-1.0 / math.sqrt(2.0)))  # Phi(-1): P(ln sigma < P_mean - P_std)


@flax.struct.dataclass
class DiffusionState:
    step: jax.Array  # int32 scalar; every random draw is fold_in(key, step)
    params: Any
    opt_state: Any
    ema: Any  # exponential moving average of params: the teacher that samples and is exported


def noise_draw(key: jax.Array, image_shape: tuple[int, int, int], p_mean: float, p_std: float) -> Draw:
    """The step's global draws: sigma (B,) with ln sigma ~ N(p_mean, p_std^2) and n (B, H, W, C) ~ N(0, I), from
    fold_in(fold_in(key, step), DRAW_SALT)."""
    def draw(step: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
        draw_key = jax.random.fold_in(jax.random.fold_in(key, step), DRAW_SALT)
        sigma = jnp.exp(p_mean + p_std * jax.random.normal(jax.random.fold_in(draw_key, 0), (batch_size,)))
        noise = jax.random.normal(jax.random.fold_in(draw_key, 1), (batch_size, *image_shape))
        return sigma, noise

    return draw


def init_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array) -> DiffusionState:
    """The initial state (on the host's default device): parameters from `key` (the `params` stream), the EMA
    equal to them."""
    spec = model.spec
    model = models.outside_data_parallel(model)
    x = jnp.zeros((2, spec.resolution, spec.resolution, spec.channels))
    labels = jnp.zeros((2,), jnp.int32) if spec.num_classes else None
    params = jax.jit(lambda k: model.init({"params": k}, x, jnp.ones((2,)), labels)["params"])(key)
    return DiffusionState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema=params)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, key: jax.Array, *,
                    p_mean: float = -1.2, p_std: float = 1.2, ema_decay: float = 0.999) -> Callable:
    """The jitted data-parallel step `(state, batch) -> (state, metrics)` (module docstring). `batch` holds
    "image" (B, H, W, C) in [-1, 1] and "label" (B,) (used when the model is conditional)."""
    spec = model.spec
    low, high = math.exp(p_mean - p_std), math.exp(p_mean + p_std)
    buckets = {"loss_sigma_low": (lambda s: s < low, P_LOW), "loss_sigma_high": (lambda s: s >= high, P_LOW),
               "loss_sigma_mid": (lambda s: (s >= low) & (s < high), 1.0 - 2.0 * P_LOW)}

    def per_device(state: DiffusionState, batch: dict, sigma: jax.Array, noise: jax.Array):
        device_key = jax.random.fold_in(jax.random.fold_in(key, state.step), jax.lax.axis_index(DATA_AXIS))
        clean = batch["image"]
        labels = batch["label"] if spec.num_classes else None
        noisy = clean + sigma[:, None, None, None] * noise

        def loss_fn(params):
            denoised = model.apply({"params": params}, noisy, sigma, labels, train=True, rngs={"dropout": device_key})
            per_example = losses.edm_loss_per_example(denoised, clean, sigma, spec.sigma_data)
            return jax.lax.pmean(jnp.mean(per_example), DATA_AXIS), per_example

        (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = optax.incremental_update(params, state.ema, 1.0 - ema_decay)  # decay * ema + (1 - decay) * params
        scalars = {"loss": loss}
        for name, (inside, probability) in buckets.items():
            scalars[name] = jax.lax.pmean(jnp.mean(per_example * inside(sigma)), DATA_AXIS) / probability
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), scalars

    draw = noise_draw(key, (spec.resolution, spec.resolution, spec.channels), p_mean, p_std)
    return data_parallel_step(per_device, mesh, METRICS, draw)
