"""Data parallelism: 8 devices equal 1 device (SGD), equal a plain unsharded gradient step, and two
processes (jax.distributed, gloo) equal one."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from kdjax import losses
from kdjax.core import parallel
from kdjax.models import bundles as checkpoints
from kdjax.steps import classifier as classifier_kd
from kdjax.models.classifier import ResNet
from kdjax.steps.state import TrainState

HERE = pathlib.Path(__file__).resolve().parent


def _setup(kd: bool):
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (32, 8, 8, 1)).astype(np.float32),
             "label": rng.integers(0, 10, 32).astype(np.int32)}
    student = ResNet(num_classes=10, widths=(4, 8), blocks_per_stage=(1, 1), bn_axis_name=parallel.DATA_AXIS)
    variables = student.clone(bn_axis_name=None).init(jax.random.key(0), batch["image"][:1])
    teacher = ResNet(num_classes=10, widths=(8,), blocks_per_stage=(1,)) if kd else None
    teacher_vars = teacher.init(jax.random.key(1), batch["image"][:1]) if kd else {}
    return batch, student, variables, teacher, teacher_vars


def _run_steps(devices, kd, num_steps=3):
    batch, student, variables, teacher, teacher_vars = _setup(bool(kd))
    mesh = parallel.make_mesh(devices)
    tx = optax.sgd(0.5)
    step = classifier_kd.make_train_step(student, tx, mesh, teacher, alpha=0.3, temperature=2.0,
                                         embedding_weight=1.0 if kd == "embedding" else 0.0)
    state = parallel.replicate(TrainState.create(variables, tx), mesh)
    teacher_vars = parallel.replicate(teacher_vars, mesh)
    for _ in range(num_steps):
        state, metrics = step(state, parallel.global_batch(batch, mesh), teacher_vars)
    return parallel.to_host(state), {k: float(v) for k, v in metrics.compute().items()}


@pytest.mark.parametrize("kd", [False, True, "embedding"])
def test_eight_devices_equal_one_device_with_sgd(kd):
    # "embedding": relational distillation over the batch's pairs, gathered from every device.
    state8, metrics8 = _run_steps(jax.devices(), kd)
    state1, metrics1 = _run_steps(jax.devices()[:1], kd)
    if kd == "embedding":
        assert metrics8["embedding"] == pytest.approx(metrics1["embedding"], rel=1e-5) and metrics8["embedding"] > 0
    for a, b in zip(jax.tree.leaves(state8.params), jax.tree.leaves(state1.params)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    for a, b in zip(jax.tree.leaves(state8.model_state), jax.tree.leaves(state1.model_state)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)  # BatchNorm statistics synced over devices
    assert metrics8["loss"] == pytest.approx(metrics1["loss"], rel=1e-5)


def test_sharded_step_equals_plain_full_batch_gradient():
    """An independent computation: one SGD step with jax.grad over the whole batch, no shard_map."""
    batch, student, variables, teacher, teacher_vars = _setup(kd=True)
    plain = student.clone(bn_axis_name=None)

    def loss_fn(params):
        logits, _ = plain.apply({"params": params, "batch_stats": variables["batch_stats"]}, batch["image"],
                                train=True, mutable=["batch_stats"])
        t = teacher.apply(teacher_vars, batch["image"])
        return losses.classic_kd(logits, t, batch["label"], 0.3, 2.0)[0]

    grads = jax.grad(loss_fn)(variables["params"])
    expected = jax.tree.map(lambda p, g: p - 0.5 * g, variables["params"], grads)
    state8, _ = _run_steps(jax.devices(), kd=True, num_steps=1)
    for a, b in zip(jax.tree.leaves(state8.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices_per_process):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    """The tiny classic-KD run with 2 processes x 2 devices (jax.distributed over gloo) equals 1 x 4."""
    worker = HERE / "multiprocess_worker.py"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(worker), str(tmp_path / "multi"), f"127.0.0.1:{port}", "2", str(i)],
                              env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    single = subprocess.run([sys.executable, str(worker), str(tmp_path / "single"), "", "1", "0"], env=_env(4),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert single.returncode == 0, single.stdout[-3000:]
    multi_params = checkpoints.load_model_bundle(tmp_path / "multi" / "student_kd" / "bundle")[1]["params"]
    single_params = checkpoints.load_model_bundle(tmp_path / "single" / "student_kd" / "bundle")[1]["params"]
    assert jax.tree.structure(multi_params) == jax.tree.structure(single_params)
    for a, b in zip(jax.tree.leaves(multi_params), jax.tree.leaves(single_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    multi_report = json.loads((tmp_path / "multi" / "report.json").read_text())
    single_report = json.loads((tmp_path / "single" / "report.json").read_text())
    for model in ("teacher", "student_kd", "student_scratch"):
        assert multi_report[model]["accuracy"] == pytest.approx(single_report[model]["accuracy"], abs=1e-9)
    assert len(list((tmp_path / "multi").glob("events.out.tfevents*"))) == 1  # only process 0 writes events
