"""The PixelCNN distillation task end to end (tiny): report, exact resume, 8 devices equal 1 for its step,
and bad configs as one clear error before compute."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import models, train
from kdjax.core import parallel
from kdjax.models import bundles
from kdjax.steps.autoregressive import make_train_step
from kdjax.steps.state import TrainState

ROOT = pathlib.Path(__file__).resolve().parent.parent
PHASES = ("teacher", "student_kd", "student_seq", "student_scratch")
TIMING = ("sample_images_per_s",)


def load_config(arg="tiny"):
    return train.load_config(f"{ROOT / 'configs' / 'pixelcnn_kd.py'}:{arg}")


def without_timing(report):
    return {k: ({f: x for f, x in v.items() if f not in TIMING} if isinstance(v, dict) else v)
            for k, v in report.items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, train.train_and_evaluate(load_config(), workdir)


def test_tiny_run_reports_every_model(uninterrupted):
    workdir, report = uninterrupted
    saved = json.loads((workdir / "report.json").read_text())
    uniform = np.log2(5)  # bits/dim of the uniform distribution over the 5 levels
    for phase in PHASES:
        r = saved[phase]
        assert 0 < r["test_bits_per_dim"] < uniform, (phase, r)
        assert r["flops_per_sample"] == pytest.approx(r["flops_per_forward"] * 16)  # 4 x 4 x 1 passes
        assert (workdir / phase / "bundle" / "model.json").is_file()
    assert saved["teacher"]["params"] > saved["student_kd"]["params"] == saved["student_scratch"]["params"]
    assert np.load(workdir / "teacher_samples.npz")["levels"].shape == (64, 4, 4, 1)
    assert (workdir / "samples.png").is_file() and "| student_seq |" in (workdir / "report.md").read_text()
    student_files = {p.name for p in (workdir / "student_kd" / "checkpoints").rglob("*")}
    assert not any("teacher" in name for name in student_files)


def test_stop_and_resume_equals_uninterrupted_bitwise(uninterrupted, tmp_path):
    reference, report = uninterrupted
    config = load_config()
    config.stop_after_steps = 27  # the teacher's 20 steps, then 7 of student_kd's 20
    assert train.train_and_evaluate(config, tmp_path) is None
    resumed = train.train_and_evaluate(load_config(), tmp_path)
    for phase in PHASES:
        for a, b in zip(jax.tree.leaves(bundles.load_model_bundle(reference / phase / "bundle")[1]),
                        jax.tree.leaves(bundles.load_model_bundle(tmp_path / phase / "bundle")[1]), strict=True):
            np.testing.assert_array_equal(a, b)
    assert without_timing(resumed) == without_timing(report)


def test_kd_step_on_8_devices_equals_1():
    """One SGD step of word-level KD on a batch of 16: 8 devices give the 1-device parameters."""
    kw = dict(resolution=4, channels=1, levels=5, features=4, layers=2, kernel_size=3)
    student = models.build_model("pixelcnn", **kw)
    teacher = models.build_model("pixelcnn", **{**kw, "features": 8})
    x = jnp.zeros((1, 4, 4, 1))
    t_vars = teacher.init(jax.random.key(0), x)
    s_vars = student.init(jax.random.key(1), x)
    levels = jax.random.randint(jax.random.key(2), (16, 4, 4, 1), 0, 5)
    batch = {"image": levels / 2.0 - 1.0, "label": jnp.zeros((16,), jnp.int32)}
    tx = optax.sgd(0.5)
    params = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        step = make_train_step(student, tx, mesh, conditional=False, teacher=teacher, alpha=0.3, temperature=2.0)
        state = parallel.replicate(TrainState.create(s_vars, tx), mesh)
        state, _ = step(state, parallel.global_batch(batch, mesh), parallel.replicate(t_vars, mesh))
        params.append(jax.tree.leaves(parallel.to_host(state.params)))
    assert len(jax.devices()) == 8
    for a, b in zip(*params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not all(np.array_equal(a, b) for a, b in zip(params[0], jax.tree.leaves(s_vars["params"])))


@pytest.mark.parametrize("override,message", [
    ("levels=1", "config.levels=1 must be in [2, 256]"),
    ("kd.sequence_samples=-1", "config.kd.sequence_samples=-1 must be >= 0"),
    ("kd.alpha=1.5", "config.kd.alpha=1.5 must be in [0, 1]"),
    ("teacher.model='cnn'", "config.teacher.model='cnn'; valid autoregressives: ['pixelcnn']"),
])
def test_bad_config_values_fail_before_compute(override, message):
    config = load_config(f"tiny,{override}")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        train.check_config(config)


def test_levels_are_set_once_for_every_model():
    config = load_config()
    config.student.kwargs.levels = 9
    with pytest.raises(ValueError, match="config.student.kwargs.levels: leave it out; config.levels sets it"):
        train.check_config(config)


def test_teacher_bundle_of_another_kind_or_levels(uninterrupted):
    reference, _ = uninterrupted
    config = load_config()
    config.teacher.checkpoint = str(ROOT / "kdjax" / "pretrained" / "digits32" / "judge")
    with pytest.raises(ValueError, match="holds a 'resnet' \\(classifier\\); an autoregressive bundle"):
        train.check_config(config)
    config.teacher.checkpoint = str(reference / "teacher" / "bundle")
    config.levels = 7
    with pytest.raises(ValueError, match="models 5 levels; config.levels=7"):
        train.check_config(config)


def test_default_config_uses_the_shipped_teacher_and_checks_its_shape():
    config = load_config("")
    train.check_config(config)  # the shipped digits teacher: 8x8x1, 17 levels, unconditional
    meta = bundles.check_model_bundle(config.teacher.checkpoint, "t", kind="autoregressive")
    assert meta["kwargs"]["levels"] == config.levels == 17
    with pytest.raises(ValueError, match=r"models 8x8x1 images; the data is 16x16x1 \(config.data.resolution"):
        train.check_config(load_config("data.resolution=16"))
    with pytest.raises(ValueError, match="is unconditional; config.conditional=True"):
        train.check_config(load_config("conditional=True"))
