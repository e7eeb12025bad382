"""ONNX export through jax2onnx (the maintained JAX -> ONNX converter), checked with onnxruntime.

The jax2tf + tf2onnx route no longer works: jax2tf only emits native serialisation (an `XlaCallModule` op
holding StableHLO), which tf2onnx cannot read. jax2onnx converts the jaxpr directly. It is installed by the
`export` extra at a version whose pins keep kdjax's own (its newer releases pin an older orbax-checkpoint).

The metadata is stored as the model's `metadata_props["kdjax"]` (JSON). The converter's intermediate
shape annotations (`value_info`) are dropped: some are written in NCHW for NHWC tensors, which onnxruntime
then reports as conflicts; the runtime infers the shapes itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pathlib
from importlib import metadata as package_metadata
from typing import Any, Iterator

import numpy as np

from kdjax.deploy.errors import ExportError
from kdjax.deploy.signature import Signature

EXTENSION = ".onnx"
OPSET = 23
REQUIRES = ("jax2onnx", "onnx", "onnxruntime")


def converter() -> str:
    return f"jax2onnx {package_metadata.version('jax2onnx')} (opset {OPSET})"


@contextlib.contextmanager
def quiet_converter() -> Iterator[None]:
    """Silences jax2onnx's and onnx-ir's per-node warnings, its plugin-import notices and the debugging prints
    some of its plugins leave on stdout, while converting."""
    loggers = [logging.getLogger(n) for n in ("jax2onnx", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def write(signature: Signature, batch: int | None, path: pathlib.Path, metadata: dict[str, Any]) -> None:
    """Converts `signature.fn` for `batch` rows (None: a symbolic batch) and saves it at `path`."""
    import jax
    import onnx
    from jax2onnx import to_onnx

    rows = "batch" if batch is None else batch
    inputs = [jax.ShapeDtypeStruct((rows, *t.shape), np.dtype(t.dtype)) for t in signature.inputs]
    try:
        with quiet_converter():
            model = to_onnx(signature.fn, inputs, model_name=signature.model, opset=OPSET,
                            input_names=[t.name for t in signature.inputs], output_names=[signature.output.name])
    except Exception as e:
        if batch is None:
            raise ExportError(f"jax2onnx could not convert {signature.model!r} with a dynamic batch "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); pass --batch=N for a fixed "
                              "batch size.") from e
        raise
    del model.graph.value_info[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = "kdjax", json.dumps(metadata)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


class Runner:
    """An `.onnx` file in an onnxruntime CPU session: `runner(*arrays)` returns the output as numpy."""

    def __init__(self, path: str | pathlib.Path, threads: int = 0):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = json.loads(props["kdjax"]) if "kdjax" in props else {}
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return self.session.run(None, dict(zip(self.names, arrays)))[0]
