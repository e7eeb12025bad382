"""Resumable train-state checkpoints with Orbax, robust to corrupt checkpoints and failed writes.

Train states go through an `ocp.CheckpointManager` (periodic async saves, `max_to_keep`, resume from the
latest step). Restoring uses an abstract target carrying the current mesh's shardings, so a run saved on 8
devices resumes on 1 (or the other way round). Trained networks leave a run as *model bundles*
(`kdjax.models.bundles`).

Integrity. Every save records a SHA-256 digest of the state's values in the checkpoint's metadata
(`custom_metadata["kdjax_sha256"]`); Orbax itself checks no sums, and garbage bytes in an array file can
restore as wrong numbers without an error. `restore_latest` tries the checkpoints newest first. One whose
files do not read, or whose values do not match their digest, is *corrupt*: it is moved to
`checkpoints/corrupt/STEP` (kept as evidence, never deleted), a warning names the step and why, and the
next older one is tried. One that reads but holds a state of other shapes than the model's is *not*
corrupt (a changed config, more likely): that stops the launch, and nothing is moved.

Failed writes (a full disk, a read-only or vanished mount) raise `CheckpointWriteError` naming the step,
the reason and the last good checkpoint, which is left as it was; the half-written temporary directory
is removed.
"""

from __future__ import annotations

import errno
import hashlib
import pathlib
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from kdjax.core import parallel

DIGEST_KEY = "kdjax_sha256"
CORRUPT_DIR = "corrupt"


class CheckpointError(ValueError):
    """A checkpoint path that is missing, unreadable or does not fit the model."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (disk full, read-only file system, ...)."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files do not read back, or read back other values than were saved."""


# ------------------------------------------------------------------------------------- pytree facts
def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaves(tree: Any) -> list[tuple[str, Any]]:
    """("a/b/c", leaf) pairs, sorted by path: the same for a dataclass and the dict Orbax restores it as."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return sorted(("/".join(_key_name(k) for k in path), leaf) for path, leaf in leaves)


def tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"a/b/c": shape} for every array leaf; dataclasses, dicts and Orbax metadata trees alike."""
    return {path: tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf) for path, leaf in _leaves(tree)}


def shape_mismatch(expected: dict[str, tuple], stored: dict[str, tuple], limit: int = 3) -> str | None:
    """None when the two `tree_shapes` agree; else what differs (the first `limit` of each kind)."""
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    differ = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    parts = [f"missing {missing[:limit]}" if missing else "", f"unexpected {extra[:limit]}" if extra else "",
             ", ".join(f"{k} has shape {stored[k]}, the model {expected[k]}" for k in differ[:limit])]
    parts = [p for p in parts if p]
    return "; ".join(parts) if parts else None


def state_digest(state: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes (host values; same on any device count)."""
    digest = hashlib.sha256()
    for path, leaf in _leaves(state):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        value = np.ascontiguousarray(parallel.to_host(leaf))
        digest.update(f"{path}:{value.dtype}:{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def write_failure_reason(error: BaseException) -> str:
    """A one-line reason for a failed read or write; 'the disk is full' for ENOSPC however the library wraps
    it (tensorstore raises ValueError("RESOURCE_EXHAUSTED: ... No space left on device"))."""
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error):
        return "the disk is full (ENOSPC)"
    if getattr(error, "errno", None) == errno.EROFS or "Read-only file system" in str(error):
        return "the file system is read-only (EROFS)"
    return text[:300]


# ------------------------------------------------------------------------------------- the manager
class TrainCheckpoints:
    """An Orbax CheckpointManager for one training phase's state (see the module docstring)."""

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._remove_unfinished_saves()
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=ocp.StandardCheckpointHandler())
        self._pending: int | None = None  # the step of a save that may still be in flight

    def _remove_unfinished_saves(self) -> None:
        """Removes the temporary directories of saves a killed launch left (this launch has none in flight)."""
        if jax.process_index() == 0 and self.directory.is_dir():
            for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
                logging.info("removing %s, an unfinished save of an earlier launch", tmp)
                shutil.rmtree(tmp, ignore_errors=True)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def good_steps(self) -> list[int]:
        """The steps with a committed checkpoint on disk, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Saves `state` at `step` (asynchronously; `wait` blocks until it is on disk), with its digest.

        Raises CheckpointWriteError when this write, or the one still in flight, fails.
        """
        self.wait()
        # Host numpy values, as `bundles` writes: the state is replicated, so every process holds all of it, and
        # Orbax writes numpy leaves once, from the primary host. Handed the replicated jax.Arrays instead, Orbax
        # splits each leaf's write across the replicas ("replica-parallel"): a device slice per leaf and
        # replica, 7x slower for a 200-leaf state on 8 CPU devices (0.93 s vs 0.13 s a save,
        # benchmarks/checkpoint_save.py). Restoring lays the values out over the mesh either way.
        host = parallel.to_host(state)
        digest = state_digest(host)
        self._pending = step
        try:
            self._manager.save(step, args=ocp.args.StandardSave(host), force=True,
                               custom_metadata={DIGEST_KEY: digest})
        except Exception as e:
            self._write_failed(step, e)

    def wait(self) -> None:
        """Blocks until the save in flight is on disk; raises CheckpointWriteError if it failed."""
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._write_failed(step, e)

    def _write_failed(self, step: int | None, error: Exception) -> None:
        """Removes the half-written checkpoint of `step` and raises CheckpointWriteError."""
        if jax.process_index() == 0:
            for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
        good = [s for s in self.good_steps() if s != step]
        kept = (f"the checkpoint of step {good[-1]} is kept and a relaunch resumes from it" if good
                else "no earlier checkpoint of this phase exists, so a relaunch starts it over")
        raise CheckpointWriteError(f"could not write the checkpoint of step {step} in {str(self.directory)!r}: "
                                   f"{write_failure_reason(error)}; {kept}. Fix that, then launch the same command "
                                   "again.") from error

    def restore(self, step: int, like: Any, mesh: Mesh) -> Any:
        """The state saved at `step`, laid out like `like` and replicated over `mesh`.

        Raises CorruptCheckpoint (files that do not read, values that do not match their digest) or
        CheckpointError (a readable state of other shapes than `like`: another model or config).
        """
        mismatch = shape_mismatch(tree_shapes(like), self._stored_shapes(step))
        if mismatch:
            raise CheckpointError(f"the checkpoint of step {step} in {str(self.directory)!r} holds a state that does "
                                  f"not fit this config ({mismatch}); launch with the config it was made with "
                                  "(WORKDIR/config.json) or pass a fresh --workdir.")
        sharding = parallel.replicated(mesh)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), like)
        try:
            state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:
            raise CorruptCheckpoint(f"its files do not read ({write_failure_reason(e)})") from e
        expected = (self._manager.metadata(step).custom_metadata or {}).get(DIGEST_KEY)
        if expected is not None and state_digest(state) != expected:
            raise CorruptCheckpoint("its values differ from those saved (SHA-256 digest mismatch)")
        return state

    def _stored_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        try:
            metadata = self._manager.metadata(step).item_metadata
            if metadata is None:
                raise ValueError("Orbax found no readable metadata")
            return tree_shapes(metadata)
        except Exception as e:
            raise CorruptCheckpoint(f"its metadata does not read ({write_failure_reason(e)})") from e

    def restore_latest(self, like: Any, mesh: Mesh) -> tuple[int, Any]:
        """(step, state) of the newest checkpoint that restores, or (0, like) when none does.

        Corrupt checkpoints on the way are moved to `corrupt/STEP`, each with a warning naming its step
        and why it was skipped.
        """
        for step in reversed(self.good_steps()):
            try:
                return step, self.restore(step, like, mesh)
            except CorruptCheckpoint as e:
                aside = self._move_aside(step)
                logging.warning("kdjax: skipped the checkpoint of step %d in %s: %s. Moved it to %s; resuming from "
                                "the newest earlier checkpoint, if any.", step, self.directory, e, aside)
        return 0, like

    def _move_aside(self, step: int) -> pathlib.Path:
        """Moves the checkpoint of `step` to `corrupt/STEP` (`corrupt/STEP.N` if taken); process 0 moves."""
        target, n = self.directory / CORRUPT_DIR / str(step), 0
        while target.exists():
            n += 1
            target = self.directory / CORRUPT_DIR / f"{step}.{n}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"kdjax_checkpoint_{step}_moved_aside")
        self._manager.reload()
        return target

    def reached_preemption(self, step: int) -> bool:
        """True when the platform signalled preemption to every process (JAX's preemption sync point)."""
        return self._manager.reached_preemption(step)

    def close(self) -> None:
        self._manager.close()
