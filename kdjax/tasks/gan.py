"""Task `gan`: a GAN trained on real data. The StyleGAN2 teacher (`configs/stylegan_teacher.py`), the DCGAN
from-scratch baseline (`configs/dcgan_scratch.py`) and the main job's scratch phase use it.

The step is `kdjax.steps.gan` (one G and one D update, lazy R1, G EMA). The trained generator (EMA weights)
is exported as a model bundle in `workdir/generator/bundle`, ready to be named as a distillation teacher.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from kdjax import losses, models
from kdjax.core import data, optim, parallel, summaries
from kdjax.models import bundles
from kdjax.steps import loop
from kdjax.steps.gan import GANState, apply_generator, init_state, make_gan_step
from kdjax.tasks import checks
from kdjax.tasks.phase import model_from_block, run_phase


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates a `gan` config before any compute (raises ValueError naming the field)."""
    data.check_data_config(config.data)
    checks.check_model_block(config.generator, "config.generator", "generator")
    checks.check_model_block(config.discriminator, "config.discriminator", "discriminator")
    gan = config.gan
    if gan.loss not in losses.ADVERSARIAL:
        raise ValueError(f"config.gan.loss={gan.loss!r}; valid: {list(losses.ADVERSARIAL)}.")
    if gan.r1_gamma < 0 or gan.r1_every < 1:
        raise ValueError(f"config.gan.r1_gamma={gan.r1_gamma} must be >= 0 and r1_every={gan.r1_every} >= 1.")
    checks.check_fraction(gan.ema_decay, "config.gan.ema_decay", closed_high=False)
    checks.check_phase(gan.train, "config.gan.train")
    optim.check_optimizer_config(gan.d_optimizer, "config.gan.d_optimizer")
    if gan.g_warmup_steps < 0:
        raise ValueError(f"config.gan.g_warmup_steps={gan.g_warmup_steps} must be >= 0.")
    if gan.init_generator:
        meta = bundles.check_model_bundle(gan.init_generator, "config.gan.init_generator", kind="generator")
        want = {**config.generator.kwargs.to_dict(),
                **models.data_kwargs(config.generator.model, config.data.resolution, config.data.channels, 0)}
        classes_field = models.model_class(config.generator.model).DATA_FIELDS["num_classes"]
        differ = sorted(k for k, v in want.items() if k != classes_field and meta["kwargs"].get(k) != v)
        if meta["model"] != config.generator.model or differ:
            raise ValueError(f"config.gan.init_generator={gan.init_generator!r} holds a {meta['model']!r} with "
                             f"{ {k: meta['kwargs'].get(k) for k in differ} }; config.generator is a "
                             f"{config.generator.model!r} with { {k: want[k] for k in differ} }.")


def warm_start(state: GANState, bundle: str) -> GANState:
    """G and its EMA (and G's collections: w_avg, noise constants) from a generator bundle; D as initialised."""
    _, variables, _ = bundles.load_model(bundle, "config.gan.init_generator")
    variables = dict(variables)
    params = variables.pop("params")
    missing = set(state.g_state) - set(variables)
    if missing:
        raise ValueError(f"config.gan.init_generator={bundle!r} lacks the collections {sorted(missing)}.")
    return state.replace(g_params=params, g_ema=params, g_state={k: variables[k] for k in state.g_state})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, phase: str = "gan",
                       writer=None, probe: Callable[[int, Any, Any], None] | None = None) -> dict[str, Any] | None:
    """Trains the GAN (checkpoints in `workdir/PHASE`); exports the EMA generator as `workdir/generator/bundle`
    (`workdir/PHASE/bundle` for another phase name, as the distillation job's scratch baseline uses);
    returns a summary, or None when the launch stopped early. `writer` defaults to one on `workdir`; `probe`,
    if given, is called at every log step with (step, generator, EMA variables), e.g. a learning curve."""
    workdir = pathlib.Path(workdir)
    dtype = jnp.dtype(config.compute_dtype)
    mesh = parallel.make_mesh()
    dataset = data.load_dataset(config.data)
    shape = (dataset.resolution, dataset.channels, dataset.num_classes if config.gan.conditional else 0)
    num_classes = shape[2]
    generator, g_kwargs = model_from_block(config.generator, shape, dtype)
    discriminator, _ = model_from_block(config.discriminator, shape, dtype)
    z_dim = generator.spec.z_dim
    train_cfg = config.gan.train
    g_tx = optim.make_optimizer(train_cfg.optimizer, train_cfg.num_steps)
    if config.gan.g_warmup_steps > 0:  # D-only steps first: G's updates scaled by 0
        g_tx = optax.chain(g_tx, optax.scale_by_schedule(lambda n: (n >= config.gan.g_warmup_steps).astype(jnp.float32)))
    d_tx = optim.make_optimizer(config.gan.d_optimizer, train_cfg.num_steps)
    key = jax.random.key(config.seed)
    state = init_state(generator, discriminator, g_tx, d_tx, shape, z_dim, num_classes, key)
    if config.gan.init_generator:
        state = warm_start(state, config.gan.init_generator)
    state = parallel.replicate(state, mesh)
    step = make_gan_step(generator, discriminator, g_tx, d_tx, mesh, config.gan, z_dim, num_classes, key)
    writer = summaries.create_writer(workdir) if writer is None else writer
    eval_generator = models.outside_data_parallel(generator)
    sample_z = jax.random.normal(jax.random.fold_in(key, 7), (64, z_dim))
    sample_labels = jnp.arange(64) % num_classes if num_classes else None

    def write_samples(step_number: int, state: GANState) -> None:
        params, g_state = parallel.to_host((state.g_ema, state.g_state))
        images, _ = apply_generator(eval_generator, params, g_state, sample_z, sample_labels,
                                     jax.random.fold_in(key, 8), 0.0, train=False)
        name = f"samples/{'generator' if phase == 'gan' else phase}_ema"
        summaries.write_images(writer, workdir, step_number, {name: images}, columns=8)
        if probe is not None:
            probe(step_number, eval_generator, {"params": params, **g_state})

    state, finished = run_phase(phase, config, workdir, state, step, dataset.train, train_cfg, mesh, writer,
                                loop.StepBudget(config.stop_after_steps), on_log=write_samples)
    if not finished:
        return None
    bundle = workdir / ("generator" if phase == "gan" else phase) / "bundle"
    bundles.save_model_bundle(bundle, config.generator.model, g_kwargs, {"params": state.g_ema, **state.g_state})
    writer.flush()
    return {"steps": int(parallel.to_host(state.step)), "generator_bundle": str(bundle)}
