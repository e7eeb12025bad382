"""Export: a kdjax model bundle as a file another runtime runs (StableHLO, ONNX, SavedModel, TFLite).

`export_bundle` is the whole procedure; `python -m kdjax.export` is its command line. In order:
1. every argument is checked before any compute (format, batch, output path, the format's optional
   packages, the bundle: `model.json` and the Orbax metadata of its variables);
2. the bundle becomes a `Signature` (`signature.py`): one pure function of named inputs;
3. the format's writer converts it into a staged path beside `--out` (`atomic.py`);
4. the staged file is loaded back in its own runtime and run on random inputs of 1 and 8 rows (or the
   fixed batch); its outputs must match JAX's (max |exported - JAX| <= tolerance x max(1, max |JAX|)),
   otherwise nothing is written;
5. only then is it renamed to `--out`. A failure or an interruption anywhere leaves nothing at `--out`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from kdjax.deploy import atomic, onnx_format, stablehlo, tf_formats
from kdjax.deploy import signature as signatures
from kdjax.deploy.errors import ExportError

__all__ = ["FORMATS", "ExportError", "Format", "check_batch", "detect_format", "export_bundle", "load"]


@dataclasses.dataclass(frozen=True)
class Format:
    extension: str  # "" for a directory
    requires: tuple[str, ...]  # importable modules, installed by the `export` extra
    write: Callable[..., None]  # (signature, batch, path, metadata)
    runner: Callable[..., Any]  # path -> object with .metadata and __call__(*arrays) -> np.ndarray
    converter: Callable[[], str]


FORMATS: dict[str, Format] = {
    "stablehlo": Format(stablehlo.EXTENSION, (), stablehlo.write, stablehlo.Runner, stablehlo.converter),
    "onnx": Format(onnx_format.EXTENSION, onnx_format.REQUIRES, onnx_format.write, onnx_format.Runner,
                   onnx_format.converter),
    "savedmodel": Format("", ("tensorflow",), tf_formats.write_savedmodel, tf_formats.SavedModelRunner,
                         lambda: tf_formats.converter("savedmodel")),
    "tflite": Format(".tflite", ("tensorflow", "ai_edge_litert"), tf_formats.write_tflite,
                     tf_formats.TFLiteRunner, lambda: tf_formats.converter("tflite")),
}
CHECK_BATCHES = (1, 8)  # rows of the parity check of a dynamic-batch export


def check_format(fmt: str) -> Format:
    """The format named `fmt`, with its optional packages importable. Raises ExportError."""
    if fmt not in FORMATS:
        raise ExportError(f"--format={fmt!r} is not an export format; valid: {', '.join(FORMATS)}.")
    missing = [m for m in FORMATS[fmt].requires if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"--format={fmt} needs {', '.join(missing)}, not installed; install the export extra: "
                          "pip install -e '.[export]'.")
    return FORMATS[fmt]


def check_batch(batch: str | int) -> int | None:
    """`--batch`: a positive int, or "dynamic" (None)."""
    if str(batch) == "dynamic":
        return None
    try:
        value = int(batch)
    except ValueError:
        value = 0
    if value < 1:
        raise ExportError(f"--batch={batch!r} is neither a positive integer nor 'dynamic'.")
    return value


def detect_format(path: str | pathlib.Path) -> str:
    """The format of an exported file or directory, from its extension (a SavedModel: saved_model.pb)."""
    path = pathlib.Path(path)
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return "savedmodel"
    for name, fmt in FORMATS.items():
        if fmt.extension and path.suffix == fmt.extension:
            return name
    raise ExportError(f"{str(path)!r} is not an export kdjax reads (*.jaxexport, *.onnx, *.tflite or a SavedModel "
                      "directory).")


def load(path: str | pathlib.Path, fmt: str | None = None, **runner_kwargs: Any) -> Any:
    """An exported model ready to run: `runner(*arrays) -> np.ndarray`, `runner.metadata`."""
    fmt = fmt or detect_format(path)
    return check_format(fmt).runner(path, **runner_kwargs)


def parity(signature: signatures.Signature, runner: Any, rows: Sequence[int],
           seed: int = 0) -> dict[int, tuple[float, float]]:
    """{rows: (max |exported - JAX|, max(1, max |JAX|))} on random inputs (`example_inputs`) of each batch
    size; a non-finite output counts as an infinite error."""
    reference = jax.jit(signature.fn)
    out = {}
    for n in rows:
        inputs = signatures.example_inputs(signature, n, seed + n)
        want = np.asarray(reference(*inputs), np.float64)
        got = np.asarray(runner(*inputs), np.float64)
        if got.shape != want.shape:
            raise ExportError(f"the exported model returned shape {got.shape} for {n} rows; JAX returns "
                              f"{want.shape}.")
        error = float(np.max(np.abs(got - want))) if want.size else 0.0
        out[n] = (error if np.isfinite(error) else float("inf"), max(1.0, float(np.max(np.abs(want)))))
    return out


def export_bundle(bundle: str, fmt: str, out: str, batch: str | int = "dynamic", *, overwrite: bool = False,
                  input_shape: Sequence[int] | None = None, truncation_psi: float | None = None,
                  tolerance: float = 1e-4) -> dict[str, Any]:
    """Exports model bundle `bundle` to `out` in format `fmt` (see the module docstring). Returns a summary:
    {"out", "format", "bytes", "seconds", "max_abs_error": {rows: error}, "metadata"}. Raises ExportError."""
    spec = check_format(fmt)
    rows = check_batch(batch)
    target_path = atomic.check_output(out, overwrite)
    if spec.extension and target_path.suffix != spec.extension:
        raise ExportError(f"--out={out!r}: a {fmt} export is a {spec.extension} file; name it so.")
    start = time.perf_counter()
    sig = signatures.from_bundle(bundle, input_shape=input_shape, truncation_psi=truncation_psi)
    metadata = sig.metadata(fmt, rows, spec.converter())
    check_rows = CHECK_BATCHES if rows is None else (rows,)
    with atomic.staged(target_path) as staged:
        spec.write(sig, rows, staged, metadata)
        measured = parity(sig, spec.runner(staged), check_rows)
        for n, (error, scale) in measured.items():
            if not error <= tolerance * scale:
                raise ExportError(f"the {fmt} export of {sig.model!r} does not reproduce JAX: max |exported - JAX| "
                                  f"= {error:.3g} on {n} rows (allowed {tolerance:g} x {scale:.3g}); nothing was "
                                  "written.")
    size = sum(p.stat().st_size for p in target_path.rglob("*")) if target_path.is_dir() else target_path.stat().st_size
    return {"out": str(target_path), "format": fmt, "bytes": size, "seconds": time.perf_counter() - start,
            "max_abs_error": {n: e for n, (e, _) in measured.items()}, "metadata": metadata}
