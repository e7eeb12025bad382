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
from kdjax.steps.restoration import Adversary, init_discriminator
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
    loss, (terms, _) = objective(decoder, d_params, x, kd, t_vars)
    np.testing.assert_allclose(terms["l1_teacher"], l1_teacher, rtol=1e-5)
    np.testing.assert_allclose(terms["l1_target"], l1_target, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.7 * l1_teacher + 0.4 * l1_target, rtol=1e-5)
    scratch, (terms, _) = objective(decoder, d_params, x, TinyDistillation(teacher, "decoder", 0.0, 1.0), t_vars)
    assert set(terms) == {"l1_target"}
    np.testing.assert_allclose(scratch, l1_target, rtol=1e-5)
    mse, (terms, _) = objective(encoder, e_params, x, TinyDistillation(teacher, "encoder"), t_vars)
    np.testing.assert_allclose(mse, ((as_np(encoder.apply({"params": e_params}, x)) - mean) ** 2).mean(), rtol=1e-5)
    with pytest.raises(ValueError, match=r"role='middle'; valid: \['decoder', 'encoder'\]"):
        TinyDistillation(teacher, "middle")


def tiny_judge():
    """A random 16x16 grey classifier (a ResNet: BatchNorm, so its variables carry batch statistics)."""
    judge = models.build_model("resnet", num_classes=3, widths=(4, 8), blocks_per_stage=(1, 1))
    variables = random_variables(judge, (1, 16, 16, 1), 3)
    stats = jax.tree_util.tree_map_with_path(  # running variances must be positive
        lambda path, v: 1.0 + jnp.abs(v) if "var" in jax.tree_util.keystr(path) else v, variables["batch_stats"])
    return judge, {**variables, "batch_stats": stats}


def tiny_adversary():
    discriminator = models.build_model("dcgan_discriminator", resolution=16, img_channels=1, width=4, width_max=8)
    return Adversary(discriminator, optax.sgd(0.1), 0.3, 16, "logistic")


def test_perceptual_and_adversarial_terms_against_independent_computations(tiny_models):
    """TAESD's terms: the perceptual term is LPIPS's baseline distance computed here in numpy (per layer, channel
    vectors divided by their norm, squared distance summed over channels, averaged over positions, layers and
    images) between the judge's maps (its "pool" vector left out) of the tiny decoder's and the teacher decoder's
    images; the adversarial term is softplus(-D(D_s(z))) averaged; the loss adds them with their weights. 16 x 16
    images (the DCGAN discriminator's smallest)."""
    teacher, t_vars, decoder, d_params, _, _ = tiny_models
    judge, j_vars = tiny_judge()
    adversary = tiny_adversary()
    disc = random_variables(adversary.discriminator, (1, 16, 16, 1), 4)
    x = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (3, 16, 16, 1)), jnp.float32)
    mean = teacher.apply(t_vars, x)["mean"]
    t_image = teacher.apply(t_vars, mean, method=type(teacher).decode)
    s_image = decoder.apply({"params": d_params}, mean)
    maps = lambda v: {k: np.asarray(f, np.float64) for k, f in judge.apply(j_vars, v, return_features=True)[1].items()
                      if k != "pool"}
    s_maps, t_maps = maps(s_image), maps(t_image)
    norm = lambda f: f / (np.sqrt((f ** 2).sum(-1, keepdims=True)) + 1e-10)  # LPIPS's; all-zero vectors stay 0
    as4 = lambda f: f[:, None, None, :] if f.ndim == 2 else f
    perceptual = np.mean([((norm(as4(s_maps[k])) - norm(as4(t_maps[k]))) ** 2).sum(-1).mean() for k in s_maps])
    logits = np.asarray(adversary.discriminator.apply(disc, s_image, None), np.float64)
    adv = np.log1p(np.exp(-logits)).mean()
    l1_teacher = np.abs(np.asarray(s_image, np.float64) - np.asarray(t_image, np.float64)).mean()

    kd = TinyDistillation(teacher, "decoder", 1.0, 0.0, w_perceptual=0.4, judge=judge, adversary=adversary)
    loss, (terms, decoded) = objective(decoder, d_params, x, kd, t_vars, j_vars, disc["params"])
    assert set(terms) == {"l1_target", "l1_teacher", "perceptual", "adv"} and perceptual > 1e-3
    np.testing.assert_allclose(terms["perceptual"], perceptual, rtol=1e-4)
    np.testing.assert_allclose(terms["adv"], adv, rtol=1e-5)
    np.testing.assert_allclose(loss, l1_teacher + 0.4 * perceptual + 0.3 * adv, rtol=1e-4)
    np.testing.assert_allclose(decoded, s_image, rtol=1e-6)
    with pytest.raises(ValueError, match="w_perceptual=0.4 needs a judge"):
        TinyDistillation(teacher, "decoder", w_perceptual=0.4)
    with pytest.raises(ValueError, match="the tiny encoder learns the latent MSE alone"):
        TinyDistillation(teacher, "encoder", adversary=adversary)


@pytest.mark.parametrize("taesd_terms", [False, True])
def test_decoder_kd_step_on_8_devices_equals_1(tiny_models, taesd_terms):
    """One SGD step with both decoder terms on a batch of 16: 8 devices give the 1-device parameters (a pmean
    of per-device gradients would make them 8 times too large). The tolerance is float32 round-off: the 8 devices
    sum the L1 terms' gradients in another order, and at XLA's lowest optimisation level (the test suite's,
    conftest.py) one bias differed by 2.7e-5 relative. With TAESD's perceptual and adversarial terms the same,
    the discriminator's update included (it moves)."""
    teacher, t_vars, decoder, d_params, _, _ = tiny_models
    judge, j_vars = tiny_judge()
    adversary = tiny_adversary() if taesd_terms else None
    kd = TinyDistillation(teacher, "decoder", w_teacher=0.6, w_target=0.5, w_perceptual=0.5 * taesd_terms,
                          judge=judge if taesd_terms else None, adversary=adversary)
    side = 16 if taesd_terms else 8  # the DCGAN discriminator's smallest images
    batch = {"image": np.random.default_rng(2).uniform(-1, 1, (16, side, side, 1)).astype(np.float32)}
    tx = optax.sgd(0.5)
    model_state = ({"discriminator": init_discriminator(adversary, 1, jax.random.key(6))} if taesd_terms else {})
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        state = parallel.replicate(TrainState.create({"params": d_params, **model_state}, tx), mesh)
        state, metrics = make_distill_step(decoder, tx, mesh, kd)(
            state, parallel.global_batch(batch, mesh), parallel.replicate(t_vars, mesh),
            parallel.replicate(j_vars if taesd_terms else {}, mesh))
        results.append((parallel.to_host(state), jax.tree.map(float, metrics.compute())))
    assert len(jax.devices()) == 8
    (one, metrics_one), (eight, metrics_eight) = results
    for a, b in zip(jax.tree.leaves((one.params, one.model_state)), jax.tree.leaves((eight.params, eight.model_state)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for name, value in metrics_one.items():
        assert metrics_eight[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert not any(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(d_params),
                                                        strict=True))
    if taesd_terms:
        assert {"perceptual", "adv", "d_loss"} <= set(metrics_one)
        moved = jax.tree.leaves(one.model_state["discriminator"]["params"])
        assert not all(np.array_equal(a, b) for a, b in zip(moved, jax.tree.leaves(
            model_state["discriminator"]["params"]), strict=True))


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
    ("data.source=flickr",
     "config.data.source='flickr' is not a photo source; valid: ['skimage', 'lfw', 'sklearn', 'folder']"),
    ("digits,data.resolution=30", "config.data.resolution=30 must be a multiple of the teacher's downsampling "
                                  "factor 4"),
    ("kd.w_perceptual=0.1", "config.kd.w_perceptual=0.1 needs config.kd.judge, a classifier bundle"),
    ("digits,kd.w_perceptual=0.1,data.resolution=16", "takes images of shape (32, 32, 1); the training images are "
                                                      "(16, 16, 1)"),
    ("kd.w_adv=-0.5", "config.kd.w_adv=-0.5 must be >= 0"),
    ("vq,teacher.vq_decay=1.0", "config.teacher.vq_decay=1.0 must be in [0, 1)"),
    ("teacher.kwargs.num_codes=-2", "config.teacher.kwargs: num_codes=-2 must be >= 0"),
    ("kd.w_adv=0.1,kd.adv_loss=wasserstein", "config.kd.adv_loss='wasserstein'; valid: ['hinge', 'logistic']"),
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


def test_the_adversarial_term_trains_the_kd_decoder_with_a_discriminator(tiny_run, tmp_path):
    """The tiny run with TAESD's adversarial term (w_adv 0.5, the tiny teacher of the reference run): the report
    names it, and the KD decoder ends elsewhere than without it (same seed, data and initialisation) while the
    scratch decoder, which has no such term, is the reference run's bitwise."""
    reference, _ = tiny_run
    config = load_config("tiny,kd.w_adv=0.5")
    config.teacher.checkpoint = str(reference / "teacher" / "bundle")
    train.check_config(config)
    out = train.train_and_evaluate(config, tmp_path)
    assert out["kd"]["w_adv"] == 0.5 and "w_adv = 0.5" in (tmp_path / "report.md").read_text()
    load = lambda root, phase: jax.tree.leaves(bundles.load_model_bundle(root / phase / "bundle")[1])
    assert max(np.abs(a - b).max() for a, b in zip(load(tmp_path, "tiny_decoder_kd"),
                                                   load(reference, "tiny_decoder_kd"), strict=True)) > 1e-6
    for a, b in zip(load(tmp_path, "tiny_decoder_scratch"), load(reference, "tiny_decoder_scratch"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_vq_teacher_trains_exports_its_codebook_and_its_tiny_halves_work_on_codes(tmp_path):
    """`tiny,vq`: the teacher is a VQ-VAE (16 codes) trained in the run; its bundle holds the EMA-moved codebook;
    the teacher's latents of the test images are codebook vectors, so the tiny decoder learns from codes; the
    tiny-encoder pipeline decodes the tiny encoder's latents snapped to the codes (recomputed here); the report
    says so."""
    config = load_config("tiny,vq")
    train.check_config(config)
    out = train.train_and_evaluate(config, tmp_path)
    assert out["num_codes"] == 16 and "quantised to 16 codes" in (tmp_path / "report.md").read_text()
    teacher, t_vars, _ = bundles.load_model(tmp_path / "teacher" / "bundle")
    encoder, e_vars, _ = bundles.load_model(tmp_path / "tiny_encoder" / "bundle")
    assert teacher.num_codes == 16 and t_vars["vq"]["codebook"].shape == (16, 2)
    init = teacher.init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 16, 16, 1)))
    assert not np.allclose(t_vars["vq"]["codebook"], init["vq"]["codebook"])
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 1)), jnp.float32)
    mean, _ = teacher.apply(t_vars, x, method=type(teacher).encode)
    codebook = np.asarray(t_vars["vq"]["codebook"])
    assert np.min(np.abs(np.asarray(mean)[..., None, :] - codebook).sum(-1), axis=-1).max() < 1e-6
    latents = np.asarray(encoder.apply(e_vars, x), np.float64)
    snapped = codebook[np.argmin(((latents[..., None, :] - codebook) ** 2).sum(-1), axis=-1)]
    np.testing.assert_allclose(teacher.apply(t_vars, latents, method=type(teacher).snap), snapped, rtol=1e-6)
    assert np.isfinite(out["tiny_encoder"]["psnr"]) and np.isfinite(out["tiny_decoder_kd"]["psnr"])


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
