"""The diffusion teacher's step and task (tiny): the step on 8 devices equals 1 and its first loss equals the loss
computed here by hand, the end-to-end run writes its bundle, previews and report (FID/KID against NFE with a judge),
a stopped and resumed run equals an uninterrupted one bitwise, and bad configs fail with one clear error."""

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models, train
from kdjax.core import optim, parallel
from kdjax.models import bundles
from kdjax.steps.diffusion import P_LOW, init_state, make_train_step, noise_draw
from kdjax.tasks.phase import model_from_block

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMING = ("images_per_s",)


def load_config(arg="tiny"):
    return train.load_config(f"{ROOT / 'configs' / 'diffusion_teacher.py'}:{arg}")


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    """A random 2-stage CNN judge of 8x8x1 images (the tiny data's size): it has learned nothing; it checks the
    FID/KID path, not quality."""
    model = models.build_model("cnn", num_classes=10, widths=(4, 8))
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((2, 8, 8, 1))))(jax.random.key(0, impl="rbg"))
    path = tmp_path_factory.mktemp("judge") / "judge"
    bundles.save_model_bundle(path, "cnn", dict(num_classes=10, widths=(4, 8)), variables,
                              extra={"input_shape": [8, 8, 1]})
    return str(path)


def judged_config(judge, arg="tiny"):
    config = load_config(arg)
    config.eval.judge = judge
    return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, judge):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, train.train_and_evaluate(judged_config(judge), workdir)


def without_timing(report):
    out = dict(report)
    out["sampling"] = [{k: v for k, v in row.items() if k not in TIMING} for row in report["sampling"]]
    return out


# ----------------------------------------------------------------------------------------- the step
def test_step_on_8_devices_equals_1_and_its_first_loss_is_edms(uninterrupted):
    """The tiny config's own step (plain SGD, so a gradient 8 times too large would show) on a batch of 16 from the
    same state: 8 devices give the 1-device parameters, EMA and metrics. At initialisation the output conv is 0,
    so D(x; sigma) = c_skip x and the first loss is computable here from the step's draws: mean_b lambda(sigma_b)
    mean((c_skip(sigma_b) x_b - y_b)^2), lambda and c_skip by their formulas, with the per-bucket losses."""
    config = load_config()
    model, _ = model_from_block(config.denoiser, (8, 1, 0), jnp.dtype(config.compute_dtype))
    tx = optim.make_optimizer(config.denoiser.train.optimizer, config.denoiser.train.num_steps)
    key = jax.random.key(config.seed)
    start = jax.tree.map(np.asarray, init_state(model, tx, jax.random.fold_in(key, 0)))  # as the task starts
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32), "label": np.zeros((16,), np.int32)}
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        step = make_train_step(model, tx, mesh, jax.random.fold_in(key, 1), p_mean=-1.2, p_std=1.2, ema_decay=0.999)
        state, metrics = step(parallel.replicate(start, mesh), parallel.global_batch(batch, mesh))
        results.append((parallel.to_host(state), {k: float(v) for k, v in metrics.compute().items()}))
    assert len(jax.devices()) == 8
    (one, m_one), (eight, m_eight) = results
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert m_one.keys() == m_eight.keys() and all(np.isclose(m_one[k], m_eight[k], rtol=1e-5) for k in m_one)
    assert int(one.step) == 1 and not np.array_equal(one.params["net"]["out"]["kernel"], 0)
    for p0, p1, ema in zip(jax.tree.leaves(start.params), jax.tree.leaves(one.params), jax.tree.leaves(one.ema)):
        np.testing.assert_allclose(ema, 0.999 * p0 + 0.001 * p1, rtol=1e-5, atol=1e-7)

    sigma, noise = (np.asarray(a, np.float64) for a in noise_draw(jax.random.fold_in(key, 1), (8, 8, 1), -1.2, 1.2)(
        jnp.int32(0), 16))
    y = batch["image"].astype(np.float64)
    c_skip, weight = 0.25 / (sigma**2 + 0.25), (sigma**2 + 0.25) / (0.5 * sigma) ** 2
    x = y + sigma[:, None, None, None] * noise
    per_example = weight * np.mean((c_skip[:, None, None, None] * x - y) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(m_one["loss"], per_example.mean(), rtol=1e-5)
    low, high = np.exp(-2.4), np.exp(0.0)
    for name, inside, p in (("loss_sigma_low", sigma < low, P_LOW), ("loss_sigma_high", sigma >= high, P_LOW),
                            ("loss_sigma_mid", (sigma >= low) & (sigma < high), 1 - 2 * P_LOW)):
        np.testing.assert_allclose(m_one[name], np.mean(per_example * inside) / p, rtol=1e-5)
    np.testing.assert_allclose(P_LOW, 0.15865525, rtol=1e-7)


# ----------------------------------------------------------------------------------------- the task
def test_tiny_run_writes_the_bundle_previews_and_report(uninterrupted):
    workdir, _ = uninterrupted
    saved = json.loads((workdir / "report.json").read_text())
    assert saved["steps"] == 6 and saved["params"] > 0 and saved["flops_per_evaluation"] > 0
    rows = {(r["method"], r["steps"]): r for r in saved["sampling"]}
    assert set(rows) == {("heun", 1), ("heun", 2), ("euler", 1), ("euler", 2)}
    for (method, steps), row in rows.items():
        assert row["nfe"] == (2 * steps - 1 if method == "heun" else steps)
        assert row["flops_per_image"] == row["nfe"] * saved["flops_per_evaluation"] and row["images_per_s"] > 0
        assert np.isfinite(row["fid"]) and np.isfinite(row["kid_mean"]) and 0 <= row["precision"] <= 1
    # One Heun step is one Euler step: the same samples, so the same figures.
    assert rows[("heun", 1)]["fid"] == rows[("euler", 1)]["fid"]
    assert rows[("heun", 2)]["fid"] != rows[("euler", 2)]["fid"]
    text = (workdir / "report.md").read_text()
    assert "| heun | 2 | 3 |" in text and "FID/KID against 1797 real images" in text
    assert (workdir / "samples.png").is_file() and (workdir / "fid_vs_nfe.png").is_file()
    assert sorted(p.name for p in (workdir / "images").iterdir()) == [
        "samples_heun_2_000003.png", "samples_heun_2_000006.png"]
    meta = bundles.check_model_bundle(workdir / "denoiser" / "bundle", "bundle", kind="denoiser")
    assert meta["model"] == "edm_unet" and meta["kwargs"]["resolution"] == 8 and meta["kwargs"]["num_classes"] == 0
    module, variables, _ = bundles.load_model(workdir / "denoiser" / "bundle")
    assert module.spec == models.DenoiserSpec(8, 1, 0, 0.5) and set(variables) == {"params"}


def test_stop_and_resume_equals_uninterrupted_bitwise(uninterrupted, judge, tmp_path):
    reference, report = uninterrupted
    config = judged_config(judge)
    config.stop_after_steps = 4
    assert train.train_and_evaluate(config, tmp_path) is None
    assert not (tmp_path / "denoiser" / "bundle").exists()
    resumed = train.train_and_evaluate(judged_config(judge), tmp_path)
    for a, b in zip(jax.tree.leaves(bundles.load_model_bundle(reference / "denoiser" / "bundle")[1]),
                    jax.tree.leaves(bundles.load_model_bundle(tmp_path / "denoiser" / "bundle")[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert without_timing(resumed) | {"bundle": ""} == without_timing(report) | {"bundle": ""}


@pytest.mark.parametrize("override,message", [
    ("denoiser.model=unet",
     "config.denoiser.model='unet'; valid denoisers: ['edm_dhariwalunet', 'edm_songunet', 'edm_unet', 'mlp_denoiser']"),
    ("denoiser.kwargs.widths=(8,16),denoiser.kwargs.attention_resolutions=(3,)",
     "config.denoiser.kwargs: attention_resolutions=(3,): each must be one of the U-Net's resolutions [8, 4]"),
    ("data.resolution=6,denoiser.kwargs.widths=(8,16,16)",
     "config.denoiser.kwargs: resolution=6 must be a positive multiple of 2^(levels - 1) = 4"),
    ("denoiser.kwargs.dropout=1.5", "config.denoiser.kwargs: dropout=1.5 must be in [0, 1)"),
    ("denoiser.train.batch_size=12", "config.denoiser.train.batch_size=12 must be a positive multiple of the device"),
    ("diffusion.p_std=0.0", "config.diffusion.p_std=0.0 must be > 0"),
    ("diffusion.ema_decay=1.0", "config.diffusion.ema_decay=1.0 must be in [0, 1)"),
    ("sampler.methods=('heun','rk4')",
     "config.sampler.methods=('heun', 'rk4') must name distinct samplers among ['heun', 'euler', 'ddim']"),
    ("sampler.steps=(4,2)", "config.sampler.steps=(4, 2) must be increasing integers >= 1"),
    ("sampler.sigma_min=0.0",
     "config.sampler.sigma_min=0.0 and sigma_max=80.0 must satisfy 0 < sigma_min < sigma_max"),
    ("sampler.preview_steps=0", "config.sampler.preview_steps=0 must be >= 1"),
    ("eval.num_samples=0", "config.eval.num_samples=0 must be >= 1"),
    ("data.source=tfds,data.name=mnist,data.label_key='',conditional=True",
     "config.conditional=True needs labels; config.data.label_key is '' (unlabelled data)"),
])
def test_bad_config_values_fail_before_compute(override, message):
    config = load_config(f"tiny,{override}")
    with pytest.raises(ValueError, match=re.escape(message)):
        train.check_config(config)


def test_data_fields_are_taken_from_the_data():
    config = load_config()
    config.denoiser.kwargs.resolution = 16
    with pytest.raises(ValueError, match=re.escape("config.denoiser.kwargs.resolution: leave it out; it is taken from "
                                                   "the data (config.data; classes: config.conditional)")):
        train.check_config(config)


def test_timed_batches_concatenates_in_order_and_logs_progress(monkeypatch):
    """4 batches of 3 for 10 images: the outputs in batch order, cut to 10; with a description every batch after
    the first is logged (log_every_s=0) with its count, the last as 10/10 with ETA 0. The log calls are recorded
    where the module makes them, so the test does not depend on the logging levels and handlers that earlier
    tests in the same process leave behind (capturing through the root logger missed them in one CI run)."""
    from kdjax.tasks import diffusion_teacher

    calls, logged = [], []
    monkeypatch.setattr(diffusion_teacher.logging, "info", lambda msg, *args: logged.append(msg % args))
    run = lambda b: calls.append(b) or np.full((3, 1), b)
    out, rate = diffusion_teacher.timed_batches(run, 10, 3, desc="toy", log_every_s=0.0)
    assert calls == [0, 1, 2, 3] and out[:, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3] and rate > 0
    lines = [line for line in logged if line.startswith("sampling toy")]
    assert [line.split(",")[0] for line in lines] == ["sampling toy: 6/10 images", "sampling toy: 9/10 images",
                                                      "sampling toy: 10/10 images"]
    assert lines[-1].endswith("ETA 0 s")
