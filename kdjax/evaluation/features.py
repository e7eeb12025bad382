"""Runs a feature function over many inputs in batches, data-parallel over all devices.

One helper for every metric input: judge or Inception features of real images, of generated images, or the
generated images themselves. Batches are sharded along the 1-D data mesh over `jax.devices()`
(`kdjax.core.parallel`); the feature function is jit-compiled once for the padded batch size. Results come back to the host as numpy
arrays (floating leaves in float64 by default, for the statistics), with the padding dropped.

Two kinds of source:
- an array (N, ...) of inputs: real images, or latents when `fn` is "generate then featurise" (preferred for
  generators: sampling and features fuse into one compiled program);
- a callable `step -> batch` (e.g. a jitted sampler `lambda step: G(z(step))`) with `num_samples` given;
  each call must return at most the (rounded) batch size, and the stream is cut at `num_samples`.

Single-process only (all devices addressable by this process).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax.core import parallel

Source = Union[np.ndarray, jax.Array, Callable[[int], Any]]


def _pad_rows(x: Any, rows: int) -> Any:
    """Pads the leading axis of every leaf of x to `rows` with zeros (on host for numpy, else on device)."""
    def pad(a):
        extra = rows - a.shape[0]
        if extra == 0:
            return a
        widths = [(0, extra)] + [(0, 0)] * (a.ndim - 1)
        return np.pad(a, widths) if isinstance(a, np.ndarray) else jnp.pad(a, widths)
    return jax.tree.map(pad, x)


def _leading_dim(x: Any) -> int:
    sizes = {leaf.shape[0] for leaf in jax.tree.leaves(x)}
    if len(sizes) != 1:
        raise ValueError(f"Batch leaves disagree on the leading (batch) dimension: {sorted(sizes)}.")
    return sizes.pop()


def extract_features(fn: Callable[..., Any], source: Source, batch_size: int, *, params: Any = None,
                     num_samples: int | None = None, mesh: Mesh | None = None,
                     out_dtype: np.dtype | None = np.float64, desc: str = "features",
                     log_every_s: float = 10.0) -> Any:
    """Applies `fn` to `source` batch by batch on all devices; returns the outputs as numpy arrays.

    Args:
      fn: `fn(batch)` or, if `params` is given, `fn(params, batch)`: maps a batch (B, ...) (or a pytree of
        such) to a pytree of arrays with leading dimension B. Must treat examples independently (eval mode),
        since the last batch is padded with zeros.
      source: an array (N, ...) (or pytree of arrays), or a callable `step -> batch` (then `num_samples`).
      batch_size: examples per step over all devices; rounded up to a multiple of the device count.
      params: replicated on every device and passed as `fn`'s first argument (keeps large weights out of
        the compiled program as constants).
      num_samples: how many examples to take (default: all of an array source; required for a callable).
      mesh: a 1-D mesh with axis `DATA_AXIS` (default: `parallel.make_mesh()`, all devices).
      out_dtype: dtype of floating output leaves (float64 by default); None keeps fn's dtypes.
      desc: name in the progress lines.
      log_every_s: seconds between progress lines (absl logging, INFO).

    Returns:
      The pytree `fn` returns, each leaf a numpy array with leading dimension `num_samples`.
    """
    mesh = mesh if mesh is not None else parallel.make_mesh()
    padded = -(-batch_size // mesh.devices.size) * mesh.devices.size
    batch_sharding = NamedSharding(mesh, P(parallel.DATA_AXIS))
    get_batch, num_samples = batch_getter(source, padded, num_samples)
    call = sharded_call(fn, params, mesh)
    chunks, done, step = [], 0, 0
    start = last_log = time.perf_counter()
    while done < num_samples:
        batch = get_batch(step)
        rows = _leading_dim(batch)
        if rows == 0 or rows > padded:
            raise ValueError(f"Step {step}: the source gave {rows} examples; expected 1..{padded}.")
        keep = min(rows, num_samples - done)
        out = call(jax.device_put(_pad_rows(batch, padded), batch_sharding))
        chunks.append(jax.tree.map(lambda a: np.asarray(a)[:keep], out))
        done, step = done + keep, step + 1
        now = time.perf_counter()
        if now - last_log >= log_every_s or done == num_samples:
            logging.info("%s: %d/%d (%.0f%%), %.1f examples/s", desc, done, num_samples,
                         100.0 * done / num_samples, done / max(now - start, 1e-9))
            last_log = now

    def finish(*leaves):
        a = np.concatenate(leaves, axis=0)
        if out_dtype is not None and jnp.issubdtype(a.dtype, jnp.floating):  # incl. bfloat16
            a = a.astype(out_dtype)
        return a
    return jax.tree.map(finish, *chunks)


def batch_getter(source: Source, padded: int, num_samples: int | None) -> tuple[Callable[[int], Any], int]:
    """(step -> batch, the number of examples to take) for an array or callable source (see
    `extract_features`)."""
    if callable(source):
        if num_samples is None:
            raise ValueError("A callable source needs num_samples.")
        get_batch = source
    else:
        available = _leading_dim(source)
        num_samples = available if num_samples is None else num_samples
        if num_samples > available:
            raise ValueError(f"num_samples={num_samples} > {available} examples in the source array.")
        get_batch = lambda step: jax.tree.map(lambda a: a[step * padded:(step + 1) * padded], source)
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}.")
    return get_batch, num_samples


def sharded_call(fn: Callable[..., Any], params: Any, mesh: Mesh) -> Callable[[Any], Any]:
    """`batch -> fn([params,] batch)` jitted with the batch sharded over `mesh` and `params` replicated."""
    batch_sharding = NamedSharding(mesh, P(parallel.DATA_AXIS))
    if params is None:
        return jax.jit(fn, in_shardings=batch_sharding, out_shardings=batch_sharding)
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)
    compiled = jax.jit(fn, in_shardings=(replicated, batch_sharding), out_shardings=batch_sharding)
    return lambda batch: compiled(params, batch)
