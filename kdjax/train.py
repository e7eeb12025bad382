"""The single entry point: `train_and_evaluate(config, workdir)`, for launch.py and notebooks.

`config.task` picks the trainer from `kdjax.tasks.TASKS`; `check_config` validates the whole config (names,
ranges, paths, checkpoints) before any compute, raising `ValueError` with the bad field and what would be
valid. `load_config` reads a config file as `--config=PATH[:ARG]` does.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
from typing import Any

import jax
import ml_collections

from kdjax.tasks import TASKS, checks, task_module

__all__ = ["TASKS", "check_config", "load_config", "open_kwargs_blocks", "run_checked", "train_and_evaluate"]


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
    """Records `config` in `workdir/config.json` and runs its task; the caller has run `check_config`."""
    workdir = pathlib.Path(workdir)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    return task_module(config.task).train_and_evaluate(config, workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Any:
    """Validates `config` (`check_config`), then runs its task; returns the task's report."""
    check_config(config)
    return run_checked(config, workdir)
