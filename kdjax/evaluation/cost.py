"""What a model costs: parameters, FLOPs per image (XLA's count) and images per second.

FLOPs come from XLA's cost analysis of the compiled forward pass (`jit(f).lower(...).compile()
.cost_analysis()`, a dict in jax 0.10; older versions returned a list with one dict per program). What
XLA counts, checked in tests/test_cost.py:
- a multiply-add is 2 FLOPs; a dense layer is 2 * in * out per example, plus 1 per output for the bias;
- a convolution counts only the taps that fall inside the input: a 'VALID' conv is exactly
  2 * H_out * W_out * k * k * Cin * Cout; a 'SAME' conv is less than that formula by the taps that land on
  the zero padding, and a transposed (input-dilated) conv skips the inserted zeros;
- element-wise ops count 1 per element; tanh, exp, ... go to 'transcendentals', not 'flops';
- a while loop's body (e.g. `lax.scan`) is counted once, not once per iteration.
Because it is the compiled program, the count is per backend: compare models on the same device kind.

The command `python -m kdjax.cost` (`kdjax/cost.py`) prints `summary` for one registered model.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from clu import parameter_overview

from kdjax import models
from kdjax.evaluation import report


def count_params(variables_or_params: Any) -> int:
    """Number of trainable parameters (`clu.parameter_overview.count_parameters`).

    Args:
      variables_or_params: a Flax variables dict (only its 'params' collection is counted, not
        'batch_stats', 'w_avg', ...) or a params tree itself. Leaves may be arrays or
        `jax.ShapeDtypeStruct`s (from `jax.eval_shape`), so nothing needs to be computed.
    Returns:
      The total number of scalar entries.
    """
    tree = variables_or_params
    if isinstance(tree, Mapping) and "params" in tree:
        tree = tree["params"]
    return int(parameter_overview.count_parameters(dict(tree)))


def _cost_dict(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # jax < 0.4.30 returned one dict per program
        cost = cost[0] if cost else None
    if not cost:
        raise RuntimeError("XLA returned no cost analysis for this program on this backend.")
    return dict(cost)


def flops_per_image(apply_fn: Callable[..., Any], *example_args: Any, batch_size: int) -> float:
    """FLOPs of one call of `apply_fn`, divided by `batch_size`, from XLA's compiled cost analysis.

    Args:
      apply_fn: the function to cost, e.g. `lambda v, z: model.apply(v, z)`; it is jitted here.
      *example_args: its arguments, arrays or `jax.ShapeDtypeStruct`s (only shapes matter; nothing runs).
      batch_size: the number of images the call processes.
    Returns:
      XLA's 'flops' (multiply-adds count 2; transcendentals excluded, see the module docstring) per image.

    The count always comes from a compilation for the CPU backend, whatever the default device: on GPU,
    XLA hands convolutions to cuDNN custom calls that its cost analysis does not count (measured on an
    H100: the default StyleGAN2 teacher read 8.8 MFLOPs/image there against 744.5 on CPU).
    """
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), example_args)
    with jax.default_device(jax.devices("cpu")[0]):
        compiled = jax.jit(apply_fn).lower(*abstract).compile()
    return float(_cost_dict(compiled).get("flops", 0.0)) / batch_size


def images_per_second(apply_fn: Callable[..., Any], make_inputs: Callable[[int], Sequence[Any]],
                      batch_size: int, warmup: int = 2, iters: int = 10) -> float:
    """Throughput of the jitted `apply_fn` on the default device.

    Args:
      apply_fn: the function to time; it is jitted here.
      make_inputs: `make_inputs(batch_size)` returns the tuple of arguments (built once, outside the timing).
      batch_size: images per call.
      warmup: untimed calls first (the first one compiles).
      iters: timed calls; each result is waited for with `block_until_ready`.
    Returns:
      batch_size * iters / elapsed seconds.
    """
    fn = jax.jit(apply_fn)
    args = tuple(make_inputs(batch_size))
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn(*args))
    return batch_size * iters / (time.perf_counter() - start)


def device_name() -> str:
    """The default device in words, e.g. 'NVIDIA H100 80GB HBM3' or 'cpu: Intel(R) Xeon(R) ... (2 cores)'."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return str(dev.device_kind)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {model} ({cores} cores)"


# ------------------------------------------------------------------------------------------------------
# Whole-model summary.


@dataclasses.dataclass(frozen=True)
class CostSummary:
    """The cost of one model's inference forward pass (eval mode)."""

    name: str  # registry name
    kwargs: dict[str, Any]  # fields it was built with (the rest are the module's defaults)
    params: int  # trainable parameters
    flops_per_image: float  # XLA's count, see the module docstring
    images_per_second: dict[int, float]  # batch size -> throughput; empty when not timed
    device: str  # where it was compiled / timed

    def row(self) -> dict[str, str]:
        """Formatted cells of the summary, by column name."""
        cells = {"model": self.name, "params": f"{self.params / 1e6:.3f}M",
                 "MFLOPs/img": f"{self.flops_per_image / 1e6:.1f}"}
        for bs, ips in sorted(self.images_per_second.items()):
            cells[f"img/s @{bs}"] = f"{ips:.1f}"
        return cells


def example_inputs(name: str, model: Any, batch_size: int, input_shape: Sequence[int] | None = None
                   ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Arguments (positional, keyword) for a forward pass of registry model `name` at `batch_size`.

    Generators get z (B, z_dim) (their `spec`); everything else gets images (B, *input_shape), with
    input_shape read from the family's resolution and channels fields (`DATA_FIELDS`) unless given.
    Conditional generators, discriminators and autoregressive models also get int labels (B,); a
    classifier's classes are its output, not an input. A denoiser gets noisy images and sigma = 1 (B,) (and
    labels when conditional): the cost of one network evaluation.
    """
    key = jax.random.key(0)
    kind, fields = models.kind(name), type(model).DATA_FIELDS
    if kind == "generator":
        args: tuple[Any, ...] = (jax.random.normal(key, (batch_size, model.spec.z_dim), jnp.float32),)
        num_classes = model.spec.num_classes
    else:
        if input_shape is None:
            if "resolution" not in fields:
                raise ValueError(f"{name}: cannot tell its input shape from its fields; pass input_shape "
                                 "(e.g. --input-shape=32,32,3).")
            res, ch = getattr(model, fields["resolution"]), getattr(model, fields["channels"])
            input_shape = (int(res), int(res), int(ch))
        args = (jax.random.uniform(key, (batch_size, *input_shape), jnp.float32, -1.0, 1.0),)
        num_classes = int(getattr(model, fields["num_classes"])) if kind in ("discriminator", "autoregressive") else 0
        if kind == "denoiser":  # one forward pass D(x; sigma) at sigma = 1 (a sampler makes NFE of them)
            args, num_classes = args + (jnp.ones((batch_size,), jnp.float32),), model.spec.num_classes
    if num_classes > 0:
        args = args + (jnp.arange(batch_size, dtype=jnp.int32) % num_classes,)
    return args, {"train": False}


def summary(name: str, *, batch_sizes: Sequence[int] = (1, 64), timed: bool = True,
            flops_batch: int = 8, input_shape: Sequence[int] | None = None, warmup: int = 2,
            iters: int = 5, **kwargs: Any) -> CostSummary:
    """Builds registry model `name` with `kwargs` and measures its inference cost.

    Args:
      name: a key of `kdjax.models.REGISTRY`.
      batch_sizes: batch sizes timed (when `timed`).
      timed: measure images/s (runs the model); otherwise only compile (params and FLOPs).
      flops_batch: batch size compiled for the FLOPs count (divided out).
      input_shape: (H, W, C) for models whose fields do not say it.
      warmup, iters: see `images_per_second`.
      **kwargs: the model's fields.
    Returns:
      A CostSummary.
    """
    model = models.build_model(name, **kwargs)
    # Parameter values do not matter for cost; 'rbg' keys because XLA:CPU compiles threefry draws slowly
    # (a small discriminator's jitted init: 8.9 s with threefry, 1.3 s with rbg). The forward keeps
    # the default keys, as training uses them.
    rngs = {k: jax.random.key(i, impl="rbg") for i, k in enumerate(("params", "noise", "dropout"))}
    args, kw = example_inputs(name, model, flops_batch, input_shape)
    variables = jax.eval_shape(lambda r, *a: model.init(r, *a, **kw), rngs, *args)

    def forward(v, *a):
        # Extra rng streams are harmless for models that do not use them.
        return model.apply(v, *a, rngs={"noise": jax.random.key(1), "dropout": jax.random.key(2)}, **kw)

    abstract_args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    flops = flops_per_image(forward, variables, *abstract_args, batch_size=flops_batch)
    ips: dict[int, float] = {}
    if timed:
        real_vars = jax.jit(lambda r, *a: model.init(r, *a, **kw))(rngs, *args)
        for bs in batch_sizes:
            ips[bs] = images_per_second(
                forward, lambda b: (real_vars, *example_inputs(name, model, b, input_shape)[0]),
                bs, warmup=warmup, iters=iters)
    return CostSummary(name=name, kwargs=dict(kwargs), params=count_params(variables),
                       flops_per_image=flops, images_per_second=ips, device=device_name())


def format_table(summaries: Sequence[CostSummary]) -> str:
    """A plain-text (Markdown-compatible) table of the summaries, with the device underneath."""
    rows = [s.row() for s in summaries]
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    devices = sorted({s.device for s in summaries})
    return (report.markdown_table(cols, [[r.get(c, "") for c in cols] for r in rows], pad=True)
            + f"\ndevice: {', '.join(devices)}; FLOPs from XLA's cost analysis of the compiled forward.")
