"""End to end: the tiny classic-KD run, exact resume, the TFDS path, a frozen teacher, bad input."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from launch_helpers import TINY, assert_runs_equal, bundle_leaves, launch, launch_env

from kdjax import train
from kdjax.core import checkpoints
from kdjax.models import bundles

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_config(name="classifier_kd", arg="tiny"):
    return train.load_config(f"{ROOT / 'configs' / name}.py:{arg}")


def bundle_params(path):
    return jax.tree.leaves(bundles.load_model_bundle(path)[1])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    report = train.train_and_evaluate(load_config(), workdir)
    return workdir, report


def test_smoke_run_writes_report_and_artifacts(uninterrupted):
    workdir, report = uninterrupted
    saved = json.loads((workdir / "report.json").read_text())
    for model in ("teacher", "student_kd", "student_scratch"):
        assert set(saved[model]) == {"accuracy", "macro_f1", "ece", "params", "retrieval"}
        assert set(saved[model]["retrieval"]) == {"recall@1", "recall@5", "map"}
        assert 0.0 <= saved[model]["accuracy"] <= 1.0
    assert saved["teacher"]["params"] > saved["student_kd"]["params"] == saved["student_scratch"]["params"]
    assert "| student_kd |" in (workdir / "report.md").read_text()
    assert list((workdir / "images").glob("*.png")) and list(workdir.glob("events.out.tfevents*"))
    # Each phase checkpointed its final step; the teacher is not inside the students' checkpoints.
    for phase in ("teacher", "student_kd", "student_scratch"):
        assert (workdir / phase / "checkpoints" / "20").is_dir()
    student_files = {p.name for p in (workdir / "student_kd" / "checkpoints").rglob("*")}
    assert not any("teacher" in name for name in student_files)
    assert report["student_kd"]["accuracy"] == saved["student_kd"]["accuracy"]


def test_stop_and_resume_equals_uninterrupted_bitwise(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    config = load_config()
    config.stop_after_steps = 27  # the teacher's 20 steps, then 7 of student_kd's 20
    assert train.train_and_evaluate(config, tmp_path) is None
    assert (tmp_path / "student_kd" / "checkpoints" / "7").is_dir() and not (tmp_path / "report.json").exists()
    config.stop_after_steps = -1
    train.train_and_evaluate(load_config(), tmp_path)
    for phase in ("teacher", "student_kd", "student_scratch"):
        for a, b in zip(bundle_params(reference / phase / "bundle"), bundle_params(tmp_path / phase / "bundle")):
            np.testing.assert_array_equal(a, b)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads((reference / "report.json").read_text())


def test_pretrained_teacher_bundle_is_loaded_frozen(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    config = load_config()
    config.teacher.checkpoint = str(reference / "teacher" / "bundle")
    before = bundle_params(reference / "teacher" / "bundle")
    report = train.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "teacher").exists()  # not retrained, not re-saved
    for a, b in zip(before, bundle_params(reference / "teacher" / "bundle")):
        np.testing.assert_array_equal(a, b)
    ref = json.loads((reference / "report.json").read_text())
    assert report["teacher"] == ref["teacher"] and report["student_kd"] == ref["student_kd"]


def test_validation_split_scores_every_model_apart_from_the_test_split(tmp_path):
    config = load_config(arg="tiny,data.validation_fraction=0.2")
    report = train.train_and_evaluate(config, tmp_path)
    assert report["num_validation_examples"] == round(0.2 * 1438) and report["num_test_examples"] == 359
    for phase in ("teacher", "student_kd", "student_scratch"):
        assert set(report[phase]["validation"]) == {"accuracy", "macro_f1", "ece", "retrieval"}
        assert 0.0 <= report[phase]["validation"]["accuracy"] <= 1.0


def test_tfds_path_on_mock_data(tmp_path):
    config = load_config()
    config.data.source, config.data.name = "tfds", "mnist"
    config.data.resolution = 8
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        report = train.train_and_evaluate(config, tmp_path)
    assert report["dataset"] == "mnist" and report["num_test_examples"] == 64


@pytest.mark.parametrize("override, message", [
    (("teacher", "model", "transformer"), "config.teacher.model='transformer'; valid classifiers: ['cnn', 'resnet']"),
    (("student", "train", "optimizer", "name", "lamb"), "optimizer.name='lamb' is not an optimizer; valid"),
    (("data", "source", "imagenet"), "config.data.source='imagenet' is not a data source"),
    (("data", "source", "folder"), "config.data.folder='' is not an existing directory"),
    (("teacher", "checkpoint", "/no/such/bundle"), "config.teacher.checkpoint='/no/such/bundle' is not an existing"),
    (("kd", "alpha", 1.5), "config.kd.alpha=1.5 must be in"),
    (("task", "gan_of_theseus"), "config.task='gan_of_theseus' is not a task"),
    (("student", "train", "batch_size", 12), "batch_size=12 must be a positive multiple of the device count"),
])
def test_bad_config_values_fail_before_compute(override, message):
    config = load_config()
    *path, value = override
    block = config
    for key in path[:-1]:
        block = block[key]
    block[path[-1]] = value
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace("[", "\\[")):
        train.check_config(config)


def test_unknown_model_field_names_valid_fields():
    config = load_config()
    config.student.kwargs.depth = 3
    with pytest.raises(ValueError, match=r"no field\(s\) \['depth'\]; valid fields: .*'widths'"):
        train.check_config(config)


def test_unreadable_teacher_bundle(tmp_path):
    (tmp_path / "variables").mkdir()
    (tmp_path / "model.json").write_text("{not json")
    config = load_config()
    config.teacher.checkpoint = str(tmp_path)
    with pytest.raises(checkpoints.CheckpointError, match="unreadable .*model.json"):
        train.check_config(config)


def _launch(*args, cwd):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flag, message", [
    ("--config.kd.bogus=1", "the config has no field 'bogus'"),  # unknown key
    ("--config.train.num_steps=5", "the config has no field 'train'"),  # unknown block
    ("--config.kd.temperature=hot", "could not convert string to float: 'hot'"),  # wrong type
    ("--config.data.source=cifar", "config.data.source='cifar' is not a data source"),
    ("--config.teacher.checkpoint=/missing/teacher", "/missing/teacher"),
])
def test_launch_reports_bad_input_in_one_message(flag, message, tmp_path):
    result = _launch(f"--config={ROOT / 'configs' / 'classifier_kd.py'}:tiny", flag, f"--workdir={tmp_path / 'w'}",
                     cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "w").exists()  # nothing was started


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    config = load_config()
    config.log_every, config.checkpoint_every = 20, 5  # checkpoint steps that are not log steps
    config.stop_after_steps = 5
    assert train.train_and_evaluate(config, tmp_path) is None  # a good checkpoint at step 5
    good = checkpoints.TrainCheckpoints(tmp_path / "teacher" / "checkpoints")._manager.restore(5)
    config.stop_after_steps = -1
    config.teacher.train.optimizer.learning_rate = 1e30  # diverges right away
    with pytest.raises(FloatingPointError, match=r"Non-finite training metrics .* in steps 6\.\.10"):
        train.train_and_evaluate(config, tmp_path)
    directory = tmp_path / "teacher" / "checkpoints"
    assert sorted(p.name for p in directory.iterdir() if p.name.isdigit()) == ["5"]  # nothing NaN was saved
    kept = checkpoints.TrainCheckpoints(directory)._manager.restore(5)
    for a, b in zip(jax.tree.leaves(good["params"]), jax.tree.leaves(kept["params"])):
        np.testing.assert_array_equal(a, b)


def test_load_config_reads_a_file_with_its_argument_and_names_a_bad_path(tmp_path):
    tiny, full = train.load_config(f"{ROOT}/configs/classifier_kd.py:tiny"), train.load_config(ROOT / "configs/classifier_kd.py")
    assert tiny.teacher.train.num_steps == 20 and full.teacher.train.num_steps == 1500
    tiny.kd.alpha = 0.5  # a notebook sets fields directly
    with pytest.raises(AttributeError, match='"alpa" does not exist.*Did you mean "alpha"'):
        tiny.kd.alpa = 0.5  # locked like --config: a typo is not silently added
    tiny.student.kwargs.depth = 3  # model kwargs stay open (check_config names unknown ones)
    assert tiny.student.kwargs.depth == 3
    with pytest.raises(ValueError, match="no_such.py"):
        train.load_config(tmp_path / "no_such.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="get_config"):
        train.load_config(tmp_path / "empty.py")


def test_bundle_variables_are_checked_against_model_json_before_compute(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    bundle = tmp_path / "teacher"
    shutil.copytree(reference / "teacher" / "bundle", bundle)
    config = load_config()
    config.teacher.checkpoint = str(bundle)
    train.check_config(config)  # the bundle as exported: its shapes fit its model.json
    meta = json.loads((bundle / "model.json").read_text())
    meta["kwargs"]["widths"] = [8, 32]  # model.json now describes another network than variables/ holds
    (bundle / "model.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoints.CheckpointError, match=r"do not fit the 'resnet' .*has shape .*\(16,\), the "
                                                          r"model \(32,\)"):
        train.check_config(config)
    shutil.rmtree(bundle / "variables")
    (bundle / "variables").mkdir()
    (bundle / "variables" / "_METADATA").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(checkpoints.CheckpointError, match="not a readable Orbax checkpoint"):
        train.check_config(config)


# ---------------------------------------------------------------------------------- reproducibility
# Large enough reductions (BatchNorm over 128 x 16 x 16) for XLA:CPU to sum them differently on 1 thread.
REDUCTION_SENSITIVE = ("--config.data.resolution=16", "--config.teacher.train.batch_size=128",
                       "--config.student.train.batch_size=128")


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not shutil.which("taskset"), reason="needs 2 CPUs and taskset")
def test_runs_do_not_depend_on_the_compilation_cache_or_how_many_cpus_the_machine_shows(tmp_path):
    """Fresh processes give the same numbers bit for bit: the first compiling everything into an empty persistent
    cache, the second served from it (the cache stores executables, never results), a third on 1 CPU, where the
    launcher gives XLA a pool of 2 threads (launch.pin_cpu_threads). The control, a pool of 1 thread asked for
    explicitly, differs: the check has teeth."""
    cache = tmp_path / "jax_cache"
    env = {k: v for k, v in launch_env(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                                       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1").items()
           if k not in ("PJRT_NPROC", "NPROC")}
    cpu = str(sorted(os.sched_getaffinity(0))[0])

    def run(name, prefix=(), **extra):
        result = subprocess.run([*prefix, sys.executable, str(ROOT / "launch.py"), TINY, *REDUCTION_SENSITIVE,
                                 f"--workdir={tmp_path / name}"], cwd=tmp_path, env={**env, **extra},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return tmp_path / name

    executables = lambda: {name for name in os.listdir(cache) if name.endswith("-cache")}
    cold = run("cold")
    entries = executables()
    assert entries  # the cold run filled the cache
    assert_runs_equal(cold, run("warm"))
    assert executables() == entries  # everything was served from the cache
    assert_runs_equal(cold, run("one_cpu", ("taskset", "-c", cpu)))
    pool_of_one = run("pool_of_one", PJRT_NPROC="1")
    teacher = [bundle_leaves(path / "teacher" / "bundle") for path in (cold, pool_of_one)]
    assert any(not np.array_equal(a, b) for a, b in zip(*teacher))
