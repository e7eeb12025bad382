"""GAN training on real data: the StyleGAN2 teacher (`configs/stylegan_teacher.py`) and the DCGAN
from-scratch baseline (`configs/dcgan_scratch.py`) use this task, `gan`.

One jitted data-parallel step alternates a generator update and a discriminator update:
- G: `losses.g_nonsaturating(D(G(z)))` (or `losses.g_hinge`);
- D: `losses.d_logistic(D(x), D(G(z)))` (or `losses.d_hinge`), plus the lazy R1 penalty every
  `r1_every` steps, weighted `r1_gamma / 2 * r1_every` (StyleGAN2's lazy regularisation);
- an exponential moving average of G's parameters, used for samples and the exported generator.
Latents and fake labels are drawn for the *global* batch from `fold_in(key, step)` outside the
per-device function, so results do not depend on the device count (StyleGAN2's noise inputs and
style-mixing draws are per device). The trained generator (EMA weights) is exported as a model bundle
in `workdir/generator/bundle`, ready to be named as a distillation teacher.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics as clu_metrics
from jax.sharding import Mesh, PartitionSpec as P

from kdjax import checkpoints, data, loop, losses, models, optim, parallel, summaries
from kdjax.models import stylegan2

DATA = parallel.DATA_AXIS

# How each model family names its data-shape fields, and what it needs in a data-parallel train step.
FAMILIES: dict[str, dict[str, Any]] = {
    "stylegan2_generator": dict(res="img_resolution", ch="img_channels", classes="c_dim", dp={"axis_name": DATA}),
    "dcgan_generator": dict(res="resolution", ch="img_channels", classes="num_classes", dp={"bn_axis_name": DATA}),
    "stylegan2_discriminator": dict(res="img_resolution", ch="img_channels", classes="c_dim", dp={}),
    "dcgan_discriminator": dict(res="resolution", ch="img_channels", classes="num_classes",
                                dp={"bn_axis_name": DATA}),
}
FAMILIES_DP_FIELDS = ("axis_name", "bn_axis_name")  # set to None when a model runs outside shard_map
GAN_LOSSES = ("logistic", "hinge")


@flax.struct.dataclass
class GANState:
    step: jax.Array  # int32 scalar; every random draw is fold_in(key, step)
    g_params: Any
    g_state: Any  # non-trainable collections of G (batch_stats / w_avg / noise_consts)
    g_opt: Any
    d_params: Any
    d_state: Any  # non-trainable collections of D ({} unless it uses BatchNorm)
    d_opt: Any
    g_ema: Any  # exponential moving average of g_params


def outside_data_parallel(model: nn.Module) -> nn.Module:
    """The same model with its data-parallel axis fields unset, to run outside shard_map (init, sampling)."""
    return model.clone(**{k: None for k in FAMILIES_DP_FIELDS if hasattr(model, k)})


def model_kwargs(block: ml_collections.ConfigDict, dataset_shape: tuple[int, int, int]) -> dict[str, Any]:
    """A model block's kwargs with the data's resolution, channels and classes filled in."""
    family = FAMILIES[block.model]
    res, ch, classes = dataset_shape
    return {**block.kwargs.to_dict(), family["res"]: res, family["ch"]: ch, family["classes"]: classes}


def check_gan_config(config: ml_collections.ConfigDict) -> None:
    """Validates a `gan` config before any compute (raises ValueError naming the field)."""
    from kdjax import train  # the shared phase checks

    data.check_data_config(config.data)
    for role, kind in (("generator", "_generator"), ("discriminator", "_discriminator")):
        block = config[role]
        valid = sorted(n for n in FAMILIES if n.endswith(kind))
        if block.model not in valid:
            raise ValueError(f"config.{role}.model={block.model!r}; valid {role}s: {valid}.")
        family = FAMILIES[block.model]
        for field in (family["res"], family["ch"], family["classes"]):
            if field in block.kwargs:
                raise ValueError(f"config.{role}.kwargs.{field}: leave it out; it is taken from the data.")
        models.check_model_kwargs(block.model, block.kwargs.to_dict(), where=f"config.{role}.kwargs")
    gan = config.gan
    if gan.loss not in GAN_LOSSES:
        raise ValueError(f"config.gan.loss={gan.loss!r}; valid: {list(GAN_LOSSES)}.")
    if gan.r1_gamma < 0 or gan.r1_every < 1:
        raise ValueError(f"config.gan.r1_gamma={gan.r1_gamma} must be >= 0 and r1_every={gan.r1_every} >= 1.")
    if not 0.0 <= gan.ema_decay < 1.0:
        raise ValueError(f"config.gan.ema_decay={gan.ema_decay} must be in [0, 1).")
    train.check_phase(gan.train, "config.gan.train")
    optim.check_optimizer_config(gan.d_optimizer, "config.gan.d_optimizer")


def apply_generator(model: nn.Module, params, g_state, z, labels, key, style_mixing_prob: float, train: bool):
    """G(z, labels) in train (state-updating) or eval mode; returns (images, new_g_state)."""
    rngs = {"noise": jax.random.fold_in(key, 0), "style_mix": jax.random.fold_in(key, 1)}
    variables = {"params": params, **g_state}
    if isinstance(model, stylegan2.Generator):
        kwargs = dict(update_w_avg=train, style_mixing_prob=style_mixing_prob if train else 0.0)
        mutable = ["w_avg"] if train else False
    else:
        kwargs, mutable = {}, (["batch_stats"] if train and "batch_stats" in g_state else False)
    out = model.apply(variables, z, labels, train=train, rngs=rngs, mutable=mutable, **kwargs)
    if mutable:
        images, updates = out
        return images, {**g_state, **updates}
    return out, g_state


def apply_discriminator(model: nn.Module, params, d_state, x, labels):
    """D(x, labels) -> (B,) logits (train mode; BatchNorm statistics, if any, are not carried)."""
    variables = {"params": params, **d_state}
    if d_state:
        return model.apply(variables, x, labels, train=True, mutable=list(d_state))[0]
    return model.apply(variables, x, labels, train=True)


def discriminator_update(d_apply: Callable, d_tx: optax.GradientTransformation, d_params, d_opt, d_state,
                         real: jax.Array, real_labels, fake: jax.Array, fake_labels, d_loss_of: Callable,
                         r1_weight: float) -> tuple[Any, Any, dict[str, jax.Array]]:
    """One discriminator update, per device: d_loss_of(D(real), D(fake)), plus `r1_weight * R1(real)` when
    r1_weight > 0 (lazy regularisation: the caller runs this variant every `r1_every` steps with
    `r1_weight = gamma / 2 * r1_every`, see `LazyRegularised`).

    Returns (new d_params, new d_opt, {"d_loss", "r1_term"} device-means, plus "d_real" and "d_fake",
    the mean logits).
    """
    def loss_fn(params):
        real_logits = d_apply(params, d_state, real, real_labels)
        fake_logits = d_apply(params, d_state, fake, fake_labels)
        loss = d_loss_of(real_logits, fake_logits)
        r1 = (r1_weight * losses.r1_penalty(lambda x: d_apply(params, d_state, x, real_labels), real)
              if r1_weight > 0 else jnp.zeros_like(loss))  # per-device (varying), like the loss
        aux = {"d_loss": loss, "r1_term": r1, "d_real": jnp.mean(real_logits), "d_fake": jnp.mean(fake_logits)}
        return jax.lax.pmean(loss + r1, DATA), aux

    grads, aux = jax.grad(loss_fn, has_aux=True)(d_params)
    updates, d_opt = d_tx.update(grads, d_opt, d_params)
    return optax.apply_updates(d_params, updates), d_opt, jax.lax.pmean(aux, DATA)


class LazyRegularised:
    """A train step with lazy R1: the jitted variant with the penalty runs on steps where
    `step % every == 0`, the plain one otherwise, chosen on the host.

    (A `lax.cond` between the two inside one jitted step was measured 2.7x slower on XLA:CPU on every step,
    R1 or not: 3.6 s against 1.34 s for the default distillation step at batch 64.) The step number is
    read from `state.step` once, then counted on the host while the caller passes back the state it got.
    """

    def __init__(self, with_r1: Callable, without_r1: Callable, every: int):
        self.with_r1, self.without_r1, self.every = with_r1, without_r1, every
        self._last, self._next = None, 0

    def __call__(self, state, *args):
        step = self._next if state is self._last else int(jax.device_get(state.step))
        fn = self.with_r1 if step % self.every == 0 else self.without_r1
        new_state, metrics = fn(state, *args)
        self._last, self._next = new_state, step + 1
        return new_state, metrics


def make_gan_step(generator: nn.Module, discriminator: nn.Module, g_tx: optax.GradientTransformation,
                  d_tx: optax.GradientTransformation, mesh: Mesh, gan: ml_collections.ConfigDict, z_dim: int,
                  num_classes: int, key: jax.Array) -> Callable:
    """The jitted data-parallel step `(state, batch) -> (state, metrics)`: one G update, one D update."""
    g_loss_fn_of = losses.g_hinge if gan.loss == "hinge" else losses.g_nonsaturating
    d_loss_fn_of = losses.d_hinge if gan.loss == "hinge" else losses.d_logistic
    r1_weight = gan.r1_gamma / 2 * gan.r1_every
    names = ["g_loss", "d_loss", "r1_term", "d_real", "d_fake"]
    Metrics = clu_metrics.Collection.create(**{n: clu_metrics.Average.from_output(n) for n in names})

    def per_device(state: GANState, batch: dict, z: jax.Array, fake_labels: jax.Array, r1: float):
        step_key = jax.random.fold_in(key, state.step)
        device_key = jax.random.fold_in(step_key, jax.lax.axis_index(DATA))
        labels = fake_labels if num_classes else None
        real_labels = batch["label"] if num_classes else None
        d = functools.partial(apply_discriminator, discriminator)

        def g_loss_fn(g_params):
            fake, new_g_state = apply_generator(generator, g_params, state.g_state, z, labels, device_key,
                                                 gan.style_mixing_prob, train=True)
            loss = g_loss_fn_of(d(state.d_params, state.d_state, fake, labels))
            return jax.lax.pmean(loss, DATA), (new_g_state, fake)

        (g_loss, (g_state, fake)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(state.g_params)
        g_updates, g_opt = g_tx.update(g_grads, state.g_opt, state.g_params)
        g_params = optax.apply_updates(state.g_params, g_updates)
        fake = jax.lax.stop_gradient(fake)

        d_params, d_opt, d_aux = discriminator_update(
            d, d_tx, state.d_params, state.d_opt, state.d_state, batch["image"], real_labels, fake, labels,
            d_loss_fn_of, r1)
        g_ema = jax.tree.map(lambda e, p: gan.ema_decay * e + (1.0 - gan.ema_decay) * p, state.g_ema, g_params)
        new_state = state.replace(step=state.step + 1, g_params=g_params, g_state=g_state, g_opt=g_opt,
                                  d_params=d_params, d_opt=d_opt, g_ema=g_ema)
        return new_state, {"g_loss": g_loss, **d_aux}

    def make(r1: float) -> Callable:
        sharded = jax.shard_map(functools.partial(per_device, r1=r1), mesh=mesh,
                                in_specs=(P(), P(DATA), P(DATA), P(DATA)), out_specs=(P(), P()))

        def step(state: GANState, batch: dict):
            draw_key = jax.random.fold_in(jax.random.fold_in(key, state.step), 2**20)  # global, device-count free
            global_batch = batch["image"].shape[0]
            z = jax.random.normal(jax.random.fold_in(draw_key, 0), (global_batch, z_dim))
            fake_labels = jax.random.randint(jax.random.fold_in(draw_key, 1), (global_batch,), 0,
                                             max(num_classes, 1))
            state, scalars = sharded(state, batch, z, fake_labels)
            return state, Metrics.single_from_model_output(**scalars)

        return jax.jit(step, donate_argnums=(0,))

    plain = make(0.0)
    return LazyRegularised(make(r1_weight), plain, gan.r1_every) if r1_weight > 0 else plain


def init_state(generator: nn.Module, discriminator: nn.Module, g_tx, d_tx, shape: tuple[int, int, int], z_dim: int,
               num_classes: int, key: jax.Array) -> GANState:
    """Initial state (on the host's default device), initialised outside any data-parallel context."""
    res, ch, _ = shape
    labels = jnp.zeros((4,), jnp.int32) if num_classes else None
    g_init, d_init = outside_data_parallel(generator), outside_data_parallel(discriminator)
    g_vars = dict(jax.jit(lambda k: g_init.init({"params": k, "noise": k}, jnp.zeros((4, z_dim)), labels))(
        jax.random.fold_in(key, 0)))
    d_vars = dict(jax.jit(lambda k: d_init.init(k, jnp.zeros((4, res, res, ch)), labels))(jax.random.fold_in(key, 1)))
    g_params, d_params = g_vars.pop("params"), d_vars.pop("params")
    return GANState(step=jnp.zeros((), jnp.int32), g_params=g_params, g_state=g_vars, g_opt=g_tx.init(g_params),
                    d_params=d_params, d_state=d_vars, d_opt=d_tx.init(d_params), g_ema=g_params)



def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, phase: str = "gan",
                       writer=None) -> dict[str, Any] | None:
    """Trains the GAN (checkpoints in `workdir/PHASE`); exports the EMA generator as `workdir/generator/bundle`
    (`workdir/PHASE/bundle` for another phase name, as the distillation job's scratch baseline uses);
    returns a summary, or None when the launch stopped early. `writer` defaults to one on `workdir`."""
    workdir = pathlib.Path(workdir)
    dtype = jnp.dtype(config.compute_dtype)
    mesh = parallel.make_mesh()
    dataset = data.load_dataset(config.data)
    shape = (dataset.resolution, dataset.channels, dataset.num_classes if config.gan.conditional else 0)
    num_classes = shape[2]
    g_kwargs, d_kwargs = model_kwargs(config.generator, shape), model_kwargs(config.discriminator, shape)
    generator = models.build_model(config.generator.model, **g_kwargs, **FAMILIES[config.generator.model]["dp"],
                                   dtype=dtype)
    discriminator = models.build_model(config.discriminator.model, **d_kwargs,
                                       **FAMILIES[config.discriminator.model]["dp"], dtype=dtype)
    z_dim = generator.z_dim
    train_cfg = config.gan.train
    g_tx = optim.make_optimizer(train_cfg.optimizer, train_cfg.num_steps)
    d_tx = optim.make_optimizer(config.gan.d_optimizer, train_cfg.num_steps)
    key = jax.random.key(config.seed)
    state = parallel.replicate(init_state(generator, discriminator, g_tx, d_tx, shape, z_dim, num_classes, key), mesh)
    step = make_gan_step(generator, discriminator, g_tx, d_tx, mesh, config.gan, z_dim, num_classes, key)
    writer = summaries.create_writer(workdir) if writer is None else writer
    eval_generator = outside_data_parallel(generator)
    sample_z = jax.random.normal(jax.random.fold_in(key, 7), (64, z_dim))
    sample_labels = jnp.arange(64) % num_classes if num_classes else None

    def write_samples(step_number: int, state: GANState) -> None:
        params, g_state = parallel.to_host((state.g_ema, state.g_state))
        images, _ = apply_generator(eval_generator, params, g_state, sample_z, sample_labels,
                                     jax.random.fold_in(key, 8), 0.0, train=False)
        name = f"samples/{'generator' if phase == 'gan' else phase}_ema"
        summaries.write_images(writer, workdir, step_number, {name: images}, columns=8)

    batches = data.TrainBatches(dataset.train, train_cfg.batch_size, seed=config.seed,
                                num_threads=config.data.num_threads)
    options = loop.LoopOptions(train_cfg.num_steps, config.log_every, config.checkpoint_every, config.max_to_keep,
                               config.async_checkpoints)
    state, finished = loop.run(phase, workdir, state, step, batches.iterate, mesh, options, writer,
                               loop.StepBudget(config.stop_after_steps), on_log=write_samples)
    if not finished:
        return None
    bundle = workdir / ("generator" if phase == "gan" else phase) / "bundle"
    checkpoints.save_model_bundle(bundle, config.generator.model, g_kwargs, {"params": state.g_ema, **state.g_state})
    writer.flush()
    return {"steps": int(parallel.to_host(state.step)), "generator_bundle": str(bundle)}
