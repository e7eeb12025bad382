"""kdjax's tasks, by the name a config's `task` field gives. Each module exposes
`check_config(config)` (every check before any compute, raising ValueError naming the field) and
`train_and_evaluate(config, workdir)` (its phases, resumable, and its report)."""

from __future__ import annotations

import importlib
from types import ModuleType

# task name -> module. Imported on demand, so a task's import cost is paid only when it runs.
TASKS: dict[str, str] = {
    "classifier_kd": "kdjax.tasks.classifier_kd",
    "gan": "kdjax.tasks.gan",
    "distill": "kdjax.tasks.distill",
    "pixelcnn_kd": "kdjax.tasks.pixelcnn_kd",
    "restoration_kd": "kdjax.tasks.restoration_kd",
    "vae_kd": "kdjax.tasks.vae_kd",
    "diffusion_teacher": "kdjax.tasks.diffusion_teacher",
    "diffusion_distill": "kdjax.tasks.diffusion_distill",
}


def task_module(name: str) -> ModuleType:
    """The module of task `name` (ValueError listing the tasks for an unknown name)."""
    if name not in TASKS:
        raise ValueError(f"config.task={name!r} is not a task; valid: {sorted(TASKS)}.")
    return importlib.import_module(TASKS[name])
