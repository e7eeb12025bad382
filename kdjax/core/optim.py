"""Optimizers and learning-rate schedules by name (optax), from a config's `optimizer` block."""

from __future__ import annotations

import ml_collections
import optax

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine")


def check_optimizer_config(cfg: ml_collections.ConfigDict, field: str) -> None:
    """Raises ValueError naming a bad optimizer/schedule name or value in `cfg` (found at `field`)."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"{field}.name={cfg.name!r} is not an optimizer; valid: {list(OPTIMIZERS)}.")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"{field}.schedule={cfg.schedule!r} is not a schedule; valid: {list(SCHEDULES)}.")
    if not cfg.learning_rate > 0:
        raise ValueError(f"{field}.learning_rate={cfg.learning_rate} must be > 0.")


def learning_rate_schedule(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.learning_rate)
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(cfg.learning_rate, max(num_steps, 1))
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, max(num_steps, 1))


def make_optimizer(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """The optax transformation `cfg` names, with its schedule over `num_steps` steps.

    Fields: name, learning_rate, schedule, warmup_steps, momentum (sgd/momentum), b1, b2 (adam/adamw),
    weight_decay (adamw), grad_clip (global-norm clipping when > 0).
    """
    lr = learning_rate_schedule(cfg, num_steps)
    if cfg.name == "sgd":
        tx = optax.sgd(lr)
    elif cfg.name == "momentum":
        tx = optax.sgd(lr, momentum=cfg.momentum, nesterov=True)
    elif cfg.name == "adam":
        tx = optax.adam(lr, b1=cfg.b1, b2=cfg.b2)
    else:
        tx = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx

