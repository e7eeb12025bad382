"""The state a training phase carries (and checkpoints): step, parameters, optimizer, model state."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimisation steps taken; every random draw is fold_in(key, step)
    params: Any  # trainable parameters (float32)
    opt_state: Any  # optax state
    model_state: Any  # non-trainable collections, e.g. {"batch_stats": ...}; {} if none

    @classmethod
    def create(cls, variables: dict[str, Any], tx: optax.GradientTransformation) -> "TrainState":
        variables = dict(variables)
        params = variables.pop("params")
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), model_state=variables)

    def variables(self) -> dict[str, Any]:
        """The Flax variables for `apply`: {"params": ..., **model_state}."""
        return {"params": self.params, **self.model_state}
