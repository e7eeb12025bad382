"""What every training phase of every task sets up the same way: its models from config blocks, and its
run through the shared loop (batches, loop options, resume, logging, checkpoints)."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import flax.linen as nn
import ml_collections
from jax.sharding import Mesh

from kdjax import models
from kdjax.core import data
from kdjax.core.parallel import DATA_AXIS
from kdjax.steps import loop

if TYPE_CHECKING:
    from clu import metric_writers


def model_from_block(block: ml_collections.ConfigDict, shape: tuple[int, int, int], dtype: Any,
                     **fields: Any) -> tuple[nn.Module, dict[str, Any]]:
    """(module, its bundle kwargs) for a `{model, kwargs}` block: the block's kwargs, the data's
    (resolution, channels, classes) under the family's field names, and `fields`. The module is wired for
    the data-parallel step (cross-device statistics over `DATA_AXIS`) and computes in `dtype`; the
    kwargs returned are what a bundle records (neither of those two)."""
    kwargs = {**block.kwargs.to_dict(), **models.data_kwargs(block.model, *shape), **fields}
    module = models.build_model(block.model, **kwargs, **models.data_parallel_kwargs(block.model, DATA_AXIS),
                                dtype=dtype)
    return module, kwargs


def run_phase(name: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, state: Any,
              step_fn: Callable[[Any, Any], tuple[Any, Any]], source: Sequence[dict],
              train_cfg: ml_collections.ConfigDict, mesh: Mesh, writer: metric_writers.MetricWriter,
              budget: loop.StepBudget, on_log: Callable[[int, Any], None] | None = None,
              batches: Callable[[int], Iterator[Any]] | None = None) -> tuple[Any, bool]:
    """Trains phase `name` on batches of `source` for `train_cfg.num_steps` steps of `train_cfg.batch_size`
    (`kdjax.steps.loop.run`, checkpoints in `workdir/name`); returns (state, finished). `batches`
    (start step -> iterator of this process's batches, e.g. `photos.PairBatches.iterate`) replaces the image
    batches of `source` for tasks whose examples are not images with labels (pass `source=()`)."""
    if batches is None:
        batches = data.TrainBatches(source, train_cfg.batch_size, seed=config.seed,
                                    num_threads=config.data.num_threads).iterate
    options = loop.LoopOptions(train_cfg.num_steps, config.log_every, config.checkpoint_every, config.max_to_keep,
                               config.async_checkpoints)
    return loop.run(name, workdir, state, step_fn, batches, mesh, options, writer, budget, on_log=on_log)
