"""The VAE -> tiny decoder / encoder distillation task (tiny): the step's terms against numpy, the distillation
step on 8 devices equal to 1, the training crops, the end-to-end report (checked against scikit-image's PSNR
and against where the tiny decoder's L1 to the teacher starts), and bad configs as one clear error before
compute."""

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from skimage.metrics import peak_signal_noise_ratio

from kdjax import models, train
from kdjax.core import degradations, images, parallel, photos
from kdjax.evaluation.restoration import restoration_metrics
from kdjax.models import bundles
from kdjax.steps.state import TrainState
from kdjax.steps.vae import TinyDistillation, make_distill_step, objective
from kdjax.tasks import vae_kd

ROOT = pathlib.Path(__file__).resolve().parent.parent
PHASES = ("teacher", "tiny_decoder_kd", "tiny_decoder_scratch", "tiny_encoder")
RNGS = {"params": jax.random.key(0, impl="rbg")}  # 'rbg': XLA:CPU compiles threefry initialisers slowly


def load_config(arg="tiny"):
    return train.load_config(f"{ROOT / 'configs' / 'vae_kd.py'}:{arg}")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny_run")
    return workdir, train.train_and_evaluate(load_config(), workdir)


def random_variables(model, shape, seed, scale=0.2):
    """Variables of `model` for inputs of `shape` from N(0, scale^2), drawn here (no init compiled)."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(model.init, RNGS, jax.ShapeDtypeStruct(shape, jnp.float32))
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), abstract)


@pytest.fixture(scope="module")
def tiny_models():
    """(teacher VAE, its variables, tiny decoder, its params, tiny encoder, its params) at the tiny config's
    sizes (grey, factor 4, 2 latent channels), random."""
    teacher = models.build_model("vae", channels=1, latent_channels=2, widths=(8, 8, 16), res_blocks=0, norm_groups=4)
    decoder = models.build_model("tiny_decoder", channels=1, latent_channels=2, factor=4, features=8, blocks=0)
    encoder = models.build_model("tiny_encoder", channels=1, latent_channels=2, factor=4, features=8, blocks=0)
    return (teacher, random_variables(teacher, (1, 8, 8, 1), 0), decoder,
            random_variables(decoder, (1, 2, 2, 2), 1)["params"], encoder,
            random_variables(encoder, (1, 8, 8, 1), 2)["params"])


# ----------------------------------------------------------------------------------------- the step
def test_objective_terms_against_numpy(tiny_models):
    teacher, t_vars, decoder, d_params, encoder, e_params = tiny_models
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (3, 8, 8, 1)), jnp.float32)
    as_np = lambda a: np.asarray(a, np.float64)
    mean = as_np(teacher.apply(t_vars, x)["mean"])  # evaluation mode: z = mu_T(x)
    t_image = as_np(teacher.apply(t_vars, jnp.asarray(mean, jnp.float32), method=type(teacher).decode))
    s_image = as_np(decoder.apply({"params": d_params}, jnp.asarray(mean, jnp.float32)))
    l1_teacher, l1_target = np.abs(s_image - t_image).mean(), np.abs(s_image - as_np(x)).mean()

    kd = TinyDistillation(teacher, "decoder", w_teacher=0.7, w_target=0.4)
    loss, terms = objective(decoder, d_params, x, kd, t_vars)
    np.testing.assert_allclose(terms["l1_teacher"], l1_teacher, rtol=1e-5)
    np.testing.assert_allclose(terms["l1_target"], l1_target, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.7 * l1_teacher + 0.4 * l1_target, rtol=1e-5)
    scratch, terms = objective(decoder, d_params, x, TinyDistillation(teacher, "decoder", 0.0, 1.0), t_vars)
    assert set(terms) == {"l1_target"}
    np.testing.assert_allclose(scratch, l1_target, rtol=1e-5)
    mse, terms = objective(encoder, e_params, x, TinyDistillation(teacher, "encoder"), t_vars)
    np.testing.assert_allclose(mse, ((as_np(encoder.apply({"params": e_params}, x)) - mean) ** 2).mean(), rtol=1e-5)
    with pytest.raises(ValueError, match=r"role='middle'; valid: \['decoder', 'encoder'\]"):
        TinyDistillation(teacher, "middle")


def test_decoder_kd_step_on_8_devices_equals_1(tiny_models):
    """One SGD step with both decoder terms on a batch of 16: 8 devices give the 1-device parameters (a pmean
    of per-device gradients would make them 8 times too large). The tolerance is float32 round-off: the 8 devices
    sum the L1 terms' gradients in another order, and at XLA's lowest optimisation level (the test suite's,
    conftest.py) one bias differed by 2.7e-5 relative."""
    teacher, t_vars, decoder, d_params, _, _ = tiny_models
    kd = TinyDistillation(teacher, "decoder", w_teacher=0.6, w_target=0.5)
    batch = {"image": np.random.default_rng(2).uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)}
    tx = optax.sgd(0.5)
    params = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        state = parallel.replicate(TrainState.create({"params": d_params}, tx), mesh)
        state, _ = make_distill_step(decoder, tx, mesh, kd)(state, parallel.global_batch(batch, mesh),
                                                           parallel.replicate(t_vars, mesh))
        params.append(jax.tree.leaves(parallel.to_host(state.params)))
    assert len(jax.devices()) == 8
    for a, b in zip(*params, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not any(np.array_equal(a, b) for a, b in zip(params[0], jax.tree.leaves(d_params), strict=True))


# ----------------------------------------------------------------------------------------- the data
def test_training_crops_are_a_function_of_seed_and_step_and_digits_load():
    ims = [np.full((20, 24 + k, 1), 30 * k, np.uint8) for k in range(5)]
    batches = vae_kd.crop_batches(ims, 8, 16, seed=3)
    first, second = next(batches(5)), next(batches(5))
    np.testing.assert_array_equal(first["image"], second["image"])
    np.testing.assert_allclose(first["image"], photos.random_crops(ims, 8, 5, 3, 16) / 127.5 - 1.0, atol=1e-6)
    it = batches(4)
    next(it)
    np.testing.assert_array_equal(next(it)["image"], first["image"])  # step 5 from a start at 4
    config = load_config("digits")
    train_batches, validation, test = vae_kd.load_images(config, 4)
    assert next(train_batches(64)(0))["image"].shape == (64, 32, 32, 1)
    assert sum(len(b) for b in test) == 359 and sum(len(b) for b in validation) > 0


# ----------------------------------------------------------------------------------------- the task
def test_tiny_run_reports_every_pipeline_and_the_tiny_decoder_moves_to_the_teacher(tiny_run):
    workdir, report = tiny_run
    saved = json.loads((workdir / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    for name in (*vae_kd.PIPELINES, "tiny_decoder_init"):
        assert 0 < saved[name]["psnr"] < 60 and 0 < saved[name]["ssim"] <= 1, (name, saved[name])
        assert name == "teacher" or saved[name]["l1_vs_teacher"] > 0
        assert set(saved["validation"][name]) == set(saved[name])
    for name in PHASES:
        assert (workdir / name / "bundle" / "model.json").is_file()
        files = {p.name for p in (workdir / name / "checkpoints").rglob("*")}
        assert name == "teacher" or not any("teacher" in f for f in files)
    for half in ("decoder", "encoder"):
        teacher, tiny = saved["cost"][f"teacher_{half}"], saved["cost"][f"tiny_{half}"]
        assert teacher["params"] > tiny["params"] > 0 and tiny["flops_per_image"] > 0 and tiny["images_per_s"] > 0
    # The teacher's halves add up to the whole teacher bundle.
    meta, variables = bundles.load_model_bundle(workdir / "teacher" / "bundle")
    assert saved["cost"]["teacher_decoder"]["params"] + saved["cost"]["teacher_encoder"]["params"] == sum(
        x.size for x in jax.tree.leaves(variables))
    tiny_meta = json.loads((workdir / "tiny_decoder_kd" / "bundle" / "model.json").read_text())
    assert (tiny_meta["kwargs"]["latent_channels"], tiny_meta["kwargs"]["factor"]) == (2, 4)
    assert saved["num_test_images"] == 2 and saved["test_image_sizes"] == [[32, 32]]
    assert saved["tiny_encoder"]["latent_mse"] == saved["tiny_encoder_decoder"]["latent_mse"] > 0
    # A tiny run moves the distilled decoder towards the teacher decoder on the held-out photographs.
    assert saved["tiny_decoder_kd"]["l1_vs_teacher"] < saved["tiny_decoder_init"]["l1_vs_teacher"]
    text = (workdir / "report.md").read_text()
    assert "| tiny_decoder_scratch | teacher + tiny decoder scratch |" in text and "| tiny_encoder |" in text
    assert (workdir / "crops.png").is_file()

    # The teacher's PSNR, recomputed from its bundle with scikit-image on the same 8-bit photographs.
    teacher = models.build_model(meta["model"], **meta["kwargs"])
    config = load_config()
    test = vae_kd.load_images(config, 4)[2]
    psnrs = []
    for x in test:
        rec = teacher.apply(variables, x)["reconstruction"]
        to8 = lambda a: np.clip(np.round((np.asarray(a, np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)
        psnrs.append(peak_signal_noise_ratio(to8(x), to8(rec), data_range=255))
    np.testing.assert_allclose(saved["teacher"]["psnr"], np.mean(psnrs), rtol=1e-4)


@pytest.mark.parametrize("override,message", [
    ("teacher.recon=l3", "config.teacher.recon='l3'; valid: ['l1', 'l2']"),
    ("teacher.beta=-1.0", "config.teacher.beta=-1.0 must be >= 0"),
    ("teacher.model=tiny_decoder", "config.teacher.model='tiny_decoder'; valid latent_autoencoders: ['vae']"),
    ("teacher.kwargs.norm_groups=3", "config.teacher.kwargs: norm_groups=3 must be 0 or divide every width"),
    ("tiny_decoder.model=vae", "config.tiny_decoder.model='vae'; valid latent_decoders: ['tiny_decoder']"),
    ("tiny_decoder.kwargs.factor=2", "config.tiny_decoder.kwargs.factor: leave it out; it is taken from "
                                     "config.data.channels and the teacher (its latent_channels and factor)"),
    ("tiny_encoder.kwargs.width=8", "config.tiny_encoder.kwargs: model 'tiny_encoder' has no field(s) ['width']"),
    ("tiny_encoder.train.batch_size=4", "config.tiny_encoder.train.batch_size=4 must be a positive multiple of"),
    ("data.crop=18", "config.data.crop=18 must be a multiple of the teacher's downsampling factor 4"),
    ("kd.w_target=-1.0", "config.kd.w_target=-1.0 must be >= 0"),
    ("kd.w_teacher=0.0", "config.kd.w_teacher and config.kd.w_target are both 0"),
    ("data.source=flickr", "config.data.source='flickr' is not a photo source; valid: ['skimage', 'lfw', 'folder']"),
    ("digits,data.resolution=30", "config.data.resolution=30 must be a multiple of the teacher's downsampling "
                                  "factor 4"),
])
def test_bad_config_values_fail_before_compute(override, message):
    if ".kwargs." in override:  # new model fields: set on the loaded config (kwargs blocks stay open)
        config = load_config()
        path, value = override.split("=")
        block, _, field = path.split(".")
        config[block].kwargs[field] = int(value)
    else:
        config = load_config(override if override.startswith("digits") else f"tiny,{override}")
    with pytest.raises(ValueError, match=re.escape(message)):
        train.check_config(config)


def test_teacher_bundle_must_be_a_vae_of_the_datas_channels(tiny_run):
    reference, _ = tiny_run
    config = load_config()
    config.teacher.checkpoint = str(reference / "teacher" / "bundle")
    train.check_config(config)  # the tiny run's own teacher fits
    config = load_config("tiny,data.channels=3")
    config.teacher.checkpoint = str(reference / "teacher" / "bundle")
    with pytest.raises(ValueError, match=r"encodes 1-channel images; the data has 3 \(config.data.channels\)"):
        train.check_config(config)
    for bundle, held in ((reference / "tiny_decoder_kd" / "bundle", r"'tiny_decoder' \(latent_decoder\)"),
                         (ROOT / "kdjax" / "pretrained" / "digits32" / "judge", r"'resnet' \(classifier\)")):
        config = load_config()
        config.teacher.checkpoint = str(bundle)
        with pytest.raises(ValueError, match=f"holds a {held}; a latent_autoencoder bundle is needed"):
            train.check_config(config)


def test_the_shipped_vae_fits_the_default_config_and_beats_bicubic_at_its_factor():
    """The default config names the shipped VAE; on a held-out photograph's centre (coins, 96 x 96) its
    reconstruction through the posterior mean (4 latent numbers per 4 x 4 pixels) beats bicubic downsampling by
    the same factor and back (3 numbers per 4 x 4 pixels) by more than 2 dB."""
    config = load_config("")
    assert pathlib.Path(config.teacher.checkpoint) == ROOT / "kdjax" / "pretrained" / "photos" / "vae"
    train.check_config(config)
    model, variables, meta = bundles.load_model(config.teacher.checkpoint, "teacher")
    assert meta["model"] == "vae" and model.spec.factor == 4 and model.spec.channels == 3
    _, _, test_photos = photos.split_photos(photos.load_photos("skimage", 3), config.data.test_fraction,
                                            config.data.validation_fraction)
    image = images.to_model_range(photos.eval_crop(test_photos[0], 4, 96)[None])
    reconstruction = jax.jit(lambda v, x: model.apply(v, model.apply(v, x, method="encode")[0], method="decode"))
    restored = np.asarray(reconstruction(variables, image))
    bicubic = degradations.upsample_bicubic(degradations.downsample(image, 4), 4)
    psnr = lambda out: restoration_metrics(out, image, shave=0)["psnr"][0]
    assert psnr(restored) > psnr(bicubic) + 2.0, (psnr(restored), psnr(bicubic))
