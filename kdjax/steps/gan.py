"""The GAN train step: one generator update and one discriminator update, data-parallel.

- G: `losses.g_nonsaturating(D(G(z)))` (or `losses.g_hinge`, `losses.ADVERSARIAL`);
- D: `losses.d_logistic(D(x), D(G(z)))` (or `losses.d_hinge`), plus the lazy R1 penalty every `r1_every`
  steps, weighted `r1_gamma / 2 * r1_every` (StyleGAN2's lazy regularisation, `kdjax.steps.lazy`);
- an exponential moving average of G's parameters, used for samples and the exported generator.
Latents and fake labels are drawn for the *global* batch (`kdjax.steps.shell.latent_draw`), so results do
not depend on the device count (StyleGAN2's noise inputs and style-mixing draws are per device).
`apply_discriminator` and `discriminator_update` are shared with the distillation step's adversarial term.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from kdjax import losses, models
from kdjax.core.parallel import DATA_AXIS
from kdjax.models import stylegan2
from kdjax.steps.lazy import lazily_regularised
from kdjax.steps.shell import data_parallel_step, latent_draw

DATA = DATA_AXIS
METRICS = ("g_loss", "d_loss", "r1_term", "d_real", "d_fake")


@flax.struct.dataclass
class GANState:
    step: jax.Array  # int32 scalar; every random draw is fold_in(key, step)
    g_params: Any
    g_state: Any  # non-trainable collections of G (batch_stats / w_avg / noise_consts)
    g_opt: Any
    d_params: Any
    d_state: Any  # non-trainable collections of D ({} unless it uses BatchNorm)
    d_opt: Any
    g_ema: Any  # exponential moving average of g_params


def apply_generator(model: nn.Module, params, g_state, z, labels, key, style_mixing_prob: float, train: bool):
    """G(z, labels) in train (state-updating) or eval mode; returns (images, new_g_state)."""
    rngs = {"noise": jax.random.fold_in(key, 0), "style_mix": jax.random.fold_in(key, 1)}
    variables = {"params": params, **g_state}
    if isinstance(model, stylegan2.Generator):
        kwargs = dict(update_w_avg=train, style_mixing_prob=style_mixing_prob if train else 0.0)
        mutable = ["w_avg"] if train else False
    else:
        kwargs, mutable = {}, (["batch_stats"] if train and "batch_stats" in g_state else False)
    out = model.apply(variables, z, labels, train=train, rngs=rngs, mutable=mutable, **kwargs)
    if mutable:
        images, updates = out
        return images, {**g_state, **updates}
    return out, g_state


def apply_discriminator(model: nn.Module, params, d_state, x, labels):
    """D(x, labels) -> (B,) logits (train mode; BatchNorm statistics, if any, are not carried)."""
    variables = {"params": params, **d_state}
    if d_state:
        return model.apply(variables, x, labels, train=True, mutable=list(d_state))[0]
    return model.apply(variables, x, labels, train=True)


def discriminator_update(d_apply: Callable, d_tx: optax.GradientTransformation, d_params, d_opt, d_state,
                         real: jax.Array, real_labels, fake: jax.Array, fake_labels, d_loss_of: Callable,
                         r1_weight: float) -> tuple[Any, Any, dict[str, jax.Array]]:
    """One discriminator update, per device: d_loss_of(D(real), D(fake)), plus `r1_weight * R1(real)` when
    r1_weight > 0 (lazy regularisation: the caller runs this variant every `r1_every` steps with
    `r1_weight = gamma / 2 * r1_every`, see `kdjax.steps.lazy`).

    Returns (new d_params, new d_opt, {"d_loss", "r1_term"} device-means, plus "d_real" and "d_fake",
    the mean logits).
    """
    def loss_fn(params):
        real_logits = d_apply(params, d_state, real, real_labels)
        fake_logits = d_apply(params, d_state, fake, fake_labels)
        loss = d_loss_of(real_logits, fake_logits)
        r1 = (r1_weight * losses.r1_penalty(lambda x: d_apply(params, d_state, x, real_labels), real)
              if r1_weight > 0 else jnp.zeros_like(loss))  # per-device (varying), like the loss
        aux = {"d_loss": loss, "r1_term": r1, "d_real": jnp.mean(real_logits), "d_fake": jnp.mean(fake_logits)}
        return jax.lax.pmean(loss + r1, DATA), aux

    grads, aux = jax.grad(loss_fn, has_aux=True)(d_params)
    updates, d_opt = d_tx.update(grads, d_opt, d_params)
    return optax.apply_updates(d_params, updates), d_opt, jax.lax.pmean(aux, DATA)


def make_gan_step(generator: nn.Module, discriminator: nn.Module, g_tx: optax.GradientTransformation,
                  d_tx: optax.GradientTransformation, mesh: Mesh, gan: ml_collections.ConfigDict, z_dim: int,
                  num_classes: int, key: jax.Array) -> Callable:
    """The jitted data-parallel step `(state, batch) -> (state, metrics)`: one G update, one D update.

    `gan` is `config.gan`: loss, r1_gamma, r1_every, ema_decay, style_mixing_prob.
    """
    g_loss_of, d_loss_of = losses.ADVERSARIAL[gan.loss]
    d = functools.partial(apply_discriminator, discriminator)

    def per_device(state: GANState, batch: dict, z: jax.Array, fake_labels: jax.Array, r1: float):
        step_key = jax.random.fold_in(key, state.step)
        device_key = jax.random.fold_in(step_key, jax.lax.axis_index(DATA))
        labels = fake_labels if num_classes else None
        real_labels = batch["label"] if num_classes else None

        def g_loss_fn(g_params):
            fake, new_g_state = apply_generator(generator, g_params, state.g_state, z, labels, device_key,
                                                 gan.style_mixing_prob, train=True)
            loss = g_loss_of(d(state.d_params, state.d_state, fake, labels))
            return jax.lax.pmean(loss, DATA), (new_g_state, fake)

        (g_loss, (g_state, fake)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(state.g_params)
        g_updates, g_opt = g_tx.update(g_grads, state.g_opt, state.g_params)
        g_params = optax.apply_updates(state.g_params, g_updates)
        fake = jax.lax.stop_gradient(fake)

        d_params, d_opt, d_aux = discriminator_update(
            d, d_tx, state.d_params, state.d_opt, state.d_state, batch["image"], real_labels, fake, labels,
            d_loss_of, r1)
        g_ema = optax.incremental_update(g_params, state.g_ema, 1.0 - gan.ema_decay)  # decay * ema + (1 - decay) * g
        new_state = state.replace(step=state.step + 1, g_params=g_params, g_state=g_state, g_opt=g_opt,
                                  d_params=d_params, d_opt=d_opt, g_ema=g_ema)
        return new_state, {"g_loss": g_loss, **d_aux}

    draw = latent_draw(key, z_dim, num_classes)
    make = lambda r1: data_parallel_step(functools.partial(per_device, r1=r1), mesh, METRICS, draw)
    return lazily_regularised(make, gan.r1_gamma / 2 * gan.r1_every, gan.r1_every)


def init_state(generator: nn.Module, discriminator: nn.Module, g_tx, d_tx, shape: tuple[int, int, int], z_dim: int,
               num_classes: int, key: jax.Array) -> GANState:
    """Initial state (on the host's default device), initialised outside any data-parallel context."""
    res, ch, _ = shape
    labels = jnp.zeros((4,), jnp.int32) if num_classes else None
    g_init, d_init = models.outside_data_parallel(generator), models.outside_data_parallel(discriminator)
    g_vars = dict(jax.jit(lambda k: g_init.init({"params": k, "noise": k}, jnp.zeros((4, z_dim)), labels))(
        jax.random.fold_in(key, 0)))
    d_vars = dict(jax.jit(lambda k: d_init.init(k, jnp.zeros((4, res, res, ch)), labels))(jax.random.fold_in(key, 1)))
    g_params, d_params = g_vars.pop("params"), d_vars.pop("params")
    return GANState(step=jnp.zeros((), jnp.int32), g_params=g_params, g_state=g_vars, g_opt=g_tx.init(g_params),
                    d_params=d_params, d_state=d_vars, d_opt=d_tx.init(d_params), g_ema=g_params)
