"""The optional adversarial term of the image tasks (`restoration_kd`, `vae_kd`), from their `config.kd` block:

    kd.w_adv          the term's weight (0 = off)
    kd.adv_loss       "logistic" (non-saturating) or "hinge" (`losses.ADVERSARIAL`)
    kd.discriminator  a discriminator model block (any kdjax discriminator), judging windows of `window_size(side)`
                      pixels (the largest power of two <= the training crop's side)
    kd.d_optimizer    its optimizer, over the student's steps

The step side is `kdjax.steps.restoration.Adversary` (the term, the central window, the discriminator's update).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from kdjax import losses
from kdjax.core import optim
from kdjax.steps.restoration import Adversary, window_size
from kdjax.tasks import checks
from kdjax.tasks.phase import model_from_block


def adversary(kd: ml_collections.ConfigDict, side: int, channels: int, num_steps: int, dtype: Any
              ) -> Adversary | None:
    """The adversarial term of `kd` (None when kd.w_adv is 0): kd.discriminator built for windows of
    `window_size(side)` pixels of `channels` channels, kd.d_optimizer scheduled over `num_steps`."""
    if kd.w_adv == 0:
        return None
    window = window_size(side)
    discriminator, _ = model_from_block(kd.discriminator, (window, channels, 0), dtype)
    tx = optim.make_optimizer(kd.d_optimizer, num_steps)
    return Adversary(discriminator, tx, kd.w_adv, window, kd.adv_loss)


def check_adversary(kd: ml_collections.ConfigDict, side: int, channels: int, side_field: str) -> None:
    """Raises ValueError (naming the field) unless kd.w_adv >= 0 and, when > 0, kd.adv_loss is known, kd.discriminator
    builds and judges the `window_size(side)` windows (by `jax.eval_shape`, no compute), and kd.d_optimizer is
    valid. `side_field` names the config field `side` comes from."""
    if not kd.w_adv >= 0:
        raise ValueError(f"config.kd.w_adv={kd.w_adv} must be >= 0 (0 turns the term off).")
    if kd.w_adv == 0:
        return
    if kd.adv_loss not in losses.ADVERSARIAL:
        raise ValueError(f"config.kd.adv_loss={kd.adv_loss!r}; valid: {sorted(losses.ADVERSARIAL)}.")
    checks.check_model_block(kd.discriminator, "config.kd.discriminator", "discriminator",
                             taken_from=f"{side_field} and config.data.channels")
    window = window_size(side)
    discriminator = adversary(kd, side, channels, 1, jnp.float32).discriminator
    try:
        jax.eval_shape(lambda k: discriminator.init(k, jnp.zeros((1, window, window, channels)), None),
                       jax.random.key(0))
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.kd.discriminator ({kd.discriminator.model!r}) cannot judge the {window} x {window} "
                         f"windows of {side_field}={side}: {e}") from e
    optim.check_optimizer_config(kd.d_optimizer, "config.kd.d_optimizer")
