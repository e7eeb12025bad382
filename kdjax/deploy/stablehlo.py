"""StableHLO export through `jax.export`, the maintained core-JAX serialisation.

The file is a zip archive holding `module.bin` (the bytes of `jax.export.Exported.serialize()`: the StableHLO
module with the variables as constants, lowered for every platform asked for) and `metadata.json`. `load`
runs it back with `jax.export.deserialize(...).call` on whatever device JAX has; any JAX at least as new as
the exporter's can read it (jax.export's compatibility guarantee, currently 6 months backwards).
"""

from __future__ import annotations

import json
import pathlib
import zipfile
from typing import Any, Sequence

import jax
import numpy as np
from jax import export

from kdjax.deploy.signature import Signature

EXTENSION = ".jaxexport"
PLATFORMS = ("cpu", "cuda", "tpu")


def converter() -> str:
    return f"jax.export (jax {jax.__version__}, calling convention {export.maximum_supported_calling_convention_version})"


def write(signature: Signature, batch: int | None, path: pathlib.Path, metadata: dict[str, Any],
          platforms: Sequence[str] = PLATFORMS) -> None:
    """Serialises `signature.fn` for `batch` rows (None: a symbolic batch) and `platforms`."""
    rows = export.symbolic_shape("batch")[0] if batch is None else batch
    exported = export.export(jax.jit(signature.fn), platforms=tuple(platforms))(*signature.abstract_inputs(rows))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("module.bin", exported.serialize())
        archive.writestr("metadata.json", json.dumps({**metadata, "platforms": list(platforms)}, indent=2))


class Runner:
    """A loaded `.jaxexport`: `runner(*arrays)` returns the output as numpy."""

    def __init__(self, path: str | pathlib.Path):
        with zipfile.ZipFile(path) as archive:
            self.metadata = json.loads(archive.read("metadata.json"))
            self.exported = export.deserialize(bytearray(archive.read("module.bin")))
        self._call = jax.jit(self.exported.call)

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return np.asarray(self._call(*arrays))
