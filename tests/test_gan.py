"""The `gan` task: 8 devices equal 1 (SGD, including a lazy-R1 step), exact resume, the StyleGAN2
teacher run exports a bundle that loads as a teacher."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kdjax import train
from kdjax.config import optimizer_config
from kdjax.core import data, optim, parallel
from kdjax.importers import stylegan2 as stylegan2_import
from kdjax.models import bundles as checkpoints
from kdjax.steps import gan
from kdjax.tasks.phase import model_from_block

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_config(name, arg="tiny"):
    return train.load_config(f"{ROOT / 'configs' / name}.py:{arg}")


def _gan_steps(devices, num_steps=3):
    config = load_config("dcgan_scratch")
    config.gan.train.optimizer = optimizer_config("sgd", 0.05)
    config.gan.d_optimizer = optimizer_config("sgd", 0.05)
    config.gan.r1_every, config.gan.r1_gamma = 2, 1.0  # steps 0 and 2 carry the R1 term
    shape = (16, 1, 0)
    mk = lambda block: model_from_block(block, shape, jnp.float32)[0]
    g, d = mk(config.generator), mk(config.discriminator)
    g_tx = optim.make_optimizer(config.gan.train.optimizer, 10)
    d_tx = optim.make_optimizer(config.gan.d_optimizer, 10)
    key = jax.random.key(0)
    mesh = parallel.make_mesh(devices)
    state = parallel.replicate(gan.init_state(g, d, g_tx, d_tx, shape, g.z_dim, 0, key), mesh)
    step = gan.make_gan_step(g, d, g_tx, d_tx, mesh, config.gan, g.z_dim, 0, key)
    dataset = data.load_dataset(config.data)
    batches = data.TrainBatches(dataset.train, 16, seed=0, process_index=0, process_count=1)
    for s in range(num_steps):
        state, metrics = step(state, parallel.global_batch(batches.batch(s), mesh))
    return parallel.to_host(state), {k: float(v) for k, v in metrics.compute().items()}


def test_gan_step_on_eight_devices_equals_one_device_with_sgd():
    state8, m8 = _gan_steps(jax.devices())
    state1, m1 = _gan_steps(jax.devices()[:1])
    for tree in ("g_params", "d_params", "g_ema", "g_state"):
        for a, b in zip(jax.tree.leaves(getattr(state8, tree)), jax.tree.leaves(getattr(state1, tree))):
            np.testing.assert_allclose(a, b, rtol=5e-5, atol=5e-6)
    assert m8["r1_term"] > 0 and m8["r1_term"] == pytest.approx(m1["r1_term"], rel=1e-4)
    assert m8["d_loss"] == pytest.approx(m1["d_loss"], rel=1e-5)


def test_dcgan_scratch_resumes_exactly(tmp_path):
    reference = train.train_and_evaluate(load_config("dcgan_scratch"), tmp_path / "a")
    config = load_config("dcgan_scratch")
    config.stop_after_steps = 7
    assert train.train_and_evaluate(config, tmp_path / "b") is None
    assert train.train_and_evaluate(load_config("dcgan_scratch"), tmp_path / "b")["steps"] == reference["steps"] == 12
    a = jax.tree.leaves(checkpoints.load_model_bundle(tmp_path / "a" / "generator" / "bundle")[1])
    b = jax.tree.leaves(checkpoints.load_model_bundle(tmp_path / "b" / "generator" / "bundle")[1])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert len(list((tmp_path / "a" / "images").glob("samples_generator_ema_*.png"))) == 2


def test_stylegan_teacher_run_exports_a_loadable_teacher(tmp_path):
    config = load_config("stylegan_teacher")
    train.train_and_evaluate(config, tmp_path)
    generator, variables = stylegan2_import.load_teacher(tmp_path / "generator" / "bundle")
    assert generator.img_resolution == 16 and generator.img_channels == 1
    w_avg = jax.tree.leaves(variables["w_avg"])[0]
    assert np.abs(np.asarray(w_avg)).sum() > 0  # tracked during training (it starts at zero)
    images = generator.apply(variables, jnp.ones((2, generator.z_dim)), noise_mode="const")
    assert images.shape == (2, 16, 16, 1) and np.isfinite(np.asarray(images)).all()


def test_warm_start_from_a_bundle_with_generator_warmup(tmp_path):
    """init_generator starts G and its EMA from a bundle; during g_warmup_steps only D moves."""
    train.train_and_evaluate(load_config("dcgan_scratch"), tmp_path / "a")
    bundle = tmp_path / "a" / "generator" / "bundle"
    config = load_config("dcgan_scratch")
    config.gan.init_generator, config.gan.g_warmup_steps = str(bundle), 4
    config.gan.train.num_steps = 4
    train.train_and_evaluate(config, tmp_path / "b")
    start = checkpoints.load_model_bundle(bundle)[1]
    state = ocp.StandardCheckpointer().restore(tmp_path / "b" / "gan" / "checkpoints" / "4" / "default")
    for x, y in zip(jax.tree.leaves(start["params"]), jax.tree.leaves(state["g_params"])):
        np.testing.assert_array_equal(x, y)  # G frozen for the 4 warm-up steps
    after = checkpoints.load_model_bundle(tmp_path / "b" / "generator" / "bundle")[1]
    for x, y in zip(jax.tree.leaves(start["params"]), jax.tree.leaves(after["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=0)  # its EMA too, up to the EMA's own rounding
    config.gan.train.num_steps = 6  # the same run continued: G moves once the warm-up is over
    train.train_and_evaluate(config, tmp_path / "b")
    moved = ocp.StandardCheckpointer().restore(tmp_path / "b" / "gan" / "checkpoints" / "6" / "default")
    assert max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(start["params"]),
                                                            jax.tree.leaves(moved["g_params"]))) > 1e-4
    config.generator.kwargs.width = 4
    with pytest.raises(ValueError, match="config.gan.init_generator=.* holds a 'dcgan_generator' with {'width': 8}"):
        train.check_config(config)


def test_gan_config_errors():
    config = load_config("dcgan_scratch")
    config.generator.model = "dcgan_discriminator"
    with pytest.raises(ValueError, match="valid generators: \\['dcgan_generator', 'edm_one_step', 'stylegan2_generator'\\]"):
        train.check_config(config)
    config = load_config("dcgan_scratch")
    config.generator.kwargs.resolution = 64
    with pytest.raises(ValueError, match="kwargs.resolution: leave it out"):
        train.check_config(config)
    config = load_config("dcgan_scratch")
    config.gan.loss = "wasserstein"
    with pytest.raises(ValueError, match="valid: \\['logistic', 'hinge'\\]"):
        train.check_config(config)
