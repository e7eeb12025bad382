"""The image-restoration distillation task (tiny): training pairs, the step's terms against numpy, 8 devices equal
1, a fixed training pool with the teacher's outputs computed once (the step on it equals the step that runs the
teacher), the report, exact resume, and bad configs as one clear error before compute."""

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import losses, models, train
from kdjax.evaluation.restoration import restoration_metrics
from kdjax.core import degradations, parallel, photos
from kdjax.models import bundles
from kdjax.steps.restoration import (Adversary, Distillation, init_adapters, init_discriminator, make_adapters,
                                     make_train_step, objective)
from kdjax.steps.state import TrainState
from kdjax.tasks import restoration_kd

ROOT = pathlib.Path(__file__).resolve().parent.parent
PHASES = ("teacher", "student_kd", "student_scratch")
ROWS = ("baseline", *PHASES)
TIMING = ("images_per_s",)
TINY_TEACHER = dict(channels=1, scale=2, num_features=8, num_blocks=2)
TINY_STUDENT = dict(channels=1, scale=2, features=(8, 4))
PAIRS = {"hidden1": "body1", "hidden2": "body"}  # student feature -> teacher feature


def load_config(arg="tiny"):
    return train.load_config(f"{ROOT / 'configs' / 'restoration_kd.py'}:{arg}")


def without_timing(report):
    return {k: ({f: x for f, x in v.items() if f not in TIMING} if isinstance(v, dict) else v)
            for k, v in report.items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, train.train_and_evaluate(load_config(), workdir)


# ----------------------------------------------------------------------------------------- training pairs
def flat_photos(n=10, size=24):
    """Photograph k is flat grey 20 k + 5 (its pixels name it), with a little texture so crops differ."""
    rng = np.random.default_rng(0)
    return [np.full((size, size + k, 1), 20 * k + 5, np.uint8) + rng.integers(0, 2, (size, size + k, 1), np.uint8)
            for k in range(n)]


def test_pairs_are_a_function_of_seed_and_step_and_never_read_a_test_photograph():
    images = flat_photos()
    train_photos, _, test_photos = photos.split_photos(images, 0.3)
    assert len(test_photos) == 3 and len(train_photos) == 7
    names = lambda ims: {int(np.median(im)) // 20 for im in ims}
    assert names(train_photos).isdisjoint(names(test_photos))
    source = photos.PairSource(train_photos, 8, "downsample", {"scale": 2}, seed=3)
    batches = photos.PairBatches(source, 16, process_index=0, process_count=1, num_threads=1)
    seen = set()
    for step in range(20):
        batch = batches.batch(step)
        assert batch["input"].shape == (16, 4, 4, 1) and batch["target"].shape == (16, 8, 8, 1)
        assert batch["input"].dtype == batch["target"].dtype == np.float32
        np.testing.assert_allclose(batch["input"], degradations.downsample(batch["target"], 2), atol=1e-6)
        seen |= {int(np.round((np.median(t) + 1) * 127.5)) // 20 for t in batch["target"]}
    assert seen == names(train_photos)  # every training photograph, never a test one
    again = photos.PairBatches(photos.PairSource(train_photos, 8, "downsample", {"scale": 2}, seed=3), 16,
                               process_index=0, process_count=1)
    first = next(again.iterate(5))
    for key in ("input", "target"):
        np.testing.assert_array_equal(first[key], batches.batch(5)[key])
        assert not np.array_equal(batches.batch(5)[key], batches.batch(6)[key])
    other_seed = photos.PairBatches(photos.PairSource(train_photos, 8, "downsample", {"scale": 2}, seed=4), 16,
                                    process_index=0, process_count=1)
    assert not np.array_equal(other_seed.batch(5)["target"], batches.batch(5)["target"])
    halves = [photos.PairBatches(source, 16, process_index=p, process_count=2).batch(5)["target"] for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves), batches.batch(5)["target"])


def test_inpainting_pairs_carry_the_mask_and_eval_pairs_are_fixed():
    source = photos.PairSource(flat_photos(), 8, "box_inpainting", {}, seed=0)
    item = source[7]
    assert item["input"].shape == (8, 8, 2) and set(np.unique(item["input"][..., 1])) <= {0.0, 1.0}
    np.testing.assert_array_equal(item["input"][..., 0], item["target"][..., 0] * (1 - item["input"][..., 1]))
    np.testing.assert_array_equal(source[7]["input"], item["input"])
    big = np.zeros((50, 37, 1), np.uint8)
    assert photos.eval_crop(big, 4).shape == (48, 36, 1) and photos.eval_crop(big, 2, max_side=32).shape == (32, 32, 1)
    first, second = (photos.eval_pairs([big + 9], "noise", {"sigma": 25.0}, 1, 32) for _ in range(2))
    np.testing.assert_array_equal(first[0]["input"], second[0]["input"])


# ----------------------------------------------------------------------------------------- the step
def numpy_fakd(fs, ft):
    def affinity(f):
        flat = f.reshape(f.shape[0], -1, f.shape[-1]).astype(np.float64)
        norm = np.sqrt((flat**2).sum(-1, keepdims=True))
        flat = flat / (norm + 1e-7)
        return flat @ flat.transpose(0, 2, 1)

    return np.mean([np.abs(affinity(fs[k]) - affinity(ft[k])).mean() for k in sorted(fs)])


def test_fakd_against_numpy():
    rng = np.random.default_rng(0)
    fs = {"a": rng.normal(size=(2, 3, 4, 5)), "b": rng.normal(size=(2, 2, 2, 3))}
    ft = {"a": rng.normal(size=(2, 3, 4, 7)), "b": rng.normal(size=(2, 2, 2, 9)), "c": rng.normal(size=(2, 1, 1, 1))}
    fs["a"][0, 1, 2] = 0.0  # an all-zero channel vector (after a ReLU): affinity 0, gradient finite
    got = losses.fakd({k: jnp.asarray(v, jnp.float32) for k, v in fs.items()},
                      {k: jnp.asarray(v, jnp.float32) for k, v in ft.items()})
    np.testing.assert_allclose(got, numpy_fakd(fs, {k: ft[k] for k in fs}), rtol=1e-5)
    a = np.asarray(losses.feature_affinity(jnp.asarray(ft["a"], jnp.float32)))
    assert a.shape == (2, 12, 12) and np.allclose(np.diagonal(a, axis1=1, axis2=2), 1.0, atol=1e-5)
    grads = jax.grad(lambda f: losses.fakd({"a": f}, {"a": jnp.asarray(ft["a"], jnp.float32)}))(
        jnp.asarray(fs["a"], jnp.float32))
    assert np.isfinite(grads).all()
    with pytest.raises(ValueError, match="differs in \\(B, H, W\\)"):
        losses.fakd({"a": jnp.zeros((1, 2, 2, 3))}, {"a": jnp.zeros((1, 4, 4, 3))})


@pytest.fixture(scope="module")
def tiny_models():
    """(student, teacher, teacher variables, student params, adapters, their params) at 4 x 4 inputs ('rbg' keys:
    XLA:CPU compiles threefry initialisers slowly)."""
    student = models.build_model("espcn", **TINY_STUDENT)
    teacher = models.build_model("edsr", **TINY_TEACHER)
    x = jnp.zeros((1, 4, 4, 1))
    key = lambda seed: jax.random.key(seed, impl="rbg")
    init = lambda model, seed: jax.device_get(jax.jit(model.init)(key(seed), x))
    adapters = make_adapters(student, teacher, PAIRS, x.shape)
    adapter_params = jax.device_get(init_adapters(adapters, student, x.shape, key(2))["params"])
    return student, teacher, init(teacher, 0), init(student, 1)["params"], adapters, adapter_params


def test_objective_terms_against_numpy(tiny_models):
    student, teacher, t_vars, s_params, adapters, adapter_params = tiny_models
    pairs = PAIRS
    params = {"student": s_params, "adapters": adapter_params}
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 1)), jnp.float32)
    y = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 1)), jnp.float32)
    kd = Distillation(teacher, alpha=0.3, w_feat=0.7, w_fakd=1.9, pairs=pairs, adapters=adapters)
    loss, terms, _ = jax.jit(lambda p, v: objective(student, p, x, y, kd, v))(params, t_vars)

    as_numpy = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
    forward = lambda model: jax.jit(lambda v, x: model.apply(v, x, return_features=True))
    s_out, f_s = as_numpy(forward(student)({"params": s_params}, x))
    t_out, f_t = as_numpy(forward(teacher)(t_vars, x))
    l1_target, l1_teacher = np.abs(s_out - np.asarray(y)).mean(), np.abs(s_out - t_out).mean()
    adapted = {s: f_s[s] @ np.asarray(params["adapters"][f"adapter_{s}"]["kernel"])[0, 0]
               + np.asarray(params["adapters"][f"adapter_{s}"]["bias"]) for s in pairs}
    feature = np.mean([((adapted[s] - f_t[t]) ** 2).mean() for s, t in pairs.items()])
    fakd = numpy_fakd({s: f_s[s] for s in pairs}, {s: f_t[t] for s, t in pairs.items()})
    expected = {"l1_target": l1_target, "l1_teacher": l1_teacher, "feature": feature, "fakd": fakd}
    for name, value in expected.items():
        np.testing.assert_allclose(terms[name], value, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(loss, 0.3 * l1_target + 0.7 * l1_teacher + 0.7 * feature + 1.9 * fakd, rtol=1e-5)
    assert 0 < fakd and 0 < feature
    alone, alone_terms, _ = jax.jit(lambda p: objective(student, p, x, y, None, {}))({"student": s_params})
    np.testing.assert_allclose(alone, l1_target, rtol=1e-6)
    assert set(alone_terms) == {"l1_target"}


@pytest.fixture(scope="module")
def tiny_adversary():
    """A tiny DCGAN discriminator of 16 x 16 windows (logistic loss, SGD) and its initial model state."""
    d = models.build_model("dcgan_discriminator", resolution=16, img_channels=1, width=4, width_max=8)
    adversary = Adversary(d, optax.sgd(0.3), weight=0.6, window=16)
    return adversary, init_discriminator(adversary, 1, jax.random.key(5, impl="rbg"))


def test_adversarial_term_against_numpy(tiny_models, tiny_adversary):
    """w_adv * softplus(-D(W(S(x)))) on the central 16 x 16 window of 24 x 24 outputs, D's logits from its own
    apply on the window cut in numpy; the rest of the loss is unchanged."""
    student, teacher, t_vars, s_params, adapters, adapter_params = tiny_models
    adversary, d_state = tiny_adversary
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 12, 12, 1)), jnp.float32)
    y = jnp.asarray(rng.uniform(-1, 1, (2, 24, 24, 1)), jnp.float32)
    params = {"student": s_params, "adapters": adapter_params}
    plain = Distillation(teacher, alpha=0.3, w_feat=0.7, w_fakd=1.9, pairs=PAIRS, adapters=adapters)
    with_adv = Distillation(teacher, alpha=0.3, w_feat=0.7, w_fakd=1.9, pairs=PAIRS, adapters=adapters,
                            adversary=adversary)
    run = lambda kd: jax.jit(lambda p, v, d: objective(student, p, x, y, kd, v, d))
    loss0, terms0, out = run(plain)(params, t_vars, d_state["params"])
    loss, terms, _ = run(with_adv)(params, t_vars, d_state["params"])
    window = np.asarray(out)[:, 4:20, 4:20]
    logits = np.asarray(adversary.discriminator.apply({"params": d_state["params"]}, jnp.asarray(window), None),
                        np.float64)
    expected = np.logaddexp(0.0, -logits).mean()
    np.testing.assert_allclose(terms["adv"], expected, rtol=1e-5)
    np.testing.assert_allclose(loss, loss0 + 0.6 * expected, rtol=1e-5)
    assert "adv" not in terms0


@pytest.mark.parametrize("adversarial", [False, True], ids=["l1_features", "with_adversary"])
def test_kd_step_on_8_devices_equals_1(tiny_models, tiny_adversary, adversarial):
    """One SGD step of KD with every term on a batch of 16: 8 devices give the 1-device parameters (a pmean of
    per-device gradients would make them 8 times too large), the discriminator's too when there is one."""
    student, teacher, t_vars, s_params, adapters, adapter_params = tiny_models
    variables = {"params": {"student": s_params, "adapters": adapter_params}}
    adversary, d_state = tiny_adversary if adversarial else (None, None)
    if adversarial:
        variables["discriminator"] = d_state
    kd = Distillation(teacher, alpha=0.4, w_feat=0.5, w_fakd=2.0, pairs=PAIRS, adapters=adapters,
                      adversary=adversary)
    side = 8 if adversarial else 4
    rng = np.random.default_rng(2)
    batch = {"input": rng.uniform(-1, 1, (16, side, side, 1)).astype(np.float32),
             "target": rng.uniform(-1, 1, (16, 2 * side, 2 * side, 1)).astype(np.float32)}
    tx = optax.sgd(0.5)
    params = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        state = parallel.replicate(TrainState.create(variables, tx), mesh)
        state, metrics = make_train_step(student, tx, mesh, kd)(state, parallel.global_batch(batch, mesh),
                                                                parallel.replicate(t_vars, mesh))
        assert ("d_loss" in metrics.compute()) == adversarial
        params.append(jax.tree.leaves(parallel.to_host((state.params, state.model_state))))
    assert len(jax.devices()) == 8
    for a, b in zip(*params, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    before = jax.tree.leaves((variables["params"], {k: v for k, v in variables.items() if k != "params"}))
    assert not any(np.array_equal(a, b) for a, b in zip(params[0], before))  # D moved too


def test_pool_source_draws_rows_of_its_pool_by_seed_and_item():
    pool = {"input": np.arange(5.0)[:, None], "nested": {"target": np.arange(5.0)[:, None] * 10}}
    source = photos.PoolSource(pool, seed=3)
    items = [source[i] for i in range(200)]
    for i, item in enumerate(items):  # an item is one row of every array, the same row
        j = source.index(i)
        assert item["input"][0] == j and item["nested"]["target"][0] == 10 * j
    assert {source.index(i) for i in range(200)} == set(range(5))
    assert [source.index(i) for i in range(20)] == [photos.PoolSource(pool, seed=3).index(i) for i in range(20)]
    assert [source.index(i) for i in range(20)] != [photos.PoolSource(pool, seed=4).index(i) for i in range(20)]
    with pytest.raises(ValueError, match=re.escape("one common, non-zero length; got lengths [2, 5]")):
        photos.PoolSource({**pool, "other": np.zeros(2)}, seed=0)


def test_kd_step_on_the_pool_equals_the_step_that_runs_the_teacher(tiny_models):
    """The first 16 pairs of a pool (the teacher's outputs and paired maps computed by `training_pool`, 64 a pass):
    one KD step with them in the batch, without the teacher, ends on the parameters of the step that runs the
    teacher on the same inputs."""
    student, teacher, t_vars, s_params, adapters, adapter_params = tiny_models
    source = photos.PairSource(flat_photos(), 8, "downsample", {"scale": 2}, seed=0)
    pool = restoration_kd.training_pool(source, 70, teacher, t_vars, sorted(set(PAIRS.values())))
    assert pool["teacher"].shape == (70, 8, 8, 1) and set(pool["teacher_features"]) == {"body1", "body"}
    np.testing.assert_array_equal(pool["input"][5], source[5]["input"])
    kd = Distillation(teacher, alpha=0.4, w_feat=0.5, w_fakd=2.0, pairs=PAIRS, adapters=adapters)
    tx, mesh = optax.sgd(0.5), parallel.make_mesh(jax.devices()[:1])
    variables = {"params": {"student": s_params, "adapters": adapter_params}}
    batch = jax.tree.map(lambda a: a[:16], pool)
    ends = []
    for given, constants in (({k: batch[k] for k in ("input", "target")}, t_vars), (batch, {})):
        state = parallel.replicate(TrainState.create(variables, tx), mesh)
        state, metrics = make_train_step(student, tx, mesh, kd)(state, parallel.global_batch(given, mesh),
                                                                parallel.replicate(constants, mesh))
        ends.append((jax.tree.leaves(parallel.to_host(state.params)), metrics.compute()))
    for a, b in zip(ends[0][0], ends[1][0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for name in ("l1_teacher", "feature", "fakd"):
        np.testing.assert_allclose(ends[0][1][name], ends[1][1][name], rtol=1e-5)
        assert ends[0][1][name] > 0


# ----------------------------------------------------------------------------------------- the task
def test_tiny_run_reports_every_model_and_kd_moves_the_student_to_the_teacher(uninterrupted):
    workdir, report = uninterrupted
    saved = json.loads((workdir / "report.json").read_text())
    for name in ROWS:
        assert 0 < saved[name]["psnr"] < 60 and 0 < saved[name]["ssim"] <= 1, (name, saved[name])
    for name in PHASES:
        assert saved[name]["flops_per_image"] > 0 and saved[name]["images_per_s"] > 0
        assert (workdir / name / "bundle" / "model.json").is_file()
    assert saved["teacher"]["params"] > saved["student_kd"]["params"] == saved["student_scratch"]["params"]
    assert saved["num_test_images"] == 2 and saved["test_image_sizes"] == [[32, 32], [32, 32]]
    # Validation photographs (carved from the training side) are scored the same way, costs aside.
    assert saved["num_validation_images"] == 4 and set(saved["validation"]) == set(ROWS)
    assert saved["validation_origin"] == "2 set aside from the training side and the 2 of source 'sklearn'"
    assert saved["validation"]["student_kd"]["psnr"] != saved["student_kd"]["psnr"]
    # A tiny run lowers the student's L1 to the teacher's output on the held-out photographs.
    assert saved["student_kd"]["l1_vs_teacher"] < saved["student_init"]["l1_vs_teacher"]
    text = (workdir / "report.md").read_text()
    assert "| baseline (bicubic) |" in text and "| student_scratch |" in text and "shaved" in text
    assert re.search(r"The student at initialisation: PSNR \d+\.\d\d dB, L1 vs teacher \d\.\d{4}\.", text), text
    assert (workdir / "crops.png").is_file()
    meta = json.loads((workdir / "student_kd" / "bundle" / "model.json").read_text())
    assert meta["kwargs"]["scale"] == 2 and meta["kwargs"]["extra_inputs"] == 0
    student_files = {p.name for p in (workdir / "student_kd" / "checkpoints").rglob("*")}
    assert not any("teacher" in name for name in student_files)


def test_stop_and_resume_equals_uninterrupted_bitwise(uninterrupted, tmp_path):
    reference, report = uninterrupted
    config = load_config()
    config.stop_after_steps = 14  # the teacher's 10 steps, then 4 of student_kd's 10
    assert train.train_and_evaluate(config, tmp_path) is None
    assert not (tmp_path / "student_kd" / "bundle").exists()
    resumed = train.train_and_evaluate(load_config(), tmp_path)
    for phase in PHASES:
        for a, b in zip(jax.tree.leaves(bundles.load_model_bundle(reference / phase / "bundle")[1]),
                        jax.tree.leaves(bundles.load_model_bundle(tmp_path / phase / "bundle")[1]), strict=True):
            np.testing.assert_array_equal(a, b)
    assert without_timing(resumed) == without_timing(report)


def test_pooled_run_resumes_bitwise_and_distils(uninterrupted, tmp_path):
    """data.train_pool = 64: both students train on one fixed pool, the teacher's outputs computed once; stopped
    inside student_kd and relaunched (the pool rebuilt), it ends on the bundles of an uninterrupted pooled run,
    and KD still moves the student towards the teacher."""
    pooled = lambda: load_config("tiny,data.train_pool=64")
    reference = train.train_and_evaluate(pooled(), tmp_path / "whole")
    assert reference["train_pool"] == 64 and "fixed pool of 64 pairs" in (tmp_path / "whole" / "report.md").read_text()
    assert reference["student_kd"]["l1_vs_teacher"] < reference["student_init"]["l1_vs_teacher"]
    assert reference["student_kd"]["psnr"] != uninterrupted[1]["student_kd"]["psnr"]  # other pairs than the stream
    config = pooled()
    config.stop_after_steps = 14
    assert train.train_and_evaluate(config, tmp_path / "resumed") is None
    resumed = train.train_and_evaluate(pooled(), tmp_path / "resumed")
    for phase in PHASES:
        for a, b in zip(jax.tree.leaves(bundles.load_model_bundle(tmp_path / "whole" / phase / "bundle")[1]),
                        jax.tree.leaves(bundles.load_model_bundle(tmp_path / "resumed" / phase / "bundle")[1]),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    assert without_timing(resumed) == without_timing(reference)


@pytest.mark.parametrize("override,message", [
    ("degradation.name=sharpen", "config.degradation.name='sharpen' is not a degradation; valid: ['blur', "),
    ("data.crop=15", "config.degradation.scale=2 does not divide the crop size 15"),
    ("kd.alpha=1.5", "config.kd.alpha=1.5 must be in [0, 1]"),
    ("kd.w_fakd=-1.0", "config.kd.w_fakd=-1.0 must be >= 0"),
    ("kd.pairs='hidden1'", "config.kd.pairs='hidden1': expected comma-separated 'student:teacher'"),
    ("kd.pairs='hidden1:body7'", "config.kd.pairs: 'body7' is not a teacher feature; valid teacher features: "),
    ("teacher.model=unet", "config.teacher.kwargs: model 'unet' has no field(s) ['num_blocks', 'num_features']"),
    ("data.source=flickr",
     "config.data.source='flickr' is not a photo source; valid: ['skimage', 'lfw', 'sklearn', 'folder']"),
    ("data.source=lfw,data.crop=32", "image 0 is 25 x 25 pixels, smaller than the 32 x 32 crop"),
    ("data.eval_max_side=8", "config.data.eval_max_side=8 must be 0 (whole photographs) or >= config.data.crop=16"),
    ("kd.w_adv=0.1,kd.adv_loss=wasserstein", "config.kd.adv_loss='wasserstein'; valid: ['hinge', 'logistic']"),
    ("kd.w_adv=0.1,kd.discriminator.model=espcn", "config.kd.discriminator.model='espcn'; valid discriminators: "),
    ("denoise,kd.w_adv=0.1,data.crop=15",
     "config.kd.discriminator ('dcgan_discriminator') cannot judge the 8 x 8 windows of config.data.crop=15"),
    ("data.validation_fraction=1.0", "validation_fraction=1.0): validation_fraction=1.0 must be in [0, 1)"),
    ("data.train_pool=-1", "config.data.train_pool=-1 must be an integer >= 0 (0: fresh pairs every step)"),
    ("data.train_pool=100000000", "config.data.train_pool=100000000 would hold "),
    ("data.extra_validation=skimage", "config.data.extra_validation='skimage' must be '' (none) or a packaged photo "
                                      "source other than config.data.source='skimage': ['lfw', 'sklearn']"),
])
def test_bad_config_values_fail_before_compute(override, message):
    config = load_config(f"tiny,{override}")
    with pytest.raises(ValueError, match=re.escape(message)):
        train.check_config(config)


@pytest.mark.parametrize("field", ["scale", "extra_inputs"])
def test_scale_and_extra_inputs_come_from_the_degradation(field):
    config = load_config()
    config.student.kwargs[field] = 2
    with pytest.raises(ValueError, match=f"config.student.kwargs.{field}: leave it out; it is taken from "
                                         "config.data.channels and config.degradation"):
        train.check_config(config)


def test_model_that_cannot_upscale_and_unreadable_photo_folder(tmp_path):
    config = load_config()
    config.teacher.model = "unet"
    config.teacher.kwargs = type(config.teacher.kwargs)(dict(widths=(8, 16)))
    with pytest.raises(ValueError, match=r"config.teacher \(model 'unet'\) upscales by 1; "
                                         r"config.degradation.name='downsample' needs scale 2"):
        train.check_config(config)
    for name in ("a.png", "b.jpg"):
        (tmp_path / name).write_bytes(b"not an image")
    config = load_config(f"tiny,data.source=folder,data.folder='{tmp_path}'")
    with pytest.raises(ValueError, match=r"config.data \(source='folder'.*2 of 2 image files are unreadable: "
                                         r".*a\.png.*b\.jpg"):
        train.check_config(config)


def test_teacher_bundle_must_fit_the_data_and_degradation(uninterrupted):
    reference, _ = uninterrupted
    config = load_config()
    config.teacher.checkpoint = str(reference / "teacher" / "bundle")
    train.check_config(config)  # the tiny run's own teacher fits
    config.degradation.scale, config.data.crop = 4, 24
    with pytest.raises(ValueError, match=r"upscales by 2; config.degradation.name='downsample' needs scale 4"):
        train.check_config(config)
    config = load_config("tiny,data.channels=3")
    config.teacher.checkpoint = str(reference / "teacher" / "bundle")
    with pytest.raises(ValueError, match=r"maps 1 input channels to 1; the data and degradation need 3 to 3"):
        train.check_config(config)
    config = load_config()
    config.teacher.checkpoint = str(ROOT / "kdjax" / "pretrained" / "digits32" / "judge")
    with pytest.raises(ValueError, match=r"holds a 'resnet' \(classifier\); an image_to_image bundle"):
        train.check_config(config)


@pytest.mark.parametrize("variant,bundle,model_name,margin", [
    ("", "edsr_x2", "edsr", 0.5),
    ("inpaint", "unet_inpaint", "unet", 3.0),
    ("denoise", "unet_denoise", "unet", 5.0),
])
def test_a_shipped_teacher_fits_its_config_and_beats_the_plain_baseline(variant, bundle, model_name, margin):
    """Each config names its shipped bundle; on a held-out photograph's centre (coins, 96 x 96) the teacher's output
    is closer to the photograph than the plain baseline (bicubic upsampling, the masked image, the noisy image)
    by more than `margin` dB."""
    config = load_config(variant)
    assert pathlib.Path(config.teacher.checkpoint) == ROOT / "kdjax" / "pretrained" / "photos" / bundle
    train.check_config(config)
    model, variables, meta = bundles.load_model(config.teacher.checkpoint, "teacher")
    scale = config.degradation.get("scale", 1)
    assert meta["model"] == model_name and model.spec.scale == scale and model.spec.out_channels == 3
    _, _, test_photos = photos.split_photos(photos.load_photos("skimage", 3), config.data.test_fraction,
                                            config.data.validation_fraction)
    params = {k: v for k, v in config.degradation.items() if k != "name"}
    (pair,) = photos.eval_pairs(test_photos[:1], config.degradation.name, params, scale, 96)
    restored = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, pair["input"]))
    plain = restoration_kd.baseline(pair["input"], scale, 3)
    psnr = lambda out: restoration_metrics(out, pair["target"], shave=scale if scale > 1 else 0)["psnr"][0]
    assert psnr(restored) > psnr(plain) + margin, (psnr(restored), psnr(plain))
