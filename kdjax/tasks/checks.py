"""Config checks every task shares, run before any compute; each raises ValueError naming the bad field and
what would be valid. A task's own `check_config` composes these with the checks of its blocks."""

from __future__ import annotations

from typing import Sequence

import jax
import ml_collections

from kdjax import models
from kdjax.core import optim

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def check_run(config: ml_collections.ConfigDict) -> None:
    """The top-level fields of every config (`kdjax.config.run_config`)."""
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"config.compute_dtype={config.compute_dtype!r}; valid: {list(COMPUTE_DTYPES)}.")
    for field in ("log_every", "checkpoint_every", "max_to_keep", "eval_batch_size"):
        if config[field] < 1:
            raise ValueError(f"config.{field}={config[field]} must be >= 1.")
    if config.eval_batch_size % jax.device_count():
        raise ValueError(f"config.eval_batch_size={config.eval_batch_size} must be a multiple of the device "
                         f"count ({jax.device_count()}).")


def check_phase(block: ml_collections.ConfigDict, field: str) -> None:
    """A `phase_train_config` block: step count, batch divisibility, optimizer."""
    if block.num_steps < 1:
        raise ValueError(f"{field}.num_steps={block.num_steps} must be >= 1.")
    n = jax.device_count()
    if block.batch_size < 1 or block.batch_size % n or block.batch_size % jax.process_count():
        raise ValueError(f"{field}.batch_size={block.batch_size} must be a positive multiple of the device count "
                         f"({n}) and of the process count ({jax.process_count()}).")
    optim.check_optimizer_config(block.optimizer, f"{field}.optimizer")


def check_model_block(block: ml_collections.ConfigDict, field: str, kind: str, taken_from: str = "the data",
                      also_taken: Sequence[str] = ()) -> None:
    """A `{model, kwargs}` block: a registered model of `kind`, whose kwargs leave out the fields that
    `taken_from` fixes (the family's data fields, plus `also_taken`) and name only fields the model has."""
    valid = models.names_of_kind(kind)
    if block.model not in valid:
        raise ValueError(f"{field}.model={block.model!r}; valid {kind}s: {valid}.")
    for name in (*models.model_class(block.model).DATA_FIELDS.values(), *also_taken):
        if name in block.kwargs:
            raise ValueError(f"{field}.kwargs.{name}: leave it out; it is taken from {taken_from}.")
    models.check_model_kwargs(block.model, block.kwargs.to_dict(), where=f"{field}.kwargs")


def check_fraction(value: float, field: str, closed_high: bool = True) -> None:
    """0 <= value <= 1 (or < 1 when not `closed_high`)."""
    if not (0.0 <= value <= 1.0 if closed_high else 0.0 <= value < 1.0):
        raise ValueError(f"{field}={value} must be in [0, {'1]' if closed_high else '1)'}.")
