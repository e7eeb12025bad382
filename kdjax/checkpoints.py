"""Checkpoints with Orbax: resumable train states, and exported model bundles.

Train states go through an `ocp.CheckpointManager` (periodic async saves, `max_to_keep`, resume from the
latest step). Restoring uses an abstract target carrying the current mesh's shardings, so a run saved
on 8 devices resumes on 1 (or the other way round).

A *model bundle* is how a trained network leaves a run (a classic-KD teacher, a StyleGAN2 teacher, a
judge, an imported official pickle): a directory with `model.json` ({"model": registry name,
"kwargs": fields}) and `variables/` (an Orbax checkpoint of the Flax variables). Any config can name
a bundle as its teacher or judge; it is loaded once and never re-saved in a student's checkpoints.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from kdjax import parallel


class CheckpointError(ValueError):
    """A checkpoint path that is missing, unreadable or does not fit the model."""


class TrainCheckpoints:
    """An Orbax CheckpointManager for one training phase's state."""

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        """Saves `state` at `step` (asynchronously; `wait` blocks until it is on disk)."""
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def reached_preemption(self, step: int) -> bool:
        """True when the platform signalled preemption (e.g. SIGTERM on a TPU VM): save and stop."""
        return self._manager.reached_preemption(step)

    def restore(self, step: int, like: Any, mesh: Mesh) -> Any:
        """Restores the state saved at `step`, laid out like `like`, replicated over `mesh`."""
        sharding = parallel.replicated(mesh)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), like)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:
            raise CheckpointError(f"Could not restore the checkpoint of step {step} in {str(self.directory)!r} "
                                  f"({type(e).__name__}: {e}). It may come from a different model or config; "
                                  "use a fresh --workdir to start over.") from e

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


# ------------------------------------------------------------------------------------ model bundles
def save_model_bundle(directory: str | pathlib.Path, model: str, kwargs: dict[str, Any], variables: Any,
                      extra: dict[str, Any] | None = None) -> None:
    """Writes `model.json` and `variables/` to `directory` (process 0 writes the JSON)."""
    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    # Host numpy values: valid in a multi-host job too (Orbax writes them once, from the primary host).
    variables = jax.tree.map(lambda x: np.asarray(parallel.to_host(x)), variables)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "variables", variables, force=True)
    if jax.process_index() == 0:
        meta = {"model": model, "kwargs": kwargs, **(extra or {})}
        (directory / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def check_model_bundle(directory: str | pathlib.Path, field: str) -> dict[str, Any]:
    """Validates a bundle before any compute; returns its `model.json`. Raises CheckpointError."""
    from kdjax import models

    path = pathlib.Path(directory).expanduser()
    meta_path = path / "model.json"
    if not path.is_dir():
        raise CheckpointError(f"{field}={str(directory)!r} is not an existing directory; expected a model "
                              "bundle (a directory with model.json and variables/).")
    if not meta_path.is_file() or not (path / "variables").is_dir():
        raise CheckpointError(f"{field}={str(directory)!r} is not a model bundle: it needs model.json and "
                              f"variables/; it holds {sorted(p.name for p in path.iterdir())}.")
    try:
        meta = json.loads(meta_path.read_text())
        name, kwargs = meta["model"], meta["kwargs"]
    except Exception as e:
        raise CheckpointError(f"{field}: unreadable {str(meta_path)!r} ({type(e).__name__}: {e}); expected JSON "
                              'with keys "model" and "kwargs".') from e
    try:
        models.check_model_kwargs(name, kwargs, where=str(meta_path))
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    return meta


def load_model_bundle(directory: str | pathlib.Path, field: str = "checkpoint",
                      mesh: Mesh | None = None) -> tuple[dict[str, Any], Any]:
    """Reads a bundle: returns (model.json contents, variables), replicated over `mesh` if given."""
    meta = check_model_bundle(directory, field)
    path = pathlib.Path(directory).expanduser().absolute() / "variables"
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            if mesh is None:
                variables = checkpointer.restore(path)
            else:
                sharding = parallel.replicated(mesh)
                tree = checkpointer.metadata(path).item_metadata.tree
                abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
                variables = checkpointer.restore(path, abstract)
    except Exception as e:
        raise CheckpointError(f"{field}: could not read the variables in {str(path)!r} "
                              f"({type(e).__name__}: {e}).") from e
    return meta, variables
