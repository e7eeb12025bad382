"""TensorFlow SavedModel and TensorFlow Lite export through `jax2tf` (native serialisation), the supported
JAX -> TensorFlow route.

- `savedmodel`: a SavedModel directory whose `serving_default` signature takes the named inputs and returns
  {output name: array}; the StableHLO inside is lowered for CPU, CUDA and TPU. Metadata in
  `assets.extra/kdjax.json` (TensorFlow's place for files the graph does not read).
- `tflite`: the same function converted by `tf.lite.TFLiteConverter` to TFLite builtin ops only (no
  TensorFlow ops, so it runs in a plain LiteRT runtime); metadata in the flatbuffer's `metadata` table under
  the name "kdjax". Run back with LiteRT's interpreter (`ai-edge-litert`, the maintained successor of
  `tf.lite.Interpreter`).

TensorFlow itself is a kdjax dependency (clu and tensorflow-datasets need it); LiteRT comes with the
`export` extra.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys
import tempfile
from typing import IO, Any, Iterator

import numpy as np

from kdjax.deploy.errors import ExportError
from kdjax.deploy.signature import Signature

SAVEDMODEL_PLATFORMS = ("cpu", "cuda", "tpu")
METADATA_NAME = "kdjax"


def tensorflow() -> Any:
    """`import tensorflow`, without the notices its native start-up writes to stderr (oneDNN, absl)."""
    if "tensorflow" not in sys.modules:
        with quiet_native():
            import tensorflow  # noqa: F401
    return sys.modules["tensorflow"]


@contextlib.contextmanager
def quiet_native() -> Iterator[None]:
    """Discards what native code writes to stderr meanwhile (TensorFlow's start-up and LiteRT's delegate
    notices; Python exceptions still propagate)."""
    with open(os.devnull, "wb") as devnull, native_stderr_to(devnull):
        yield


def converter(fmt: str) -> str:
    import jax

    tf = tensorflow()

    tail = " + tf.lite.TFLiteConverter (builtin ops)" if fmt == "tflite" else ""
    return f"jax2tf (jax {jax.__version__}, native serialisation), tensorflow {tf.__version__}{tail}"


def serving_function(signature: Signature, batch: int | None, platforms: tuple[str, ...]) -> Any:
    """`signature.fn` as a tf.function with named inputs (batch None: polymorphic) returning {name: output}."""
    tf = tensorflow()
    from jax.experimental import jax2tf

    poly = None if batch is not None else ["(b, ...)"] * len(signature.inputs)
    converted = jax2tf.convert(signature.fn, polymorphic_shapes=poly, with_gradient=False,
                               native_serialization_platforms=platforms)
    specs = [tf.TensorSpec((batch, *t.shape), tf.as_dtype(t.dtype), name=t.name) for t in signature.inputs]
    return tf.function(lambda *xs: {signature.output.name: converted(*xs)}, autograph=False,
                       input_signature=specs)


def write_savedmodel(signature: Signature, batch: int | None, path: pathlib.Path, metadata: dict[str, Any]) -> None:
    tf = tensorflow()

    module = tf.Module()
    module.serve = serving_function(signature, batch, SAVEDMODEL_PLATFORMS)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve.get_concrete_function()})
    (path / "assets.extra").mkdir(exist_ok=True)
    (path / "assets.extra" / "kdjax.json").write_text(json.dumps(metadata, indent=2))


def write_tflite(signature: Signature, batch: int | None, path: pathlib.Path, metadata: dict[str, Any]) -> None:
    tf = tensorflow()

    module = tf.Module()
    module.serve = serving_function(signature, batch, ("cpu",))
    converter_ = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
    converter_.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    with tempfile.TemporaryFile() as log:
        try:
            with native_stderr_to(log):
                flat = converter_.convert()
        except Exception as e:  # the converter's diagnostics are pages of MLIR locations; keep its verdict
            log.seek(0)
            lines = [ln for ln in str(e).splitlines() + log.read().decode(errors="replace").splitlines()
                     if "error:" in ln and "failed while converting" not in ln]
            why = lines[0].split("error:", 1)[1].strip().rstrip(".")[:200] if lines else type(e).__name__
            hint = "; pass --batch=N for a fixed batch size" if batch is None else ""
            raise ExportError(f"the TFLite converter cannot convert {signature.model!r} ({why}){hint}.") from e
    path.write_bytes(add_tflite_metadata(flat, json.dumps(metadata).encode()))


@contextlib.contextmanager
def native_stderr_to(sink: IO[bytes]) -> Iterator[None]:
    """Sends what native code writes to file descriptor 2 (the TFLite converter's MLIR diagnostics) to
    `sink`, so a failure can quote it instead of flooding the terminal; restores stderr afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def add_tflite_metadata(flat: bytes, payload: bytes) -> bytes:
    """The flatbuffer with a `metadata` entry named "kdjax" pointing to a new buffer holding `payload`."""
    tensorflow()
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flat))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(payload, np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def read_tflite_metadata(flat: bytes) -> dict[str, Any]:
    """The "kdjax" metadata entry of a .tflite flatbuffer ({} when there is none)."""
    tensorflow()
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flat))
    for entry in model.metadata or []:
        name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        if name == METADATA_NAME:
            return json.loads(bytes(np.asarray(model.buffers[entry.buffer].data, np.uint8)))
    return {}


class SavedModelRunner:
    """A SavedModel's `serving_default` signature: `runner(*arrays)` returns the output as numpy."""

    def __init__(self, path: str | pathlib.Path):
        tf = tensorflow()
        path = pathlib.Path(path)
        self.metadata = json.loads((path / "assets.extra" / "kdjax.json").read_text())
        self._loaded = tf.saved_model.load(str(path))
        self._fn = self._loaded.signatures["serving_default"]
        self.names = [t["name"] for t in self.metadata["inputs"]]
        self.output = self.metadata["outputs"][0]["name"]

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return self._fn(**dict(zip(self.names, arrays)))[self.output].numpy()


class TFLiteRunner:
    """A `.tflite` file in LiteRT's interpreter (XNNPACK on CPU): `runner(*arrays)` returns numpy. A dynamic
    batch is resized to each call's batch."""

    def __init__(self, path: str | pathlib.Path, threads: int | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise ExportError("running a .tflite file needs LiteRT: pip install -e '.[export]'.") from e
        flat = pathlib.Path(path).read_bytes()
        self.metadata = read_tflite_metadata(flat)
        with quiet_native():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
            self.interpreter = Interpreter(model_content=flat, num_threads=threads)
            self.interpreter.allocate_tensors()
        by_name = {d["name"]: d for d in self.interpreter.get_input_details()}
        names = [t["name"] for t in self.metadata["inputs"]]
        # TFLite names an input "serving_default_<name>:0"; keep the signature's order.
        self.inputs = [next(d for n, d in by_name.items() if n.split("_", 2)[-1].split(":")[0] == want)
                       for want in names]
        self.output = self.interpreter.get_output_details()[0]["index"]

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        shapes = [tuple(self.interpreter.get_tensor(d["index"]).shape) for d in self.inputs]
        if shapes != [a.shape for a in arrays]:
            for d, a in zip(self.inputs, arrays):
                self.interpreter.resize_tensor_input(d["index"], a.shape)
            with quiet_native():
                self.interpreter.allocate_tensors()
        for d, a in zip(self.inputs, arrays):
            self.interpreter.set_tensor(d["index"], a)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output).copy()
