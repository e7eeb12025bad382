"""The single entry point: `train_and_evaluate(config, workdir)`, for launch.py and notebooks.

`config.task` picks the trainer from `TASKS`; `check_config` validates the whole config (names, ranges,
paths, checkpoints) before any compute, raising `ValueError` with the bad field and what would be valid.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import pathlib
from typing import Any

import jax
import ml_collections

from kdjax import checkpoints, data, models, optim

# task name -> module with `train_and_evaluate(config, workdir)` and `check_config(config)`.
TASKS: dict[str, str] = {
    "classifier_kd": "kdjax.classifier_kd",
    "gan": "kdjax.gan",
    "distill": "kdjax.distill_job",
}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _check_common(config: ml_collections.ConfigDict) -> None:
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"config.compute_dtype={config.compute_dtype!r}; valid: {list(COMPUTE_DTYPES)}.")
    for field in ("log_every", "checkpoint_every", "max_to_keep", "eval_batch_size"):
        if config[field] < 1:
            raise ValueError(f"config.{field}={config[field]} must be >= 1.")
    if config.eval_batch_size % jax.device_count():
        raise ValueError(f"config.eval_batch_size={config.eval_batch_size} must be a multiple of the device "
                         f"count ({jax.device_count()}).")


def check_phase(block: ml_collections.ConfigDict, field: str) -> None:
    """Checks a `phase_train_config` block: step count, batch divisibility, optimizer."""
    if block.num_steps < 1:
        raise ValueError(f"{field}.num_steps={block.num_steps} must be >= 1.")
    n = jax.device_count()
    if block.batch_size < 1 or block.batch_size % n or block.batch_size % jax.process_count():
        raise ValueError(f"{field}.batch_size={block.batch_size} must be a positive multiple of the device count "
                         f"({n}) and of the process count ({jax.process_count()}).")
    optim.check_optimizer_config(block.optimizer, f"{field}.optimizer")


def check_classifier_kd(config: ml_collections.ConfigDict) -> None:
    data.check_data_config(config.data)
    for role in ("teacher", "student"):
        block = config[role]
        models.check_model_kwargs(block.model, block.kwargs.to_dict(), where=f"config.{role}.kwargs")
        if "num_classes" in block.kwargs:
            raise ValueError(f"config.{role}.kwargs.num_classes: leave it out; it is taken from the dataset.")
        check_phase(block.train, f"config.{role}.train")
    if config.teacher.checkpoint:
        checkpoints.check_model_bundle(config.teacher.checkpoint, "config.teacher.checkpoint")
    if not 0.0 <= config.kd.alpha <= 1.0:
        raise ValueError(f"config.kd.alpha={config.kd.alpha} must be in [0, 1].")
    if not config.kd.temperature > 0:
        raise ValueError(f"config.kd.temperature={config.kd.temperature} must be > 0.")


def check_gan(config: ml_collections.ConfigDict) -> None:
    from kdjax import gan

    gan.check_gan_config(config)


def check_distill(config: ml_collections.ConfigDict) -> None:
    from kdjax import distill_job

    distill_job.check_config(config)


CHECKS = {"classifier_kd": check_classifier_kd, "gan": check_gan, "distill": check_distill}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates `config` before any compute. Raises ValueError naming the bad field."""
    if config.task not in TASKS:
        raise ValueError(f"config.task={config.task!r} is not a task; valid: {sorted(TASKS)}.")
    _check_common(config)
    CHECKS[config.task](config)


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
    return importlib.import_module(TASKS[config.task]).train_and_evaluate(config, workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Any:
    """Validates `config` (`check_config`), then runs its task; returns the task's report."""
    check_config(config)
    return run_checked(config, workdir)
