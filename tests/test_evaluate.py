"""The evaluation report (kdjax.evaluate) on tiny random-init generators and judge, 16x16 grey digits."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import evaluate
from kdjax.config import data_config
from kdjax.core.data import all_images, load_dataset
from kdjax.evaluation import generators
from kdjax.models import bundles as checkpoints
from kdjax.evaluation import fid
from kdjax.models import build_model

RES, Z_DIM, NUM_SAMPLES, BATCH = 16, 16, 64, 32
GEN = dict(z_dim=Z_DIM, resolution=RES, img_channels=1, width=8, width_max=16)
JUDGE = dict(num_classes=10, widths=(4, 8))
ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore:FID on only")  # digits test split: 359 images


def _save(directory, name, kwargs, seed, example):
    model = build_model(name, **kwargs)
    variables = model.init(jax.random.key(seed), example)
    checkpoints.save_model_bundle(directory, name, kwargs, variables)
    return model, variables


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A kdjax-run-shaped folder: teacher, copy (= teacher), student and judge bundles, config.json."""
    root = tmp_path_factory.mktemp("run")
    z = jnp.zeros((1, Z_DIM))
    _, teacher_vars = _save(root / "teacher" / "bundle", "dcgan_generator", GEN, 0, z)
    checkpoints.save_model_bundle(root / "copy" / "bundle", "dcgan_generator", GEN, teacher_vars)
    _save(root / "student" / "bundle", "dcgan_generator", dict(GEN, width=4, width_max=8), 1, z)
    _save(root / "judge" / "bundle", "cnn", JUDGE, 2, jnp.zeros((1, RES, RES, 1)))
    (root / "config.json").write_text(json.dumps({"data": data_config(resolution=RES, channels=1).to_dict()}))
    return root


@pytest.fixture(scope="module")
def real_images():
    split = load_dataset(data_config(resolution=RES, channels=1)).test
    return all_images(split)


@pytest.fixture(scope="module")
def report(run_dir, real_images, tmp_path_factory):
    dirs = {n: str(run_dir / n / "bundle") for n in ("teacher", "copy", "student")}
    gens, judge = evaluate.load_models(dirs, str(run_dir / "judge" / "bundle"), "teacher", RES, 1)
    other = build_model("dcgan_generator", **dict(GEN, z_dim=8))  # no identical latents: fidelity skipped
    gens["other_z"] = (other, other.init(jax.random.key(3), jnp.zeros((1, 8))))
    workdir = tmp_path_factory.mktemp("eval")
    out = generators.evaluate_generators(gens, judge, real_images, reference="teacher", num_samples=NUM_SAMPLES,
                                       batch_size=BATCH, seed=0, workdir=workdir)
    return out, gens, judge, workdir


BASE_KEYS = {"fid", "kid_mean", "kid_std", "precision", "recall", "density", "coverage", "diversity", "spectrum",
             "params", "flops_per_image", "images_per_s_at_1", "images_per_s_at_64"}
FIDELITY_KEYS = {"psnr_vs_reference", "ssim_vs_reference", "l1_vs_reference", "perceptual_vs_reference",
                 "spectral_distance_vs_reference"}


def test_eval_json_has_every_metric_for_every_model(report, real_images):
    out, _, _, workdir = report
    saved = json.loads((workdir / "eval.json").read_text())
    assert saved["num_samples"] == NUM_SAMPLES and saved["num_real"] == len(real_images)
    assert saved["device"] and saved["eval_seconds"] > 0
    for name in ("teacher", "copy", "student", "other_z"):
        assert BASE_KEYS <= set(saved[name]), (name, BASE_KEYS - set(saved[name]))
        assert all(np.isfinite(saved[name][k]) for k in BASE_KEYS - {"spectrum"})
    for name in ("copy", "student"):
        assert FIDELITY_KEYS <= set(saved[name])
    assert not FIDELITY_KEYS & set(saved["teacher"])
    assert "z_dim 8" in saved["other_z"]["fidelity_skipped"] and not FIDELITY_KEYS & set(saved["other_z"])
    table = (workdir / "eval.md").read_text()
    assert all(f"| {n} |" in table for n in ("teacher", "copy", "student", "other_z"))


def test_identical_copy_has_perfect_fidelity(report):
    out = report[0]
    copy, student = out["copy"], out["student"]
    assert math.isinf(copy["psnr_vs_reference"]) or copy["psnr_vs_reference"] > 100
    assert copy["ssim_vs_reference"] == pytest.approx(1.0, abs=1e-4)  # f32 E[x^2] - mu^2 round-off
    assert copy["l1_vs_reference"] == 0.0 and copy["spectral_distance_vs_reference"] == 0.0
    assert copy["perceptual_vs_reference"] == pytest.approx(0.0, abs=1e-6)
    assert copy["fid"] == pytest.approx(out["teacher"]["fid"], rel=1e-9)
    assert student["l1_vs_reference"] > 0.0 and student["psnr_vs_reference"] < 100


def test_fid_matches_an_independent_computation(report, real_images):
    """Judge features by plain apply on one device; latents re-derived from the documented scheme."""
    out, gens, (judge, judge_vars), _ = report
    pool = lambda x: np.asarray(judge.apply(judge_vars, x, return_features=True)[1]["pool"], np.float64)
    real = pool(jnp.asarray(real_images))
    for name in ("teacher", "student"):
        model, variables = gens[name]
        zs = [jax.random.normal(jax.random.split(jax.random.fold_in(jax.random.key(0), b), 3)[0], (BATCH, Z_DIM))
              for b in range(NUM_SAMPLES // BATCH)]
        fake = pool(model.apply(variables, jnp.concatenate(zs), train=False))
        assert out[name]["fid"] == pytest.approx(fid.fid(real, fake)["fid"], rel=1e-4)


def test_pngs_and_tensorboard_written(report):
    workdir = report[3]
    for png in ("spectra.png", "samples.png"):
        assert (workdir / png).stat().st_size > 0
    assert list(workdir.glob("events.out.tfevents*"))


def test_load_models_rejects_mismatches_before_compute(run_dir):
    dirs = {"teacher": str(run_dir / "teacher" / "bundle")}
    judge = str(run_dir / "judge" / "bundle")
    with pytest.raises(ValueError, match="--reference='nope'"):
        evaluate.load_models(dirs, judge, "nope", RES, 1)
    with pytest.raises(ValueError, match="--generator=teacher=.*16x16x1 images; the data is 32x32x1"):
        evaluate.load_models(dirs, judge, None, 32, 1)
    with pytest.raises(ValueError, match=r"holds a .cnn. \(classifier\); a generator bundle is needed"):
        evaluate.load_models({"j": judge}, judge, None, RES, 1)
    _, (judge_model, judge_vars) = evaluate.load_models(dirs, judge, None, RES, 1)
    with pytest.raises(ValueError, match="--judge=.*does not accept the data's 16x16x3"):
        evaluate.check_judge(judge_model, judge_vars, RES, 3, f"--judge={judge!r}")


def _cli(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "kdjax.evaluate", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_cli_evaluates_a_run_folder(run_dir, tmp_path):
    proc = _cli(f"--run={run_dir}", "--num_samples=16", "--batch_size=16", f"--workdir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert {"teacher", "copy", "student"} <= set(saved) and saved["reference"] == "teacher"
    assert saved["num_samples"] == 16 and saved["copy"]["l1_vs_reference"] == 0.0
    assert "| student |" in proc.stdout


def test_cli_bad_judge_path_fails_before_compute(run_dir, tmp_path):
    proc = _cli(f"--generator=teacher={run_dir / 'teacher' / 'bundle'}", f"--judge={tmp_path / 'missing'}",
                "--data.resolution=16", f"--workdir={tmp_path / 'out'}")
    assert proc.returncode != 0
    assert "--judge=" in proc.stderr and "not an existing directory" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_external_embedding_adds_inception_figures(run_dir, real_images, tmp_path):
    """The InceptionV3 path, with a tiny stand-in embedding (a real 299-px Inception is too slow here)."""
    import flax.linen as nn

    class Embed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(6)(x.reshape(x.shape[0], -1))

    embed = Embed()
    embed_vars = embed.init(jax.random.key(5), jnp.zeros((1, RES, RES, 1)))
    gens, judge = evaluate.load_models({"teacher": str(run_dir / "teacher" / "bundle")},
                                       str(run_dir / "judge" / "bundle"), None, RES, 1)
    out = generators.evaluate_generators(gens, judge, real_images, reference=None, num_samples=NUM_SAMPLES,
                                       batch_size=BATCH, seed=0, workdir=tmp_path, timing_batch_sizes=(1,),
                                       inception=(embed, embed_vars))
    model, variables = gens["teacher"]
    zs = [jax.random.normal(jax.random.split(jax.random.fold_in(jax.random.key(0), b), 3)[0], (BATCH, Z_DIM))
          for b in range(NUM_SAMPLES // BATCH)]
    fake = np.asarray(embed.apply(embed_vars, model.apply(variables, jnp.concatenate(zs), train=False)), np.float64)
    real = np.asarray(embed.apply(embed_vars, jnp.asarray(real_images)), np.float64)
    assert out["teacher"]["fid_inception"] == pytest.approx(fid.fid(real, fake)["fid"], rel=1e-4)
    assert out["teacher"]["fid_inception"] != pytest.approx(out["teacher"]["fid"], rel=1e-3)
    assert "Inception FID" in (tmp_path / "eval.md").read_text()


def test_teacher_distribution_scores_against_the_teachers_own_samples(run_dir, real_images, tmp_path):
    """With teacher_distribution, the 'vs teacher' figures are computed against the judge features of N
    teacher samples on their own latents (recomputed here independently), not against the real images."""
    dirs = {n: str(run_dir / n / "bundle") for n in ("teacher", "student")}
    gens, judge = evaluate.load_models(dirs, str(run_dir / "judge" / "bundle"), "teacher", RES, 1)
    out = generators.evaluate_generators(gens, judge, real_images, reference="teacher", num_samples=NUM_SAMPLES,
                                         batch_size=BATCH, seed=0, workdir=tmp_path,
                                         teacher_distribution=(gens["teacher"], 96))
    assert out["num_teacher_samples"] == 96
    teacher_pool = generators.sample_with_features(gens["teacher"], judge, 96, BATCH,
                                                   generators.TEACHER_SEED_OFFSET, "t")["feats"]["pool"]
    student_pool = generators.sample_with_features(gens["student"], judge, NUM_SAMPLES, BATCH, 0, "s")["feats"]["pool"]
    expected = fid.fid(np.asarray(teacher_pool, np.float64), np.asarray(student_pool, np.float64))["fid"]
    assert out["student"]["fid_vs_teacher_dist"] == pytest.approx(expected, rel=1e-9)
    real_pool = generators.judge_pool(judge, real_images, BATCH)
    assert out["student"]["fid"] == pytest.approx(fid.fid(real_pool, np.asarray(student_pool, np.float64))["fid"])
    # The teacher against its own distribution is far closer than the student is, and closer than to real data.
    assert out["teacher"]["fid_vs_teacher_dist"] < 0.5 * out["student"]["fid_vs_teacher_dist"]
    assert out["teacher"]["fid_vs_teacher_dist"] < out["teacher"]["fid"]
    assert "KID vs T" in (tmp_path / "eval.md").read_text()


def test_real_set_all_is_train_and_test():
    dataset = load_dataset(data_config(resolution=8, channels=1))
    assert len(generators.real_set(dataset, "all")) == 1797  # every digit scikit-learn ships
    assert len(generators.real_set(dataset, "test")) == 359 and len(generators.real_set(dataset, "train")) == 1438
    with pytest.raises(ValueError, match="valid: \\['all', 'train', 'test'\\]"):
        generators.real_set(dataset, "val")
