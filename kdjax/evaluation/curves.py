"""Learning curves: a fast quality figure of a generator during training, against steps and wall-clock time.

Every `every` steps the probe draws `num_samples` images of the generator being trained (its EMA) on fixed
latents shared by every phase, embeds them with the judge and writes judge-feature FID and KID against the
real set as `curve/PHASE/fid`, `curve/PHASE/kid` and `curve/PHASE/seconds` (the phase's wall-clock time so
far, compilation included, the probes' own time excluded). A phase that resumes continues the clock from the
last `seconds` it recorded. `plot_learning_curves` draws every phase on one figure: FID and KID against
steps and against seconds. This is where "distillation trains faster" is shown or refuted.

FID on a few hundred samples is biased upwards; the curves compare phases with each other at equal sample
counts, never with the final report's figures.
"""

from __future__ import annotations

import pathlib
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax
import numpy as np

from kdjax.evaluation import fid

if TYPE_CHECKING:
    from clu import metric_writers

METRICS = ("fid", "kid", "seconds")


class LearningCurve:
    """The probe: call `start(phase, history)` before a phase, then `probe(phase, step, generator, variables)`
    at its log steps."""

    def __init__(self, judge: tuple[Any, Any], real_pool: np.ndarray, num_samples: int, every: int, seed: int,
                 writer: metric_writers.MetricWriter, z_dim: int, num_classes: int):
        self.judge, self.real_pool, self.every, self.writer = judge, np.asarray(real_pool, np.float64), every, writer
        keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), 0xC0FFEE), 3)
        self.z = jax.random.normal(keys[0], (num_samples, z_dim))
        self.labels = jax.random.randint(keys[1], (num_samples,), 0, num_classes) if num_classes else None
        self.noise_key, self.seed = keys[2], seed
        self.clock: dict[str, float] = {}  # phase -> seconds of training before the current interval
        self.since: dict[str, float] = {}  # phase -> perf_counter at the start of the current interval
        self.samplers: dict[Any, Callable] = {}

    def start(self, phase: str, history: Mapping[str, list[tuple[int, float]]]) -> None:
        """Starts (or, after a resume, continues) the phase's clock."""
        recorded = history.get(f"curve/{phase}/seconds", [])
        self.clock[phase] = recorded[-1][1] if recorded else 0.0
        self.since[phase] = time.perf_counter()

    def pool_features(self, generator: Any, variables: Any) -> np.ndarray:
        """Judge 'pool' features of the generator's images on the fixed latents (one jitted program for each
        generator module, which Flax makes hashable by its fields)."""
        if generator not in self.samplers:
            judge_model = self.judge[0]

            def sample(g_vars, j_vars, z, labels):
                images = generator.apply(g_vars, z, labels, train=False, rngs={"noise": self.noise_key})
                return judge_model.apply(j_vars, images, train=False, return_features=True)[1]["pool"]

            self.samplers[generator] = jax.jit(sample)
        return np.asarray(self.samplers[generator](variables, self.judge[1], self.z, self.labels), np.float64)

    def probe(self, phase: str, step: int, generator: Any, variables: Any) -> None:
        """At every `every`-th step: FID, KID and the phase's training seconds, written as scalars."""
        if step % self.every:
            return
        now = time.perf_counter()
        seconds = self.clock[phase] + now - self.since[phase]
        pool = self.pool_features(generator, variables)
        with warnings.catch_warnings():  # the small-sample FID warning, once per probe otherwise
            warnings.simplefilter("ignore", UserWarning)
            values = {"fid": fid.fid(self.real_pool, pool)["fid"],
                      "kid": fid.kid(self.real_pool, pool, seed=self.seed, num_subsets=20)["kid_mean"],
                      "seconds": seconds}
        self.writer.write_scalars(step, {f"curve/{phase}/{k}": float(v) for k, v in values.items()})
        self.clock[phase], self.since[phase] = seconds, time.perf_counter()


def curves_of(history: Mapping[str, list[tuple[int, float]]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{phase: {"fid" | "kid" | "seconds": [(step, value)]}} from a run's history (`summaries.read_history`)."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name, points in history.items():
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "curve" and parts[2] in METRICS:
            out.setdefault(parts[1], {})[parts[2]] = points
    return out


def plot_learning_curves(history: Mapping[str, list[tuple[int, float]]], path: str | pathlib.Path) -> bool:
    """FID and KID of every phase against steps (top) and wall-clock seconds (bottom), one PNG; False (and no
    file) when the history has no curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = curves_of(history)
    if not curves:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for phase, c in sorted(curves.items()):
        seconds = dict(c.get("seconds", []))
        for col, metric in enumerate(("fid", "kid")):
            steps, values = zip(*c[metric]) if c.get(metric) else ((), ())
            axes[0, col].plot(steps, values, marker="o", label=phase)
            axes[1, col].plot([seconds.get(s, np.nan) for s in steps], values, marker="o", label=phase)
    for col, metric in enumerate(("FID", "KID")):
        axes[0, col].set(xlabel="step", ylabel=f"judge {metric}", title=f"{metric} against steps")
        axes[1, col].set(xlabel="training wall-clock (s)", ylabel=f"judge {metric}", title=f"{metric} against time")
        for row in range(2):
            axes[row, col].grid(alpha=0.3)
            axes[row, col].legend(fontsize=8)
            axes[row, col].set_yscale("log")
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def value_at(points: list[tuple[float, float]], x: float) -> float:
    """Linear interpolation of a curve [(x, y)] at x (nan outside its range)."""
    if not points:
        return float("nan")
    xs, ys = zip(*sorted(points))
    return float(np.interp(x, xs, ys, left=np.nan, right=np.nan))


def at_equal_time(history: Mapping[str, list[tuple[int, float]]], phase: str, other: str, metric: str) -> dict:
    """`phase`'s final `metric` and `other`'s at the same training wall-clock (interpolated on its curve); {}
    when either curve is missing or `other`'s does not reach that time."""
    curves = curves_of(history)
    if phase not in curves or other not in curves:
        return {}
    seconds = {p: dict(curves[p]["seconds"]) for p in (phase, other)}
    last_step, final = curves[phase][metric][-1]
    t = seconds[phase][last_step]
    other_points = [(seconds[other][s], v) for s, v in curves[other][metric] if s in seconds[other]]
    value = value_at(other_points, t)
    return {"seconds": t, phase: final, other: value} if np.isfinite(value) else {}
