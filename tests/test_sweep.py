"""`python -m kdjax.sweep`: 2 seeds x 2 settings of the tiny classic-KD config; the figures are numpy's
mean and std (ddof 1) of the per-run reports; a re-launched sweep runs nothing new; bad input fails first."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from kdjax import sweep, train
from kdjax.evaluation import aggregate

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = f"{ROOT / 'configs' / 'classifier_kd.py'}:tiny"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The sweep run as a user runs it, `python -m kdjax.sweep ...`: (workdir, its arguments, sweep.json, the
    command's stdout and stderr)."""
    workdir = tmp_path_factory.mktemp("sweep")
    args = [f"--config={CONFIG}", "--seeds=2", "--vary", "kd.alpha=0.1,0.9", f"--workdir={workdir}",
            "--config.teacher.train.num_steps=10", "--config.student.train.num_steps=10"]
    result = subprocess.run([sys.executable, "-m", "kdjax.sweep", *args], capture_output=True, text=True, cwd=ROOT,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return workdir, args, json.loads((workdir / "sweep.json").read_text()), result.stdout, result.stderr


def test_sweep_writes_numpy_mean_and_std_of_the_runs(swept):
    workdir, _, out, _, _ = swept
    assert sorted(out["settings"]) == ["kd.alpha=0.1", "kd.alpha=0.9"]
    saved = json.loads((workdir / "sweep.json").read_text())
    for name, setting in saved["settings"].items():
        assert setting["seeds"] == [0, 1]
        reports = [json.loads((pathlib.Path(d) / "report.json").read_text()) for d in setting["runs"]]
        assert [r["kd"]["alpha"] for r in reports] == [float(name.split("=")[1])] * 2
        for path in ("student_kd/accuracy", "student_scratch/ece", "teacher/params"):
            values = np.array([aggregate.numeric_leaves(r)[path] for r in reports])
            stats = setting["metrics"][path]
            assert stats["values"] == values.tolist() and stats["n"] == 2
            assert stats["mean"] == np.mean(values) and stats["std"] == np.std(values, ddof=1)
    # The two seeds are different runs; the settings differ in alpha only.
    runs = saved["settings"]["kd.alpha=0.1"]["runs"]
    assert json.loads((pathlib.Path(runs[0]) / "config.json").read_text())["seed"] == 0
    assert json.loads((pathlib.Path(runs[1]) / "config.json").read_text())["seed"] == 1
    assert (workdir / "sweep.png").is_file() and "| kd.alpha=0.9 | 2 |" in (workdir / "sweep.md").read_text()


def test_relaunched_sweep_runs_nothing_new(swept, monkeypatch, capsys):
    workdir, args, out, _, _ = swept
    calls = []
    monkeypatch.setattr(train, "run_checked", lambda config, wd: calls.append(wd))
    again = sweep.main(args)
    assert calls == [] and "4 runs, 4 already done, 0 to run" in capsys.readouterr().out
    assert again["settings"] == out["settings"]


def test_numeric_leaves_and_single_runs():
    assert aggregate.numeric_leaves({"a": {"b": 1, "c": "x", "d": True}, "e": 2.5}) == {"a/b": 1.0, "e": 2.5}
    stats = aggregate.aggregate([{"m": 3.0}])["m"]
    assert stats["mean"] == 3.0 and stats["std"] is None and aggregate.mean_std(stats) == "3.000"


@pytest.mark.parametrize("extra, message", [
    (["--vary", "kd.alpha"], "expected FIELD=v1,v2"),
    (["--vary", "kd.alfa=0.1,0.2"], "no field 'kd.alfa'"),
    (["--vary", "kd.alpha=1.5"], "config.kd.alpha=1.5 must be in"),
    (["--seeds=0"], "--seeds=0 must be >= 1"),
    (["--learning_rate=3"], "unknown arguments"),
])
def test_bad_sweeps_fail_before_any_run(extra, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "kdjax.sweep", f"--config={CONFIG}", f"--workdir={tmp_path}", *extra],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("kdjax: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())


def test_named_settings_times_axes():
    assert sweep.settings_of([]) == {"base": ""}
    assert sweep.settings_of([("kd.alpha", ["0.1", "0.5"])]) == {"kd.alpha=0.1": "kd.alpha=0.1",
                                                                 "kd.alpha=0.5": "kd.alpha=0.5"}
    named = [("default", ""), ("hot", "kd.temperature=8.0")]
    assert sweep.settings_of([], named) == {"default": "", "hot": "kd.temperature=8.0"}
    assert sweep.settings_of([("seed", ["1"])], named) == {"default_seed=1": "seed=1",
                                                            "hot_seed=1": "kd.temperature=8.0,seed=1"}
    with pytest.raises(ValueError, match="expected NAME=ITEMS"):
        sweep.parse_setting("no name")
    with pytest.raises(ValueError, match="given twice"):
        sweep.settings_of([], [("a", ""), ("a", "seed=1")])


def test_metric_patterns_expand_to_every_matching_path_once():
    settings = {"a": {"metrics": {"figures/teacher/heun_16-step/fid": {}, "figures/teacher/heun_16-step/kid": {},
                                  "figures/progressive/progressive_4-step/fid": {}}},
                "b": {"metrics": {"figures/dmd/dmd2_one-step/fid": {}, "num_samples": {}}}}
    assert sweep.expand_metrics(["figures/*/fid", "num_samples", "missing/path", "figures/teacher/*"], settings) == [
        "figures/dmd/dmd2_one-step/fid", "figures/progressive/progressive_4-step/fid",
        "figures/teacher/heun_16-step/fid", "num_samples", "missing/path", "figures/teacher/heun_16-step/kid"]
    assert sweep.expand_metrics(["nothing/*"], settings) == []


def test_the_sweep_command_shows_each_runs_progress(swept):
    """`python -m kdjax.sweep` prints what `launch.py` prints for every run: the loop's progress (steps/s, ETA)
    and the phases' metrics, not only the sweep's own lines."""
    _, _, _, stdout, stderr = swept
    assert "kdjax.sweep: 4/4 done" in stdout
    assert "ETA" in stderr and "steps_per_sec" in stderr, stderr[-2000:]
