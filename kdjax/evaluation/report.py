"""How every report leaves kdjax: markdown tables, JSON and markdown files, sample grids and spectra PNGs,
TensorBoard scalars. Tasks and commands format their own rows; the writing is here, once."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from kdjax.core import images, summaries
from kdjax.evaluation import spectrum


def cell(value: Any, fmt: str, scale: float = 1.0) -> str:
    """One table cell: `value * scale` formatted with `fmt`, or "-" for a missing value (None)."""
    return "-" if value is None else format(value * scale, fmt)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], pad: bool = False) -> str:
    """A markdown table of already formatted cells; `pad` aligns the columns for plain-text reading."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if pad else 0 for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) if pad else "---" for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def write_report(workdir: str | pathlib.Path, name: str, report: Mapping[str, Any], table: str,
                 more_markdown: str = "", sort_keys: bool = False) -> None:
    """Writes `workdir/NAME.json` (the report) and `workdir/NAME.md` (the table, then `more_markdown`, e.g.
    figure links), and prints the table; process 0 only in a multi-process job."""
    if jax.process_index() != 0:
        return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / f"{name}.json").write_text(json.dumps(report, indent=2, sort_keys=sort_keys))
    (workdir / f"{name}.md").write_text(table + more_markdown + "\n")
    print(table)


def write_figures(workdir: str | pathlib.Path, names: Sequence[str], spectra: Mapping[str, np.ndarray],
                  grid_images: Mapping[str, np.ndarray]) -> None:
    """`spectra.png` (radial power spectra of every model and the real data) and `samples.png` (one row of
    samples per model, in `names` order, images in [-1, 1])."""
    workdir = pathlib.Path(workdir)
    spectrum.plot_spectra(spectra, workdir / "spectra.png")
    rows = np.concatenate([images.to_uint8(grid_images[n]) for n in names])
    images.save_png(workdir / "samples.png", images.image_grid(rows, columns=len(grid_images[names[0]])))


def write_scalars(workdir: str | pathlib.Path, scalars: Mapping[str, Any], writer: Any = None, step: int = 0) -> None:
    """The numeric entries of `scalars` as TensorBoard scalars at `step` (a new writer on `workdir` if none)."""
    own = writer is None
    writer = summaries.create_writer(workdir) if own else writer
    writer.write_scalars(step, {k: v for k, v in scalars.items() if isinstance(v, (int, float))})
    writer.close() if own else writer.flush()
