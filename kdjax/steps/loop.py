"""The training loop every kdjax task shares: resume, step, log, checkpoint, stop.

A task supplies a jitted data-parallel `step_fn(state, batch) -> (state, metrics)` (metrics a clu
`metrics.Collection`), its initial state and its batches; the loop

- restores the latest checkpoint of the phase's directory, if any, and continues from its step
  (batches and random draws are functions of the step, so the result is bitwise the same as an
  uninterrupted run);
- merges step metrics and writes them every `log_every` steps (TensorBoard + console), stopping on
  NaN/inf with the step range in the message;
- reports steps/s and ETA (clu ReportProgress);
- saves every `checkpoint_every` steps and at the end;
- stops early, after saving a checkpoint of the step reached and waiting until it is written, when the
  launch's step budget (`budget.stop_after_steps`) is spent, on SIGTERM / SIGINT / SIGUSR1
  (`kdjax.core.signals`: in a multi-process run every process stops at the same step) and when JAX's
  preemption sync point says so (multi-host platforms);
- resumes from the newest checkpoint that restores: a corrupt latest one is moved aside with a warning
  (`kdjax.core.checkpoints`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import TYPE_CHECKING, Any, Callable, Iterator

from absl import logging
from jax.sharding import Mesh

from kdjax.core import checkpoints, parallel, signals, summaries

if TYPE_CHECKING:
    from clu import metric_writers


@dataclasses.dataclass
class StepBudget:
    """How many optimisation steps this launch may still run, across all phases (-1 = unlimited)."""

    stop_after_steps: int = -1
    used: int = 0

    def spent(self) -> bool:
        return 0 <= self.stop_after_steps <= self.used


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    num_steps: int
    log_every: int
    checkpoint_every: int
    max_to_keep: int = 2
    async_checkpoints: bool = True


def run(name: str, workdir: str | pathlib.Path, state: Any, step_fn: Callable[[Any, Any], tuple[Any, Any]],
        batches: Callable[[int], Iterator[Any]], mesh: Mesh, options: LoopOptions,
        writer: metric_writers.MetricWriter, budget: StepBudget,
        on_log: Callable[[int, Any], None] | None = None) -> tuple[Any, bool]:
    """Trains phase `name` to `options.num_steps`, resuming from its checkpoints.

    Args:
      name: the phase; checkpoints go to `workdir/name/checkpoints`.
      state: the freshly initialised (replicated) state; replaced by the checkpoint when resuming. It
        must carry the step as `state.step`.
      step_fn: jitted; donates its state argument.
      batches: `start_step -> iterator of this process's batches` from that step on.
      on_log: called with (step, state) at every log step (e.g. to write image summaries).
    Returns:
      (state, finished): finished is False when the launch stopped early (budget, signal or preemption),
      after saving a checkpoint of the step reached and waiting until it is written.
    """
    ckpt = checkpoints.TrainCheckpoints(pathlib.Path(workdir) / name / "checkpoints", options.max_to_keep,
                                        options.async_checkpoints)
    try:
        with signals.StopSignals() as stop_signals:
            start, state = ckpt.restore_latest(state, mesh)
            if start:
                logging.info("%s: resuming from the checkpoint of step %d", name, start)
            stopped_at = None
            if start < options.num_steps:
                state, stopped_at = _train(name, state, step_fn, batches(start), start, mesh, options, writer,
                                           budget, ckpt, stop_signals, on_log)
            ckpt.wait()  # a stop is clean only once its checkpoint is on disk
    finally:
        _close(ckpt)
    writer.flush()
    if stopped_at is not None:
        cause = stop_signals.received or ("config.stop_after_steps" if budget.spent() else "a preemption notice")
        logging.warning("%s: stopped at step %d of %d (%s), with a checkpoint of that step in %s; launch the same "
                        "command again to resume from it.", name, stopped_at, options.num_steps, cause, ckpt.directory)
    return state, stopped_at is None


def _train(name: str, state: Any, step_fn: Callable, iterator: Iterator[Any], start: int, mesh: Mesh,
           options: LoopOptions, writer: metric_writers.MetricWriter, budget: StepBudget,
           ckpt: checkpoints.TrainCheckpoints, stop_signals: signals.StopSignals,
           on_log: Callable[[int, Any], None] | None) -> tuple[Any, int | None]:
    """Steps `start + 1 ... num_steps`, logging and checkpointing; returns (state, the step it stopped
    early at, or None when it reached num_steps)."""
    hook = summaries.progress(options.num_steps, writer, every_steps=options.log_every)
    accumulated, first_logged = None, start + 1
    step = start
    while step < options.num_steps:
        batch = parallel.global_batch(next(iterator), mesh)
        state, metrics = step_fn(state, batch)
        step += 1
        budget.used += 1
        accumulated = metrics if accumulated is None else accumulated.merge(metrics)
        hook(step)
        if step % options.log_every == 0 or step == options.num_steps:
            scalars = {f"{name}/{k}": float(v) for k, v in accumulated.compute().items()}
            summaries.check_finite(scalars, first_logged, step)
            writer.write_scalars(step, scalars)
            accumulated, first_logged = None, step + 1
            if on_log is not None:
                on_log(step, state)
        stop = budget.spent() | stop_signals.stop_at(step, ckpt.reached_preemption)  # both asked every step
        if step % options.checkpoint_every == 0 or step == options.num_steps or stop:
            if accumulated is not None:  # never checkpoint a state whose metrics since the last log are NaN/inf
                summaries.check_finite({f"{name}/{k}": float(v) for k, v in accumulated.compute().items()},
                                       first_logged, step)
            ckpt.save(step, state)
        if stop and step < options.num_steps:
            return state, step
    return state, None


def _close(ckpt: checkpoints.TrainCheckpoints) -> None:
    """Closes the manager; after an error it may fail again, which must not hide the first error."""
    try:
        ckpt.close()
    except Exception as e:  # already reported by the error that brought us here
        logging.info("closing the checkpoint manager of %s after an error: %s", ckpt.directory, e)
