"""The one shell every data-parallel train step runs in: `jit(shard_map(per_device))` with global draws.

A step is written as the function one device runs (`per_device`), pmap-style: it sees the replicated state,
its shard of the batch and of the step's random draws, the replicated constants (frozen teacher and judge
variables), and reduces with collectives over `DATA_AXIS`. `data_parallel_step` wraps it:

    step(state, batch, *constants) -> (state, metrics)

- the random draws of the step (latents, labels) are made for the *global* batch from
  `fold_in(fold_in(key, state.step), 2**20)` outside the per-device function and then sharded, so a run's
  numbers do not depend on the device count;
- the per-device scalars (already device-means) become a clu `metrics.Collection` of averages;
- the state argument is donated.

The gradient trap (`kdjax.core.parallel`): differentiate `lax.pmean(loss, DATA_AXIS)`, never pmean the
gradients of a per-device loss.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from clu import metrics as clu_metrics
from jax.sharding import Mesh, PartitionSpec as P

from kdjax.core.parallel import DATA_AXIS

Draw = Callable[[jax.Array, int], tuple[jax.Array, ...]]  # (step, global batch size) -> per-example arrays
DRAW_SALT = 2**20  # keeps the global draws' keys apart from the per-device keys fold_in(key, step) gives


def averages(names: Sequence[str]) -> type[clu_metrics.Collection]:
    """A clu metrics collection averaging each named scalar over the steps it is merged across."""
    return clu_metrics.Collection.create(**{n: clu_metrics.Average.from_output(n) for n in names})


def latent_draw(key: jax.Array, z_dim: int, num_classes: int) -> Draw:
    """The draw of generator steps: z ~ N(0, I) of shape (B, z_dim) and labels uniform in [0, num_classes)
    (zeros when unconditional), for the global batch, from the step's draw key."""
    def draw(step: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
        draw_key = jax.random.fold_in(jax.random.fold_in(key, step), DRAW_SALT)
        z = jax.random.normal(jax.random.fold_in(draw_key, 0), (batch_size, z_dim))
        labels = jax.random.randint(jax.random.fold_in(draw_key, 1), (batch_size,), 0, max(num_classes, 1))
        return z, labels

    return draw


def data_parallel_step(per_device: Callable[..., tuple[Any, dict[str, jax.Array]]], mesh: Mesh,
                       metric_names: Sequence[str], draw: Draw | None = None) -> Callable:
    """The jitted step `(state, batch, *constants) -> (state, metrics)` around `per_device`.

    Args:
      per_device: `(state, batch, *draws, *constants) -> (state, scalars)` as one device sees it; `scalars`
        holds device-means (pmean-ed) under `metric_names`.
      mesh: the 1-D data mesh (`kdjax.core.parallel.make_mesh`).
      metric_names: the keys of `scalars`.
      draw: the step's global random draws (e.g. `latent_draw`), or None.
    """
    metrics = averages(metric_names)

    def step(state: Any, batch: dict, *constants: Any) -> tuple[Any, clu_metrics.Collection]:
        draws = draw(state.step, batch["image"].shape[0]) if draw is not None else ()
        in_specs = (P(), P(DATA_AXIS)) + (P(DATA_AXIS),) * len(draws) + (P(),) * len(constants)
        sharded = jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=(P(), P()))
        state, scalars = sharded(state, batch, *draws, *constants)
        return state, metrics.single_from_model_output(**scalars)

    return jax.jit(step, donate_argnums=(0,))
