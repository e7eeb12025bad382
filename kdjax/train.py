"""The single entry point: `train_and_evaluate(config, workdir)`, for launch.py and notebooks.

`config.task` picks the trainer from `kdjax.tasks.TASKS`; `check_config` validates the whole config (names,
ranges, paths, checkpoints) before any compute, raising `ValueError` with the bad field and what would be
valid. `load_config` reads a config file as `--config=PATH[:ARG]` does. A run holds its workdir's lock
(`kdjax.core.workdir`) from before any compute to its end, so a second run into the same workdir is
refused at once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import pathlib
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from kdjax.core import workdir as workdir_lib
from kdjax.tasks import TASKS, checks, task_module

__all__ = ["TASKS", "check_config", "hold_workdir", "load_config", "open_kwargs_blocks", "run_checked",
           "train_and_evaluate"]


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates `config` before any compute. Raises ValueError naming the bad field."""
    module = task_module(config.task)
    checks.check_run(config)
    module.check_config(config)


def load_config(spec: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config a config file describes, as `--config=PATH[:ARG]` would load it (for notebooks and tests).

    `spec` is `PATH` or `PATH:ARG` (e.g. "configs/stylegan_to_dcgan.py:tiny"); `get_config(ARG)` is called
    when ARG is given. Set fields directly, then call `train_and_evaluate`. Like `--config` on the command line
    the config is locked: a misspelt field raises AttributeError (naming the fields there are) instead of being
    added. Model `kwargs` blocks stay open, since models take more arguments than a config lists; their names
    are checked against the model by `check_config`.
    """
    path_text, _, arg = str(spec).partition(":")
    path = pathlib.Path(path_text).expanduser()
    if not path.is_file():
        raise ValueError(f"config file {path_text!r} does not exist; expected a path like configs/NAME.py[:ARG].")
    module_spec = importlib.util.spec_from_file_location(f"kdjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path_text!r} defines no get_config().")
    config = module.get_config(arg) if arg else module.get_config()
    config.lock()
    open_kwargs_blocks(config)
    return config


def open_kwargs_blocks(config: ml_collections.ConfigDict) -> None:
    """Unlocks every `kwargs` block under `config` (model arguments, free-form by design)."""
    for name, value in config.items():
        if not isinstance(value, ml_collections.ConfigDict):
            continue
        if name == "kwargs":
            value.unlock()
        else:
            open_kwargs_blocks(value)


def run_checked(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Any:
    """Runs `config`'s task in `workdir`, holding its lock, after recording `config` in `workdir/config.json`;
    the caller has run `check_config`. Raises WorkdirError (before any compute) when the workdir is not a
    writable directory or another live run holds it."""
    workdir = pathlib.Path(workdir)
    with hold_workdir(workdir):
        if jax.process_index() == 0:
            (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
        return task_module(config.task).train_and_evaluate(config, workdir)


@contextlib.contextmanager
def hold_workdir(workdir: pathlib.Path) -> Iterator[None]:
    """Prepares and locks `workdir` for the block (`kdjax.core.workdir`). Only process 0 takes the lock; in a
    multi-process run it tells the others whether it could, so that all of them stop together if not."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            workdir_lib.prepare(workdir)
            lock = workdir_lib.WorkdirLock(workdir)
            lock.acquire()
        except workdir_lib.WorkdirError as e:
            error = e
        except OSError as e:
            error = workdir_lib.WorkdirError(f"cannot lock workdir {str(workdir)!r} ({e.strerror or e}).")
    if jax.process_count() > 1:
        locked = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not locked and error is None:
            error = workdir_lib.WorkdirError(f"process 0 could not lock workdir {str(workdir)!r} (see its error).")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Any:
    """Validates `config` (`check_config`), then runs its task; returns the task's report."""
    check_config(config)
    return run_checked(config, workdir)
