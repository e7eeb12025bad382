"""Helpers for tests that run `launch.py` in real subprocesses (1 CPU device) and check what a user sees:
the exit status, one `kdjax: error:` line and no traceback, and results bitwise equal to another run's."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

from kdjax.models import bundles

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = f"--config={ROOT / 'configs' / 'classifier_kd.py'}:tiny"
PHASES = ("teacher", "student_kd", "student_scratch")


def launch_env(**extra):
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu", **extra}


def launch(*args, cwd, env=None, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, env=env or launch_env(),
                          capture_output=True, text=True, timeout=timeout)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("kdjax: error:")]


def assert_one_clean_error(result, *fragments):
    """Exit status 2, one `kdjax: error:` line holding every fragment, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def bundle_leaves(path):
    return jax.tree.leaves(bundles.load_model_bundle(path)[1])


def assert_runs_equal(a, b):
    """Every phase's exported variables bitwise equal, and the same report."""
    for phase in PHASES:
        for x, y in zip(bundle_leaves(a / phase / "bundle"), bundle_leaves(b / phase / "bundle"), strict=True):
            np.testing.assert_array_equal(x, y)
    assert json.loads((a / "report.json").read_text()) == json.loads((b / "report.json").read_text())
