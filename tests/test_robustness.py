"""Robustness of a run: corrupt checkpoints, a full disk, workdir locks and a bad environment (signals:
`test_signals.py`). Launcher tests run `launch.py` in real subprocesses (`launch_helpers`); resumed results are
compared bitwise with uninterrupted runs."""

import errno
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from launch_helpers import ROOT, TINY, assert_one_clean_error, assert_runs_equal, launch

from kdjax import train
from kdjax.core import checkpoints, workdir as workdir_lib
from kdjax.models import bundles


# ------------------------------------------------------------------------------ corrupt checkpoints
def tiny_config(**fields):
    config = train.load_config(f"{ROOT / 'configs' / 'classifier_kd.py'}:tiny")
    config.checkpoint_every = 5
    for name, value in fields.items():
        config[name] = value
    return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    train.train_and_evaluate(tiny_config(), workdir)
    return workdir


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped at step 15 of student_kd: its checkpoints there are 10 and 15."""
    workdir = tmp_path_factory.mktemp("stopped")
    assert train.train_and_evaluate(tiny_config(stop_after_steps=35), workdir) is None
    return workdir


CORRUPTIONS = ["truncated array file", "deleted array file", "garbage bytes", "garbage _METADATA"]


def largest_array_file(step_dir):
    """The largest data file that a restore reads. Small arrays live in the root OCDBT store (`default/d/`);
    large ones in the saving process's store (`default/ocdbt.process_0/d/`), which for small ones holds
    leftovers that no restore reads."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(files, key=lambda p: p.stat().st_size)
    root_store = [p for p in files if p.parent.parent.name == "default"]
    return largest if largest.stat().st_size > 100_000 else max(root_store, key=lambda p: p.stat().st_size)


def corrupt(step_dir, kind):
    target = largest_array_file(step_dir)
    if kind == "truncated array file":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif kind == "deleted array file":
        target.unlink()
    elif kind == "garbage bytes":
        data = bytearray(target.read_bytes())
        start = len(data) // 3
        data[start:start + 64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
        target.write_bytes(bytes(data))
    elif kind == "garbage _METADATA":
        (step_dir / "default" / "_METADATA").write_bytes(b"\x8f\x00garbage{")


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_latest_checkpoint_is_moved_aside_and_the_previous_one_used(kind, stopped, reference, tmp_path,
                                                                            caplog):
    workdir = tmp_path / "run"
    shutil.copytree(stopped, workdir)
    directory = workdir / "student_kd" / "checkpoints"
    assert sorted(p.name for p in directory.iterdir()) == ["10", "15"]
    corrupt(directory / "15", kind)
    with caplog.at_level("WARNING"):
        train.train_and_evaluate(tiny_config(), workdir)
    skipped = [r.getMessage() for r in caplog.records if "skipped the checkpoint of step" in r.getMessage()]
    assert len(skipped) == 1 and "step 15" in skipped[0] and "corrupt/15" in skipped[0], skipped
    assert (directory / "corrupt" / "15").is_dir()  # kept as evidence
    assert_runs_equal(reference, workdir)  # resumed from step 10, nothing lost but the corrupt steps


def test_a_replicated_state_round_trips_with_the_mesh_sharding(tmp_path):
    """A state replicated over the 8 devices (saved as host values) restores bit for bit, each leaf replicated
    over the mesh again, with nothing taken from the `like` tree but shapes and dtypes."""
    import jax.numpy as jnp

    from kdjax.core import parallel

    mesh = parallel.make_mesh()
    state = parallel.replicate({"w": jnp.arange(12.0).reshape(3, 4), "step": jnp.int32(7),
                                "key": jax.random.key_data(jax.random.key(3))}, mesh)
    ckpt = checkpoints.TrainCheckpoints(tmp_path)
    ckpt.save(7, state)
    ckpt.wait()
    step, restored = ckpt.restore_latest(jax.tree.map(jnp.zeros_like, state), mesh)
    assert step == 7
    for name, value in state.items():
        assert restored[name].sharding.is_equivalent_to(parallel.replicated(mesh), value.ndim), name
        assert restored[name].dtype == value.dtype
        np.testing.assert_array_equal(restored[name], value)
    ckpt.close()


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_restore_latest_skips_each_kind_of_corruption(kind, tmp_path, caplog):
    """At the checkpoint level, with arrays large enough to live in their own data files: garbage bytes there
    restore without any error from Orbax, and only the digest tells."""
    from kdjax.core import parallel

    mesh = parallel.make_mesh()
    state = {"w": np.arange(200_000, dtype=np.float32), "b": np.ones(7, np.float32)}
    ckpt = checkpoints.TrainCheckpoints(tmp_path, max_to_keep=3)
    for step in (1, 2):
        ckpt.save(step, jax.tree.map(lambda x: x * step, state))
    ckpt.wait()
    corrupt(tmp_path / "2", kind)
    if kind == "garbage bytes":  # Orbax alone reads other numbers without complaint
        silent = ckpt._manager.restore(2, args=ocp.args.StandardRestore(state))
        assert not np.array_equal(silent["w"], 2 * state["w"])
    with caplog.at_level("WARNING"):
        step, restored = ckpt.restore_latest(state, mesh)
    assert step == 1
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert [r.getMessage() for r in caplog.records if "skipped the checkpoint of step 2" in r.getMessage()]
    assert (tmp_path / "corrupt" / "2").is_dir() and ckpt.good_steps() == [1]
    ckpt.close()


def test_a_checkpoint_of_another_model_stops_the_launch_and_is_not_moved(stopped, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(stopped, workdir)
    config = tiny_config()
    config.student.kwargs.widths = (6, 8)  # another student: its checkpoints do not fit
    with pytest.raises(checkpoints.CheckpointError, match="step 15 .* does not fit this config .*conv1"):
        train.train_and_evaluate(config, workdir)
    assert sorted(p.name for p in (workdir / "student_kd" / "checkpoints").iterdir()) == ["10", "15"]


# ------------------------------------------------------------------------------------------ full disk
def test_a_failed_checkpoint_write_names_the_step_and_keeps_the_last_good_one(reference, tmp_path, monkeypatch):
    save = ocp.CheckpointManager.save

    def save_or_disk_full(self, step, *args, **kwargs):
        if step == 10 and "student_kd" in str(self.directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_or_disk_full)
    with pytest.raises(checkpoints.CheckpointWriteError,
                       match=r"step 10 .*the disk is full \(ENOSPC\); the checkpoint of step 5 is kept"):
        train.train_and_evaluate(tiny_config(), tmp_path)
    directory = tmp_path / "student_kd" / "checkpoints"
    assert sorted(p.name for p in directory.iterdir()) == ["5"]  # no half-written step 10
    monkeypatch.undo()
    train.train_and_evaluate(tiny_config(), tmp_path)  # resumes from step 5
    assert_runs_equal(reference, tmp_path)


def test_a_failed_bundle_write_is_one_clear_error_and_the_relaunch_finishes_the_run(reference, tmp_path,
                                                                                    monkeypatch):
    """The teacher phase trains to its end, then its bundle cannot be written: a CheckpointWriteError names the
    bundle and the reason, no temporary directory stays, and the relaunch (from the phase's last checkpoint)
    writes it and finishes the run as the uninterrupted one."""
    save = ocp.StandardCheckpointer.save

    def save_or_disk_full(self, directory, *args, **kwargs):
        if "teacher" in str(directory):
            (pathlib.Path(str(directory) + ".orbax-checkpoint-tmp-1")).mkdir()  # as Orbax leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save_or_disk_full)
    with pytest.raises(checkpoints.CheckpointWriteError,
                       match=r"could not write the model bundle '.*teacher/bundle': the disk is full \(ENOSPC\)"):
        train.train_and_evaluate(tiny_config(), tmp_path)
    assert list((tmp_path / "teacher" / "bundle").iterdir()) == []
    monkeypatch.undo()
    train.train_and_evaluate(tiny_config(), tmp_path)
    assert_runs_equal(reference, tmp_path)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 240 KiB tmpfs (root only): the tiny run's first teacher checkpoint fits, the second does not."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=240k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_gives_one_error_line_and_no_half_written_checkpoint(small_tmpfs):
    result = launch(TINY, f"--workdir={small_tmpfs / 'run'}", cwd=small_tmpfs.parent)
    assert_one_clean_error(result, "could not write the checkpoint of step 20", "the disk is full",
                           "the checkpoint of step 10 is kept")
    directory = small_tmpfs / "run" / "teacher" / "checkpoints"
    assert sorted(p.name for p in directory.iterdir()) == ["10"]
    restored = checkpoints.TrainCheckpoints(directory)._manager.restore(10)
    assert int(restored["step"]) == 10


# ---------------------------------------------------------------------------------------- workdir lock
def test_a_second_launch_into_a_held_workdir_is_refused_at_once(tmp_path):
    workdir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from kdjax.core import workdir; "
                               f"lock = workdir.WorkdirLock(workdir.prepare({str(workdir)!r})); lock.acquire(); "
                               "print('locked', flush=True); time.sleep(120)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        result = launch(TINY, f"--workdir={workdir}", cwd=tmp_path)
        assert time.monotonic() - start < 60
        assert_one_clean_error(result, f"is in use by process {holder.pid} on host {socket.gethostname()}",
                               "pass another --workdir")
        assert not (workdir / "config.json").exists()  # nothing of the held run was touched
    finally:
        holder.kill()
        holder.wait()


def dead_pid():
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    (tmp_path / workdir_lib.LOCK_NAME).write_text(f"{dead_pid()} {socket.gethostname()} 2020-01-01T00:00:00")
    with caplog.at_level("WARNING"):
        with train.hold_workdir(tmp_path):
            holder = (tmp_path / workdir_lib.LOCK_NAME).read_text().split()
            assert holder[:2] == [str(os.getpid()), socket.gethostname()]
    assert any("taking over the stale lock" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / workdir_lib.LOCK_NAME).exists()  # released at the end


def test_without_flock_the_recorded_holder_decides(tmp_path, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(workdir_lib.fcntl, "flock", no_flock)
    path = tmp_path / workdir_lib.LOCK_NAME
    path.write_text(f"{os.getppid()} {socket.gethostname()} 2020-01-01T00:00:00")  # alive, on this host
    with pytest.raises(workdir_lib.WorkdirError, match=f"in use by process {os.getppid()}"):
        workdir_lib.WorkdirLock(tmp_path).acquire()
    path.write_text(f"{dead_pid()} another-host 2020-01-01T00:00:00")  # another host: cannot tell, refuse
    with pytest.raises(workdir_lib.WorkdirError, match="on host another-host"):
        workdir_lib.WorkdirLock(tmp_path).acquire()
    path.write_text(f"{dead_pid()} {socket.gethostname()} 2020-01-01T00:00:00")  # dead, on this host: take over
    with workdir_lib.WorkdirLock(tmp_path):
        assert path.read_text().split()[0] == str(os.getpid())


# ----------------------------------------------------------------------------------- bad environment
def garbage_bundle(root):
    """A classifier bundle with a valid model.json and random bytes in every file of variables/."""
    from kdjax import models

    kwargs = dict(num_classes=10, widths=(8, 16), blocks_per_stage=(1, 1))
    model = models.build_model("resnet", **kwargs)
    variables = model.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
    bundles.save_model_bundle(root / "teacher", "resnet", kwargs, variables)
    rng = np.random.default_rng(0)
    for path in (root / "teacher" / "variables").rglob("*"):
        if path.is_file():
            path.write_bytes(rng.integers(0, 256, max(path.stat().st_size, 64), dtype=np.uint8).tobytes())
    return root / "teacher"


def image_folder_with_bad_files(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / label / f"{i}.png")
    good = (root / "a" / "0.png").read_bytes()
    (root / "a" / "corrupt.png").write_bytes(good[: len(good) // 2])
    (root / "b" / "empty.jpg").write_bytes(b"")
    return root


def read_only_tmpfs(path):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    return path


@pytest.mark.parametrize("case", ["workdir is a file", "read-only workdir", "missing config file", "bad config variant",
                                  "garbage bundle variables", "corrupt image files"])
def test_bad_environment_and_inputs_give_one_error_line_before_compute(case, tmp_path):
    workdir, args, fragments, mounted = tmp_path / "run", [TINY], [], None
    if case == "workdir is a file":
        workdir.write_text("not a directory")
        fragments = [str(workdir), "is an existing file"]
    elif case == "read-only workdir":
        mounted = read_only_tmpfs(tmp_path / "ro")
        workdir = mounted / "run"
        fragments = [str(workdir), "not writable", "Read-only file system"]
    elif case == "missing config file":
        args = ["--config=nope.py"]
        fragments = ["--config=nope.py", "there is no config file", "configs/classifier_kd.py"]
    elif case == "bad config variant":
        args = [TINY.replace(":tiny", ":huge")]
        fragments = ["classifier_kd.py:huge", "does not load", "unknown variant 'huge'"]
    elif case == "garbage bundle variables":
        bundle = garbage_bundle(tmp_path)
        args.append(f"--config.teacher.checkpoint={bundle}")
        fragments = ["config.teacher.checkpoint", str(bundle / "variables"), "not a readable Orbax checkpoint"]
    elif case == "corrupt image files":
        folder = image_folder_with_bad_files(tmp_path / "images")
        args += ["--config.data.source=folder", f"--config.data.folder={folder}"]
        fragments = ["2 of 10 image files are unreadable", "corrupt.png", "empty.jpg"]
    try:
        result = launch(*args, f"--workdir={workdir}", cwd=tmp_path, timeout=120)
    finally:
        if mounted is not None:
            subprocess.run(["umount", str(mounted)], check=True)
    assert_one_clean_error(result, *fragments)
    assert "steps_per_sec" not in result.stderr  # stopped before any training step
