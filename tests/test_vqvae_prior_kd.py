"""`pixelcnn_kd` with its VQ-VAE stage (configs/vqvae_prior_kd.py, tiny): the autoencoder, the priors over its
codes, FID/KID of decoded samples under a judge; exact resume across the VQ-VAE phase; bad configs."""

import json
import pathlib
import re

import jax
import numpy as np
import pytest

from kdjax import train
from kdjax.models import bundles
from kdjax.pretrained.tiny import write_tiny_bundles
from kdjax.tasks.vqvae_codes import codes_to_uint8
from kdjax.models.pixelcnn import to_levels

ROOT = pathlib.Path(__file__).resolve().parent.parent
PHASES = ("vqvae", "teacher", "student_kd", "student_scratch")
TIMING = ("sample_images_per_s",)


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    return write_tiny_bundles(tmp_path_factory.mktemp("tiny"))[1]  # a 16x16 judge: the 8x8 samples are upsampled


def load_config(judge, arg="tiny"):
    config = train.load_config(f"{ROOT / 'configs' / 'vqvae_prior_kd.py'}:{arg}")
    config.eval.judge = str(judge)
    return config


def without_timing(report):
    return {k: ({f: x for f, x in v.items() if f not in TIMING} if isinstance(v, dict) else v)
            for k, v in report.items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, judge):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, train.train_and_evaluate(load_config(judge), workdir)


def test_codes_travel_through_the_data_path_exactly():
    codes = np.arange(256).reshape(1, 16, 16) % 200
    for k in (2, 7, 200, 256):
        c = codes % k
        images = codes_to_uint8(c, k).astype(np.float32) / 127.5 - 1.0  # what the batches hold
        np.testing.assert_array_equal(np.asarray(to_levels(images, k))[..., 0], c)


def test_tiny_run_reports_priors_and_sample_quality(uninterrupted):
    workdir, report = uninterrupted
    saved = json.loads((workdir / "report.json").read_text())
    for phase in PHASES:
        assert (workdir / phase / "bundle" / "model.json").is_file()
    assert json.loads((workdir / "vqvae" / "bundle" / "model.json").read_text())["model"] == "vqvae"
    for phase in PHASES[1:]:
        r = saved[phase]
        assert 0 < r["test_bits_per_dim"] < np.log2(8), (phase, r)  # below uniform over the 8 codes
        assert r["flops_per_sample"] == pytest.approx(r["flops_per_forward"] * 16)  # a 4 x 4 grid of codes
        assert np.isfinite(r["fid"]) and r["fid"] >= 0 and np.isfinite(r["kid_mean"]), r
    vq = saved["vqvae"]
    assert vq["num_codes"] == 8 and vq["code_resolution"] == 4 and 1 <= vq["codes_used"] <= 8
    assert vq["test_reconstruction_mse"] > 0 and np.isfinite(vq["reconstruction_quality"]["fid"])
    assert saved["num_real"] == 1797 and saved["num_samples"] == 16
    text = (workdir / "report.md").read_text()
    assert "| FID | KID |" in text and "VQ-VAE: 8 codes on a 4x4 grid" in text


def test_stop_in_the_vqvae_phase_and_resume_equals_uninterrupted(uninterrupted, judge, tmp_path):
    reference, report = uninterrupted
    config = load_config(judge)
    config.stop_after_steps = 13  # 13 of the VQ-VAE's 20 steps
    assert train.train_and_evaluate(config, tmp_path) is None
    assert not (tmp_path / "vqvae" / "bundle").exists()
    resumed = train.train_and_evaluate(load_config(judge), tmp_path)
    for phase in PHASES:
        for a, b in zip(jax.tree.leaves(bundles.load_model_bundle(reference / phase / "bundle")[1]),
                        jax.tree.leaves(bundles.load_model_bundle(tmp_path / phase / "bundle")[1]), strict=True):
            np.testing.assert_array_equal(a, b)
    assert without_timing(resumed) == without_timing(report)


@pytest.mark.parametrize("override,message", [
    ("levels=9", "config.levels=9: with a VQ-VAE the priors model its codes, so it must be the codebook size, 8"),
    ("vqvae.ema_decay=1.0", "config.vqvae.ema_decay=1.0 must be in [0, 1)"),
    ("data.resolution=7", "config.data.resolution=7 must be divisible by 2^downsamples=2"),
    ("vqvae.model='pixelcnn'", "config.vqvae.model='pixelcnn'; valid autoencoders: ['vqvae']"),
])
def test_bad_config_values_fail_before_compute(judge, override, message):
    config = load_config(judge, f"tiny,{override}")
    with pytest.raises(ValueError, match=re.escape(message)):
        train.check_config(config)


def test_judge_must_record_its_input_shape(judge, tmp_path):
    import shutil
    shutil.copytree(judge, tmp_path / "judge")
    meta = json.loads((tmp_path / "judge" / "model.json").read_text())
    del meta["input_shape"]
    (tmp_path / "judge" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="its model.json records no input_shape"):
        train.check_config(load_config(tmp_path / "judge"))


def test_teacher_prior_bundle_must_match_the_code_grid(uninterrupted, judge):
    reference, _ = uninterrupted
    config = load_config(judge)
    config.teacher.checkpoint = str(reference / "teacher" / "bundle")
    train.check_config(config)  # 4x4 codes, 8 levels: fits
    config = load_config(judge, "tiny,data.resolution=16")
    config.teacher.checkpoint = str(reference / "teacher" / "bundle")
    with pytest.raises(ValueError, match=r"models 4x4x1 codes; the data is 8x8x1 \(the VQ-VAE's code grid"):
        train.check_config(config)
