"""Data parallelism over every device, pmap-style, with `jax.shard_map` under `jax.jit`.

A step is written as a per-device function (it sees its shard of the batch and the replicated
parameters, and uses collectives over the named axis `DATA_AXIS`), then wrapped by `data_parallel`
into a jitted `shard_map` over a 1-D mesh of all devices, across all processes.

The gradient trap (docs/stack.md): under shard_map with `check_vma=True`, the gradient with respect to
replicated parameters of a per-device loss is already *summed* over devices. So a step takes the
gradient of `lax.pmean(loss, DATA_AXIS)`, never `pmean(grad(loss))`; `tests/test_parallel.py` checks
an 8-device SGD step against the 1-device one.

Multi-host: each process passes only its own rows of a batch (see `kdjax.data`), assembled into one
global array by `jax.make_array_from_process_local_data`; replicated values (parameters) are built
with `jax.make_array_from_callback`, which works for devices of other processes too.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named `DATA_AXIS` over `devices` (default: every device of every process).

    Built with the `Mesh` constructor, whose axes are Auto, as shard_map on replicated inputs needs
    (`jax.make_mesh` defaults to Explicit axes in JAX 0.10).
    """
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree of host values (identical in every process) replicated on every mesh device."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Assembles each process's rows of a batch into global arrays sharded over `DATA_AXIS`."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def to_host(tree: Any) -> Any:
    """Fetches a pytree of (replicated or fully addressable) arrays to numpy on this process."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


def data_parallel(per_device_fn: Callable, mesh: Mesh, in_specs: tuple, out_specs: Any,
                  donate_argnums: tuple[int, ...] = ()) -> Callable:
    """jit(shard_map(per_device_fn)) over `mesh`.

    Args:
      per_device_fn: the step as seen by one device; use `jax.lax.p*` collectives over `DATA_AXIS`.
      in_specs / out_specs: `P()` for replicated values, `P(DATA_AXIS)` for batch-sharded ones.
      donate_argnums: arguments whose buffers the step may reuse (the train state).
    """
    fn = jax.shard_map(per_device_fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    return jax.jit(fn, donate_argnums=donate_argnums)

