"""Figures over seeds: mean +- std of every number in a set of runs' reports, a table and a plot.

A sweep (`python -m kdjax.sweep`) runs each setting with several seeds; each run writes `report.json`.
`aggregate` flattens every numeric leaf of each report to a path ("student_kd/fid") and gives per setting
and path the mean, the sample standard deviation (ddof = 1, as a seeds-as-samples error bar; `numpy.std`
with `ddof=1`), the count and the values themselves. Non-numeric leaves and paths missing from some runs
are left out of that setting (a figure is aggregated only over runs that all have it).
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from kdjax.evaluation import report


def numeric_leaves(tree: Any, prefix: str = "") -> dict[str, float]:
    """{"a/b/c": value} for every int/float leaf (bools excluded) of nested dicts."""
    out: dict[str, float] = {}
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            out.update(numeric_leaves(v, f"{prefix}{k}/"))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix.rstrip("/")] = float(tree)
    return out


def aggregate(reports: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """{path: {"mean", "std" (ddof 1; None for one run), "n", "values"}} over reports of one setting."""
    leaves = [numeric_leaves(r) for r in reports]
    shared = set.intersection(*(set(x) for x in leaves)) if leaves else set()
    out = {}
    for path in sorted(shared):
        values = np.asarray([x[path] for x in leaves], np.float64)
        finite = bool(np.all(np.isfinite(values)))
        out[path] = {"mean": float(values.mean()) if finite else None,
                     "std": float(values.std(ddof=1)) if finite and len(values) > 1 else None,
                     "n": len(values), "values": values.tolist()}
    return out


def mean_std(stats: Mapping[str, Any] | None, fmt: str = ".3f") -> str:
    """"mean +- std" (or "mean" for one run, "-" when missing)."""
    if not stats or stats["mean"] is None:
        return "-"
    if stats["std"] is None:
        return format(stats["mean"], fmt)
    return f"{stats['mean']:{fmt}} +- {stats['std']:{fmt}}"


def sweep_table(settings: Mapping[str, Mapping[str, Any]], metrics: Sequence[str]) -> str:
    """A markdown table: one row per setting, one column per metric path, cells mean +- std over seeds."""
    fmt = lambda path: ".4f" if "kid" in path.rsplit("/", 1)[-1] else ".3f"
    rows = [[name, str(s["num_runs"])] + [mean_std(s["metrics"].get(m), fmt(m)) for m in metrics]
            for name, s in settings.items()]
    return report.markdown_table(["setting", "seeds", *metrics], rows)


def plot_sweep(settings: Mapping[str, Mapping[str, Any]], metrics: Sequence[str], path: str | pathlib.Path) -> None:
    """One panel per metric: a bar per setting at the mean, error bar +- std, the seeds' values as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(metrics), 3)
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
    names = list(settings)
    for ax, metric in zip(axes.flat, metrics):
        for i, name in enumerate(names):
            stats = settings[name]["metrics"].get(metric)
            if not stats or stats["mean"] is None:
                continue
            ax.bar(i, stats["mean"], yerr=stats["std"] or 0.0, capsize=4, color="C0", alpha=0.6)
            ax.plot([i] * len(stats["values"]), stats["values"], "k.", ms=4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
