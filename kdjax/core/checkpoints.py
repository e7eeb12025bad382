"""Resumable train-state checkpoints with Orbax.

Train states go through an `ocp.CheckpointManager` (periodic async saves, `max_to_keep`, resume from the
latest step). Restoring uses an abstract target carrying the current mesh's shardings, so a run saved
on 8 devices resumes on 1 (or the other way round). Trained networks leave a run as *model bundles*
(`kdjax.models.bundles`).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from kdjax.core import parallel


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
