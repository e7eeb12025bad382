"""The diffusion distillation task (tiny, on a random 8x8 EDM teacher): each method's run exports its students and
reports them next to the teacher's sampler (NFE, FLOPs = NFE x one evaluation, FID/KID against the real images and
against the teacher's samples, the teacher's reference row at FID 0 against itself); the one-step generator made of
the teacher's network starts as the teacher's one-step estimate; the consistency parameterisation meets its boundary
condition; a stopped and resumed progressive run (stopped inside its second stage) equals an uninterrupted one
bitwise; stage_fractions set each progressive stage's steps; the DCGAN student carries its BatchNorm statistics; bad
configs fail with one clear error before any compute; the shipped digits teacher fits both default configs and
denoises held-out digits."""

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models, train
from kdjax.core import data
from kdjax.evaluation.generators import real_set
from kdjax.models import bundles, diffusion_samplers, edm
from kdjax.pretrained import DIGITS32_DIFFUSION
from kdjax.tasks import diffusion_distill

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEACHER_FIELDS = dict(resolution=8, channels=1, num_classes=0, widths=(8,), num_blocks=1, attention_resolutions=(),
                      dropout=0.1)


@pytest.fixture(scope="module")
def bundles_dir(tmp_path_factory):
    """A random tiny EDM teacher (its output layer moved off zero so that it is not the identity's c_skip x) and a
    random CNN judge of 8x8x1 images: they check the paths, not quality."""
    root = tmp_path_factory.mktemp("bundles")
    teacher = edm.EDMUNet(**TEACHER_FIELDS)
    variables = teacher.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)))
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    variables = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    bundles.save_model_bundle(root / "teacher", "edm_unet", TEACHER_FIELDS, variables)
    fields16 = {**TEACHER_FIELDS, "resolution": 16}  # for the DCGAN student (16x16 at least)
    bundles.save_model_bundle(root / "teacher16", "edm_unet", fields16, edm.EDMUNet(**fields16).init(
        jax.random.key(3), jnp.zeros((1, 16, 16, 1)), jnp.ones((1,))))
    judge = models.build_model("cnn", num_classes=10, widths=(4, 8))
    bundles.save_model_bundle(root / "judge", "cnn", dict(num_classes=10, widths=(4, 8)),
                              judge.init(jax.random.key(2), jnp.zeros((2, 8, 8, 1))), extra={"input_shape": [8, 8, 1]})
    return root


def load_config(bundles_dir, arg="tiny", judge=True):
    config = train.load_config(f"{ROOT / 'configs' / 'diffusion_distill.py'}:{arg}")
    config.teacher.bundle = str(bundles_dir / "teacher")
    config.eval.judge = str(bundles_dir / "judge") if judge else ""
    config.async_checkpoints = False
    return config


@pytest.fixture(scope="module")
def runs(bundles_dir, tmp_path_factory):
    out = {}
    for method in diffusion_distill.METHODS:
        workdir = tmp_path_factory.mktemp(method)
        config = load_config(bundles_dir, f"tiny,{method}")
        diffusion_distill.check_config(config)
        out[method] = workdir, train.train_and_evaluate(config, workdir)
    return out


EXPECTED = {  # (sampler, NFE) of the student rows of each tiny run
    "progressive": [("progressive 2-step", 2), ("progressive 1-step", 1)],
    "consistency": [("consistency 1-step", 1), ("consistency 2-step", 2)],
    "dmd": [("DMD2 one-step (edm_one_step)", 1)],
}


@pytest.mark.parametrize("method", diffusion_distill.METHODS)
def test_each_method_reports_its_students_next_to_the_teacher(runs, method):
    workdir, out = runs[method]
    assert json.loads((workdir / "report.json").read_text())["method"] == method
    teacher_rows = [(r["sampler"], r["nfe"]) for r in out["rows"] if r["model"] == "teacher"]
    # the tiny config's two teacher rows in the progressive run; its reference row (most steps) in the others'
    assert teacher_rows == ([("Heun 1-step", 1), ("Heun 2-step", 3)] if method == "progressive" else
                            [("Heun 2-step", 3)])
    students = [r for r in out["rows"] if r["model"] == method]
    assert [(r["sampler"], r["nfe"]) for r in students] == EXPECTED[method]
    for row in out["rows"]:  # every student is made of the teacher's network: its cost per evaluation (up to the
        # preconditioning's few scalar FLOPs: the consistency coefficients add 2 per image here, the generator's
        # constant noise level folds 12 away)
        assert row["flops_per_image"] == pytest.approx(row["nfe"] * out["flops_per_evaluation"], rel=1e-4)
        assert row["params"] == out["teacher_params"] > 0
        assert np.isfinite(row["fid"]) and np.isfinite(row["fid_vs_teacher"]) and row["images_per_s"] > 0
    reference = out["rows"][len(teacher_rows) - 1]
    assert out["teacher_reference"] == reference["sampler"] == "Heun 2-step"
    assert abs(reference["fid_vs_teacher"]) < 1e-3  # the reference against itself
    assert all(r["fid_vs_teacher"] > 1e-2 for r in out["rows"] if r is not reference)
    for name in ("samples.png", "fid_vs_nfe.png", "report.md"):
        assert (workdir / name).stat().st_size > 0
    # the figures by row, which kdjax.sweep averages over seeds: one key per row, the row's own numbers
    keys = {"progressive": ["progressive/progressive_2-step", "progressive/progressive_1-step"],
            "consistency": ["consistency/consistency_1-step", "consistency/consistency_2-step"],
            "dmd": ["dmd/dmd2_one-step_edm_one_step"]}[method]
    assert list(out["figures"]) == [*(["teacher/heun_1-step"] if method == "progressive" else []),
                                    "teacher/heun_2-step", *keys]
    for row, figures in zip(out["rows"], out["figures"].values()):
        assert figures["fid"] == row["fid"] and figures["nfe"] == row["nfe"] and "bundle" not in figures
    for row in students:
        _, variables, meta = bundles.load_model(row["bundle"])
        assert meta["model"] == ("edm_one_step" if method == "dmd" else "edm_unet")
        assert sum(x.size for x in jax.tree.leaves(variables)) == row["params"]


def test_progressive_stage_bundle_samples_with_euler_on_its_grid(runs, bundles_dir):
    """The exported 1-step student, sampled by hand (one Euler step from sigma_max n, i.e. D(sigma_max n;
    sigma_max)), differs from the teacher's one-step estimate: the stages trained it."""
    workdir, _ = runs["progressive"]
    student, s_vars, _ = bundles.load_model(workdir / "stage1" / "bundle")
    teacher, t_vars, _ = bundles.load_model(bundles_dir / "teacher")
    n = jax.random.normal(jax.random.key(3), (4, 8, 8, 1))
    grid = jnp.asarray([80.0, 0.0])
    by_hand = student.apply(s_vars, 80.0 * n, jnp.full((4,), 80.0))
    euler, nfe = diffusion_samplers.euler(lambda x, s: student.apply(s_vars, x, s), 80.0 * n, grid)
    np.testing.assert_allclose(euler, by_hand, rtol=0, atol=1e-4)  # x + (0 - 80)(x - D) / 80: float32 at |x| ~ 80
    assert int(nfe) == 1
    assert not np.allclose(by_hand, teacher.apply(t_vars, 80.0 * n, jnp.full((4,), 80.0)), atol=1e-4)


def test_one_step_generator_starts_as_the_teachers_one_step_estimate(bundles_dir):
    teacher, t_vars, meta = bundles.load_model(bundles_dir / "teacher")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["kwargs"].items()}
    generator = edm.OneStepGenerator(**edm.one_step_kwargs(kwargs, 80.0))
    assert generator.spec.z_dim == 64
    z = jax.random.normal(jax.random.key(4), (3, 64))
    images = generator.apply({"params": edm.from_denoiser(t_vars["params"])}, z)
    expected = teacher.apply(t_vars, 80.0 * z.reshape(3, 8, 8, 1), jnp.full((3,), 80.0))
    np.testing.assert_array_equal(images, expected)


def test_consistency_parameterisation_of_the_unet_is_the_identity_at_sigma_min(bundles_dir):
    _, t_vars, _ = bundles.load_model(bundles_dir / "teacher")
    f = edm.EDMUNet(**{**TEACHER_FIELDS, "parameterisation": "consistency", "sigma_min": 0.002})
    x = jax.random.normal(jax.random.key(5), (3, 8, 8, 1))
    np.testing.assert_allclose(f.apply(t_vars, x, jnp.full((3,), 0.002)), x, rtol=0, atol=1e-6)
    assert not np.allclose(f.apply(t_vars, x, jnp.full((3,), 1.0)), x, atol=1e-3)


def test_progressive_stop_and_resume_equals_uninterrupted_bitwise(runs, bundles_dir, tmp_path):
    """Stopped after 6 steps (inside the second stage: 4 steps per stage), relaunched, it ends on the same bundles."""
    config = load_config(bundles_dir, "tiny", judge=False)
    config.stop_after_steps = 6
    assert train.train_and_evaluate(config, tmp_path) is None
    assert (tmp_path / "stage2" / "bundle").exists() and not (tmp_path / "stage1" / "bundle").exists()
    config.stop_after_steps = -1
    assert train.train_and_evaluate(config, tmp_path) is not None
    reference, _ = runs["progressive"]
    for stage in ("stage2", "stage1"):
        a = bundles.load_model_bundle(tmp_path / stage / "bundle")[1]
        b = bundles.load_model_bundle(reference / stage / "bundle")[1]
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)


def test_progressive_stage_fractions_give_each_stage_its_steps(runs, bundles_dir, tmp_path):
    """stage_fractions (1, 0.5) of 4 steps: the first stage trains 4 steps and ends on the uniform run's student
    bitwise; the second trains 2 (its latest checkpoint) and so ends elsewhere."""
    config = load_config(bundles_dir, "tiny", judge=False)
    config.progressive.stage_fractions = (1.0, 0.5)
    diffusion_distill.check_config(config)
    assert diffusion_distill.stage_steps(config.progressive) == [4, 2]
    assert train.train_and_evaluate(config, tmp_path) is not None
    reference, _ = runs["progressive"]
    for stage, steps, same in (("stage2", 4, True), ("stage1", 2, False)):
        saved = sorted(int(p.name) for p in (tmp_path / stage / "checkpoints").iterdir() if p.name.isdigit())
        assert saved[-1] == steps
        a = bundles.load_model_bundle(tmp_path / stage / "bundle")[1]
        b = bundles.load_model_bundle(reference / stage / "bundle")[1]
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)) == same


def test_dmd_into_the_dcgan_student_carries_its_batch_statistics(bundles_dir, tmp_path):
    """configs/diffusion_to_dcgan.py:tiny: the DCGAN generator (BatchNorm) trains data-free, its exported bundle
    holds moved running statistics, and it samples with them: the report's row is its own."""
    config = train.load_config(f"{ROOT / 'configs' / 'diffusion_to_dcgan.py'}:tiny")
    config.teacher.bundle = str(bundles_dir / "teacher16")
    config.async_checkpoints = False
    diffusion_distill.check_config(config)
    out = train.train_and_evaluate(config, tmp_path)
    row = out["rows"][-1]
    assert (row["model"], row["sampler"], row["nfe"]) == ("dmd", "DMD2 one-step (dcgan_generator)", 1)
    model, variables, meta = bundles.load_model(row["bundle"])
    assert meta["model"] == "dcgan_generator" and set(variables) == {"params", "batch_stats"}
    assert row["params"] == sum(x.size for x in jax.tree.leaves(variables["params"]))
    initial = model.init(jax.random.key(0), jnp.zeros((2, 16)))["batch_stats"]
    assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(variables["batch_stats"]),
                                                   jax.tree.leaves(initial))) > 1e-4
    assert row["flops_per_image"] < out["flops_per_evaluation"]  # the tiny DCGAN is cheaper than one teacher call


def test_dmd_with_the_gan_term_trains_on_the_real_images(bundles_dir, runs, tmp_path):
    """The tiny DMD run with DMD2's GAN term (generator weight 0.5, classifier 1): it reads the training images and
    its one-step generator ends elsewhere than the same run's without the term (same seed, same draws)."""
    config = load_config(bundles_dir, "tiny,dmd,dmd.gan.generator_weight=0.5,dmd.gan.classifier_weight=1.0",
                         judge=False)
    diffusion_distill.check_config(config)
    out = train.train_and_evaluate(config, tmp_path)
    with_gan = bundles.load_model_bundle(out["rows"][-1]["bundle"])[1]
    plain = bundles.load_model_bundle(runs["dmd"][0] / "dmd" / "bundle")[1]
    assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(with_gan), jax.tree.leaves(plain),
                                                   strict=True)) > 1e-6


def test_a_generator_that_cannot_make_the_teachers_images_is_refused(bundles_dir):
    config = train.load_config(f"{ROOT / 'configs' / 'diffusion_to_dcgan.py'}:tiny")
    config.teacher.bundle = str(bundles_dir / "teacher16")
    config.dmd.generator.kwargs.img_channels = 3
    with pytest.raises(ValueError, match=re.escape("config.dmd.generator.kwargs.img_channels: leave it out")):
        diffusion_distill.check_config(config)
    config = train.load_config(f"{ROOT / 'configs' / 'diffusion_to_dcgan.py'}:tiny")
    config.teacher.bundle, config.data.resolution = str(bundles_dir / "teacher"), 8  # DCGAN: 16x16 at least
    with pytest.raises(ValueError, match=re.escape("config.dmd.generator: ")):
        diffusion_distill.check_config(config)


BAD = [
    ("method='flow'", r"config.method='flow'; valid: \['progressive', 'consistency', 'dmd'\]"),
    ("progressive.base_steps=6", r"config.progressive.base_steps=6 must be a power of two"),
    ("progressive.final_steps=4", r"config.progressive.final_steps=4 must be a power of two below base_steps=4"),
    ("progressive.stage_fractions=(1.0,)", r"config.progressive.stage_fractions=\(1.0,\) must be empty .* each of "
     r"the 2 stages \(4 -> 1 steps\)"),
    ("progressive.stage_fractions=(1.0,0.1)", r"config.progressive.stage_fractions=\(1.0, 0.1\) must be empty"),
    ("consistency.mid_sigmas=(0.1,0.5)", r"config.consistency.mid_sigmas=\(0.1, 0.5\) must decrease"),
    ("consistency.sample_steps=(1,3)", r"config.consistency.sample_steps=\(1, 3\) must be distinct integers from 1"),
    ("consistency.distance='l1'", r"config.consistency.distance='l1'; valid"),
    ("dmd.fake_updates_per_step=0", r"config.dmd.fake_updates_per_step=0 must be an integer >= 1"),
    ("dmd.gan.generator_weight=-1.0", r"config.dmd.gan.generator_weight=-1.0 must be >= 0"),
    ("sampler.teacher_steps=(2,1)", r"config.sampler.teacher_steps=\(2, 1\) must be increasing"),
    ("data.resolution=16", r"denoises 8x8x1 images; the data gives 16x16x1"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_configs_fail_clearly(bundles_dir, override, message):
    method = override.split(".")[0] if override.split(".")[0] in diffusion_distill.METHODS else "progressive"
    config = load_config(bundles_dir, f"tiny,{method}", judge=False)
    field, value = override.split("=", 1)
    block = config
    for part in field.split(".")[:-1]:
        block = block[part]
    block[field.split(".")[-1]] = eval(value, {})  # noqa: S307 - test literals
    with pytest.raises(ValueError, match=message):
        diffusion_distill.check_config(config)


def test_a_teacher_that_is_not_a_denoiser_is_refused(bundles_dir):
    config = load_config(bundles_dir, judge=False)
    config.teacher.bundle = str(bundles_dir / "judge")
    with pytest.raises(Exception, match=re.escape("config.teacher.bundle=") + ".*holds a 'cnn'"):
        diffusion_distill.check_config(config)


def test_the_shipped_teacher_fits_the_default_configs_and_denoises_held_out_digits():
    """Both configs name the shipped digits teacher and pass their checks; at sigma = 0.5 (about the data's own
    scale) its denoised held-out digits are closer to the clean ones than the noisy input by more than 12 dB of PSNR
    (peak-to-peak 2; measured: 28.9 dB against 12.0)."""
    for config_file in ("diffusion_distill.py", "diffusion_to_dcgan.py"):
        config = train.load_config(str(ROOT / "configs" / config_file))
        assert pathlib.Path(config.teacher.bundle) == DIGITS32_DIFFUSION
        diffusion_distill.check_config(config)
    model, variables, meta = bundles.load_model(config.teacher.bundle)
    assert meta["model"] == "edm_unet" and model.spec == models.DenoiserSpec(32, 1, 0, 0.5)
    clean = real_set(data.load_dataset(config.data), "test")[:64]
    noisy = clean + 0.5 * np.random.default_rng(6).standard_normal(clean.shape).astype(np.float32)
    denoised = np.asarray(jax.jit(lambda v, x: model.apply(v, x, jnp.full((64,), 0.5)))(variables, noisy))
    psnr = lambda x: 10 * np.log10(4.0 / np.mean((x - clean) ** 2))
    assert psnr(denoised) > psnr(noisy) + 12.0, (psnr(denoised), psnr(noisy))
