"""Signals stop a run with a checkpoint of the step reached: one process, and two processes where only one
is signalled (JAX's preemption sync point stops both at one step). `launch.py` runs in real subprocesses
(`launch_helpers`); each relaunch is compared bitwise with an uninterrupted run."""

import signal
import socket
import subprocess
import sys

import pytest
from launch_helpers import ROOT, TINY, assert_runs_equal, error_lines, launch, launch_env

from kdjax.core import workdir as workdir_lib

# A teacher phase long enough to be interrupted in its middle, and no periodic checkpoint in it: a checkpoint
# at the signal's step can only come from the signal handling.
LONG_TEACHER = ("--config.teacher.train.num_steps=300", "--config.log_every=5", "--config.checkpoint_every=1000")


# ------------------------------------------------------------------------------------------- one process
@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("long_reference") / "run"
    result = launch(TINY, *LONG_TEACHER, f"--workdir={workdir}", cwd=workdir.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def interrupt(workdir, sig):
    """Launches the long-teacher run, sends `sig` once the log shows training steps; returns the result."""
    process = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), TINY, *LONG_TEACHER, f"--workdir={workdir}"],
                               cwd=workdir.parent, env=launch_env(), stderr=subprocess.PIPE, text=True)
    seen = []
    for line in process.stderr:
        seen.append(line)
        if "teacher/loss=" in line:  # a training step has been logged
            process.send_signal(sig)
            break
    _, rest = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, "", "".join(seen) + rest)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_signal_stops_with_a_checkpoint_and_the_relaunch_equals_an_uninterrupted_run(sig, long_reference, tmp_path):
    workdir = tmp_path / "run"
    result = interrupt(workdir, sig)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not error_lines(result.stderr)
    stops = [line for line in result.stderr.splitlines() if "teacher: stopped at step" in line]
    assert len(stops) == 1 and sig.name in stops[0] and "launch the same command again" in stops[0], stops
    step = int(stops[0].split("stopped at step ")[1].split()[0])
    assert 0 < step < 300
    saved = sorted(int(p.name) for p in (workdir / "teacher" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [step]  # the signal's step, written before the exit (checkpoint_every is 1000)
    assert not (workdir / "report.json").exists() and not (workdir / workdir_lib.LOCK_NAME).exists()
    resumed = launch(TINY, *LONG_TEACHER, f"--workdir={workdir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from the checkpoint of step {step}" in resumed.stderr
    assert_runs_equal(long_reference, workdir)


# ------------------------------------------------------------------------------------------ two processes
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Fewer teacher steps than LONG_TEACHER (a later flag wins): a step across 2 processes is slower, and the signal,
# sent at the first logged step, still lands in the middle (each process must report the stop, or the test fails).
TWO_PROCESS_TEACHER = ("--config.teacher.train.num_steps=120",)


def launch_two_processes(workdir, sig=None):
    """The long-teacher run as 2 processes x 1 device (gloo); with `sig`, sent to process 1 alone once process
    0 logs a training step. Returns each process's (exit status, stderr)."""
    env = launch_env(JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    args = [TINY, *LONG_TEACHER, *TWO_PROCESS_TEACHER, f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{free_port()}",
            "--num_processes=2"]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args, f"--process_id={i}"], cwd=workdir.parent,
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(2)]
    seen = []
    for line in procs[0].stderr if sig is not None else ():
        seen.append(line)
        if "teacher/loss=" in line:
            procs[1].send_signal(sig)
            break
    errs = [p.communicate(timeout=900)[1] for p in procs]
    return [(procs[0].returncode, "".join(seen) + errs[0]), (procs[1].returncode, errs[1])]


@pytest.mark.slow
def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    results = launch_two_processes(tmp_path / "run", signal.SIGTERM)
    steps = set()
    for status, stderr in results:
        assert status == 0 and "Traceback" not in stderr, stderr[-3000:]
        stops = [line for line in stderr.splitlines() if "teacher: stopped at step" in line]
        assert len(stops) == 1, stderr[-3000:]
        steps.add(int(stops[0].split("stopped at step ")[1].split()[0]))
    assert len(steps) == 1  # JAX's preemption sync point: the same step everywhere
    (step,) = steps
    saved = [p.name for p in (tmp_path / "run" / "teacher" / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved == [str(step)]
    for status, stderr in launch_two_processes(tmp_path / "run"):
        assert status == 0 and f"resuming from the checkpoint of step {step}" in stderr, stderr[-3000:]
    for status, stderr in launch_two_processes(tmp_path / "reference"):
        assert status == 0, stderr[-3000:]
    assert_runs_equal(tmp_path / "reference", tmp_path / "run")
