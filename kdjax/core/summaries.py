"""What a run shows: TensorBoard + console scalars, image summaries (TensorBoard and PNG), progress.

Built on clu: `metric_writers.create_default_writer` (TensorBoard event files plus console lines; only
process 0 writes, the others just log) and `periodic_actions.ReportProgress` (steps/s and ETA). Both import
TensorFlow (for TensorBoard's event files), so they are imported when a writer is made, not with this module:
a launch that stops at a config error never pays for TensorFlow.
"""

from __future__ import annotations

import json
import logging as std_logging
import pathlib
import sys
from typing import TYPE_CHECKING, Any, Mapping

import jax
import numpy as np
from absl import logging as absl_logging

from kdjax.core.images import image_grid, save_png, to_uint8

if TYPE_CHECKING:
    from clu import metric_writers, periodic_actions


def create_writer(logdir: str | pathlib.Path, history: bool = False) -> metric_writers.MetricWriter:
    """TensorBoard events in `logdir` and console lines; a logging-only writer on processes > 0. With `history`,
    every scalar also goes to `logdir/metrics.jsonl` (`HistoryWriter`)."""
    from clu import metric_writers

    writer = metric_writers.create_default_writer(str(logdir), just_logging=jax.process_index() > 0)
    return metric_writers.MultiWriter([writer, HistoryWriter(logdir)]) if history else writer


def progress(num_steps: int, writer: metric_writers.MetricWriter, every_steps: int = 50) -> periodic_actions.ReportProgress:
    """A hook to call every step: reports steps/s and the ETA every `every_steps` steps."""
    from clu import periodic_actions

    return periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer, every_steps=every_steps)


def write_images(writer: metric_writers.MetricWriter, workdir: str | pathlib.Path, step: int,
                 images: Mapping[str, Any], columns: int | None = None) -> None:
    """Image summaries: one grid per name, to TensorBoard and to `workdir/images/NAME_STEP.png`.

    Args:
      images: name -> (N, H, W, C) float images in [-1, 1].
    """
    grids = {name: image_grid(to_uint8(x), columns) for name, x in images.items()}
    writer.write_images(step, {name: g[None] for name, g in grids.items()})
    if jax.process_index() == 0:
        for name, grid in grids.items():
            save_png(pathlib.Path(workdir) / "images" / f"{name.replace('/', '_')}_{step:06d}.png", grid)


class HistoryWriter:
    """Appends every scalar write to `logdir/metrics.jsonl` (process 0), for plots and reports without
    TensorBoard. A resumed run appends again from its checkpoint; `read_history` keeps the last value. It has
    every method of clu's `MetricWriter` interface (the others do nothing), so it goes in a `MultiWriter`."""

    def __init__(self, logdir: str | pathlib.Path):
        self.path = pathlib.Path(logdir) / "metrics.jsonl"
        self._active = jax.process_index() == 0

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if self._active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def read_history(logdir: str | pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """`metrics.jsonl` as name -> [(step, value)] sorted by step (a step written twice keeps the last value)."""
    path = pathlib.Path(logdir) / "metrics.jsonl"
    latest: dict[str, dict[int, float]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            step = record.pop("step")
            for name, value in record.items():
                latest.setdefault(name, {})[step] = value
    return {name: sorted(values.items()) for name, values in latest.items()}


def plot_curves(history: Mapping[str, list[tuple[int, float]]], path: str | pathlib.Path,
                prefixes: tuple[str, ...] = ("student_kd/", "student_scratch/")) -> None:
    """One panel per training phase (metric-name prefix), one line per logged loss term, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(p, {k: v for k, v in history.items() if k.startswith(p)}) for p in prefixes]
    panels = [(p, curves) for p, curves in panels if curves]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(6 * max(len(panels), 1), 4), squeeze=False)
    for ax, (prefix, curves) in zip(axes[0], panels):
        for name, points in sorted(curves.items()):
            steps, values = zip(*points)
            ax.plot(steps, values, label=name[len(prefix):])
        ax.set_title(prefix.rstrip("/"))
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_finite(scalars: Mapping[str, float], first_step: int, last_step: int) -> None:
    """Stops the run when a logged value is NaN/inf, naming the value and the step range."""
    bad = {k: v for k, v in scalars.items() if not np.isfinite(v)}
    if bad:
        raise FloatingPointError(f"Non-finite training metrics {bad} in steps {first_step}..{last_step}; "
                                 "lower the learning rate or check the data. The last good checkpoint is kept.")


class _LibraryInfoFilter:
    """Keeps library records to one line: drops INFO/DEBUG records logged from inside noisy libraries (Orbax
    logs every save step by step) and the traceback of their warnings and errors (Orbax logs one per failed
    write thread; the error that reaches kdjax is reported once, by the launcher)."""

    # asyncio: "Future exception was never retrieved" for a failed Orbax write, with a traceback, when the
    # future is collected (seen once in seven full-disk runs).
    NOISY = ("/orbax/", "/tensorstore/", "/grain/", "/tensorflow_datasets/", "/asyncio/")

    def filter(self, record: std_logging.LogRecord) -> bool:
        if not any(p in record.pathname for p in self.NOISY):
            return True
        if record.levelno < std_logging.WARNING:
            return False
        if record.exc_info:
            error = record.exc_info[1]
            record.msg, record.args = f"{record.getMessage()} ({type(error).__name__}: {error})".splitlines()[0], ()
            record.exc_info, record.exc_text = None, None
        return True


def _log_unraisable(unraisable) -> None:
    """sys.unraisablehook: an exception nobody can catch (tensorstore callbacks into a closed asyncio loop
    after a failed read or write, coroutines of a failed save) is logged at DEBUG instead of printing a
    traceback on stderr."""
    absl_logging.debug("unraisable exception in %r: %s: %s", unraisable.object, unraisable.exc_type.__name__,
                       unraisable.exc_value)


def quiet_library_logs() -> None:
    """Keeps the console to kdjax's own lines (metrics, progress) plus one line per library warning or error."""
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
        handler.addFilter(_LibraryInfoFilter())
    std_logging.getLogger("absl").addFilter(_LibraryInfoFilter())
    sys.unraisablehook = _log_unraisable
