"""One-step distribution-matching distillation (DMD: Yin et al. 2023, "One-step Diffusion with Distribution
Matching Distillation"; DMD2: Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image
Synthesis") of a diffusion denoiser teacher, data-parallel and data-free.

A generator G_theta maps latents z ~ N(0, I) (B, z_dim) to images x = G_theta(z) (B, H, W, C) in one step. Its
distribution p_fake is matched to the teacher's p_real by descending the reverse KL divergence, whose gradient
(DMD, eq. 7) at noise level sigma is

    grad_theta KL(p_fake,sigma || p_real,sigma) = - E_{z, n} [ (s_real(x_t; sigma) - s_fake(x_t; sigma)) dG/dtheta ],
    x_t = x + sigma n,   n ~ N(0, I),

with the scores s(x_t; sigma) = (D(x_t; sigma) - x_t) / sigma^2 given by denoisers (Tweedie): D_real = the frozen
teacher, D_fake = a second denoiser trained online to be the denoiser of the generator's current distribution. So
the generator moves along s_real - s_fake = (D_real - D_fake) / sigma^2, i.e. against the *distribution-matching
direction* (`dmd_direction`)

    g_b = w_b (D_fake(x_t,b; sigma_b) - D_real(x_t,b; sigma_b)),   w_b = 1 / max(mean_pixels |x_b - D_real(x_t,b;
    sigma_b)|, eps),

per example b, everything in it under stop-gradient. w is DMD's normaliser (their weighting_factor, in place of
the 1 / sigma^2 and the time weighting): the inverse of the teacher's mean absolute denoising error on this
sample, which puts every noise level on the same scale. eps = `WEIGHT_EPS` only guards a zero error (DMD's
code takes nan_to_num of 0 / 0 instead). The generator minimises the surrogate (`generator_surrogate`)

    L_G = 0.5 ||x - sg(x - g)||^2 / (B H W C)   (value 0.5 mean g^2),   dL_G / dx = g / (B H W C),

DMD2's form: back-propagated through x = G_theta(z), its gradient is mean_b g_b dG(z_b)/dtheta / (H W C), the
reverse-KL gradient with each example scaled by the positive factor w_b sigma_b^2. The noise level is drawn per
example uniformly on EDM's rho = 7 schedule between sigma_min and sigma_max (`dmd_sigma`): sigma = (sigma_max^(1/rho)
+ u (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, u ~ U[0, 1] (DMD and DMD2 draw the timestep uniformly from [0.02
T, 0.98 T] of the teacher's discrete schedule; sigma_min and sigma_max play that range here).

The fake denoiser D_fake (an EDM-preconditioned denoiser network, `mlp_denoiser` or `edm_unet`) is trained with
EDM's denoising loss on generator samples (`fake_denoiser_loss`), like the teacher's own training step
(`kdjax.steps.diffusion`):

    L_fake = mean_b lambda(sigma_b) ||D_fake(x_b + sigma_b n_b; sigma_b) - x_b||^2 / (H W C),   x_b = sg(G(z_b)),
    ln sigma ~ N(P_mean, P_std^2) (EDM: -1.2, 1.2),   lambda(sigma) = (sigma^2 + s_d^2) / (sigma s_d)^2,

minimised by the denoiser of the generator's distribution, D_fake(x; sigma) = E[x_gen | x_gen + sigma n = x]
(`losses.edm_loss`). (DMD trains it at the generator gradient's timesteps; here at EDM's training levels, as the
teacher was trained.) DMD2's two-time-scale update rule: each step first updates D_fake `fake_updates_per_step`
times (each on fresh latents, with the current generator), then G once, against the updated D_fake.

A generator with BatchNorm (e.g. the DCGAN generator) runs in training mode, on batch statistics, in every pass;
its running averages (`batch_stats`, the state's `generator_state`) move with the generator's own pass once per
step (the fake updates' passes leave them as they are), and are what it samples with outside training. Build such
a generator with its statistics reduced over DATA_AXIS (`models.data_parallel_kwargs`), so that a step does not
depend on the device count. Other mutable collections are refused.

The optional GAN term (DMD2, section 4.3; `GANTerm`), on real images y of the batch: a realism classifier C made
of D_fake's encoder and a small head on its middle map (`models.edm.RealismHead`), on images noised at levels
drawn like the generator's (`dmd_sigma`, DMD2's "diffusion GAN" up to the largest level):

    C(v; sigma) = head(mid-features of D_fake(v + sigma n; sigma)),                          (`realism_logits`)
    L_fake += w_cls * [mean softplus(-C(y; sigma')) + mean softplus(C(sg(G(z)); sigma''))]  (`losses.d_logistic`)
    L_G    += w_gan * mean softplus(-C(G(z); sigma'''))                                  (`losses.g_nonsaturating`)

so each fake update trains the head and D_fake's weights on both terms, and the generator update back-propagates
the realism term through C (frozen for it) into G. DMD2's weights: w_cls = 1e-2, w_gan = 3e-3. Every fake update of
a step sees the step's one batch of real images (DMD2 draws a new one per update).

Not built here: DMD's regression loss on teacher-sampled (noise, image) pairs (DMD2 drops it). The generator has no
EMA.

Without the GAN term the step is data-free: `batch` only carries the global batch size (`latent_batch`); with it,
`batch["image"]` holds the real images (B, H, W, C) in [-1, 1] (and `batch["label"]` their labels when
conditional). All the step's random numbers (for each fake update: z, labels, sigma, n; for the generator: z,
labels, sigma, n; with the GAN term the classifier's levels and noise) are drawn for the global batch from
fold_in(fold_in(key, step), DRAW_SALT) (`kdjax.steps.shell`), so a run does not depend on the device count and a
resumed run draws the same numbers; dropout, if a network has it, draws from fold_in(fold_in(fold_in(key, step),
device index), i), i numbering the step's network calls. Every gradient is that of a `lax.pmean(loss, DATA_AXIS)`
(the shard_map gradient trap). Labels (conditional generators) are drawn uniformly and given to the generator, the
teacher and D_fake.

Metrics: `generator_loss` (L_G's distribution-matching value, 0.5 mean g^2) and `fake_loss` (the EDM loss of
D_fake, averaged over the step's updates); with the GAN term also `gan_generator` (mean softplus(-C(G(z)))) and
`gan_classifier` (the classifier's loss, averaged over the updates).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from kdjax import losses
from kdjax.core.parallel import DATA_AXIS
from kdjax.steps.progressive import Teacher, expand
from kdjax.steps.shell import DRAW_SALT, Draw, data_parallel_step

METRICS = ("generator_loss", "fake_loss")
GAN_METRICS = ("gan_generator", "gan_classifier")
WEIGHT_EPS = 1e-8  # the smallest mean |x - D_real| the normaliser divides by


@flax.struct.dataclass
class DMDState:
    step: jax.Array  # int32 scalar; every random draw is fold_in(key, step)
    generator: Any  # G_theta's parameters
    generator_opt: Any
    fake: Any  # D_fake's parameters: the denoiser of the generator's distribution, trained online
    fake_opt: Any
    generator_state: Any = flax.struct.field(default_factory=dict)  # G's {"batch_stats": ...}, or {}
    head: Any = flax.struct.field(default_factory=dict)  # the GAN term's realism head's parameters, or {}
    head_opt: Any = flax.struct.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class GANTerm:
    """DMD2's optional GAN term (module docstring): the realism head on D_fake's middle map, the weight w_gan of
    the generator's term and w_cls of the classifier's (trained with D_fake, by its optimizer)."""

    head: nn.Module  # e.g. `models.edm.RealismHead()`: D_fake's feature `feature` -> logits (B,)
    generator_weight: float = 3e-3
    classifier_weight: float = 1e-2
    feature: str = "mid"  # which of D_fake's features the head reads (EDMUNet's middle map)


def init_state(generator_params: Any, fake_params: Any, tx_g: optax.GradientTransformation,
               tx_fake: optax.GradientTransformation, generator_state: Any = None, head_params: Any = None
               ) -> DMDState:
    """The initial state from the generator's and the fake denoiser's initial parameters (copied: the state is
    donated to the step), the generator's initial batch statistics ({"batch_stats": ...}) if it has them, and the
    GAN term's head parameters (`init_head`) if it has one (optimised by `tx_fake`, as DMD2 optimises its head with
    the fake denoiser). DMD starts D_fake from the teacher's parameters when they share a network."""
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    generator_params, fake_params, head_params = copy(generator_params), copy(fake_params), copy(head_params or {})
    return DMDState(step=jnp.zeros((), jnp.int32), generator=generator_params,
                    generator_opt=tx_g.init(generator_params), fake=fake_params, fake_opt=tx_fake.init(fake_params),
                    generator_state=copy(dict(generator_state or {})), head=head_params,
                    head_opt=tx_fake.init(head_params) if head_params else {})


def init_head(gan: GANTerm, fake: nn.Module, fake_params: Any, key: jax.Array) -> Any:
    """The realism head's initial parameters, shaped by D_fake's middle map (found by `jax.eval_shape`)."""
    spec = fake.spec
    x = jnp.zeros((1, spec.resolution, spec.resolution, spec.channels))
    labels = jnp.zeros((1,), jnp.int32) if spec.num_classes else None
    _, features = jax.eval_shape(lambda p: fake.apply({"params": p}, x, jnp.ones((1,)), labels,
                                                      return_features=True), fake_params)
    if gan.feature not in features:
        raise ValueError(f"the fake denoiser has no feature {gan.feature!r} for the GAN term's head; it has "
                         f"{sorted(features)}.")
    return gan.head.init(key, jnp.zeros(features[gan.feature].shape, jnp.float32))["params"]


def latent_batch(batch_size: int) -> dict[str, np.ndarray]:
    """The data-free step's batch: only its leading dimension, the global batch size, is read."""
    return {"image": np.zeros((batch_size, 1), np.float32)}


def dmd_sigma(u: jax.Array, sigma_min: float, sigma_max: float, rho: float = 7.0) -> jax.Array:
    """The noise level of u in [0, 1] on EDM's schedule: (sigma_max^(1/rho) + u (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho; u ~ U[0, 1] gives the distribution the generator's gradient is taken at."""
    high, low = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (high + jnp.asarray(u, jnp.float32) * (low - high)) ** rho


def dmd_weight(x: jax.Array, denoised_real: jax.Array) -> jax.Array:
    """DMD's normaliser per example, (B,): w_b = 1 / max(mean over pixels and channels of |x_b - D_real(x_t,b;
    sigma_b)|, WEIGHT_EPS), for x (B, H, W, C) the clean generated samples and D_real the teacher's denoising of
    their noised x_t."""
    error = jnp.abs(x.astype(jnp.float32) - denoised_real.astype(jnp.float32))
    return 1.0 / jnp.maximum(jnp.mean(error.reshape(error.shape[0], -1), axis=-1), WEIGHT_EPS)


def dmd_direction(x: jax.Array, denoised_real: jax.Array, denoised_fake: jax.Array, normalise: bool = True
                  ) -> jax.Array:
    """The distribution-matching direction (module docstring), (B, H, W, C), under stop-gradient:

        g_b = w_b (D_fake(x_t,b; sigma_b) - D_real(x_t,b; sigma_b))   (w_b = `dmd_weight`, or 1 without `normalise`),

    = w_b sigma_b^2 (s_fake - s_real)(x_t,b): the generator moves x along -g, from the fake score towards the real.
    It is 0 where the two denoisers agree, i.e. when the generator's distribution is the teacher's."""
    diff = denoised_fake.astype(jnp.float32) - denoised_real.astype(jnp.float32)
    if normalise:
        diff = expand(dmd_weight(x, denoised_real)) * diff
    return jax.lax.stop_gradient(diff)


def generator_surrogate(x: jax.Array, direction: jax.Array) -> jax.Array:
    """DMD2's generator loss L_G = 0.5 ||x - sg(x - g)||^2 / (B H W C), a scalar whose value is 0.5 mean g^2 and
    whose gradient with respect to x is g / (B H W C) (up to the float rounding of x - (x - g))."""
    x = x.astype(jnp.float32)
    target = jax.lax.stop_gradient(x - direction)
    return 0.5 * jnp.mean(jnp.square(x - target))


def realism_logits(denoise_features: Callable[[jax.Array, jax.Array], dict[str, jax.Array]],
                   head: Callable[[jax.Array], jax.Array], images: jax.Array, sigma: jax.Array, noise: jax.Array,
                   feature: str = "mid") -> jax.Array:
    """C(v; sigma) = head(features(v + sigma n; sigma)[feature]), (B,): the GAN term's realism logits of images v
    (B, H, W, C) noised at levels sigma (B,) with n = `noise`, `denoise_features(x, sigma)` being D_fake's features."""
    return head(denoise_features(images.astype(jnp.float32) + expand(sigma) * noise, sigma)[feature])


def fake_denoiser_loss(denoise: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, sigma: jax.Array,
                       noise: jax.Array, sigma_data: float) -> jax.Array:
    """L_fake (module docstring) on generated samples x (B, H, W, C) (under stop-gradient), at noise levels sigma
    (B,) with n = `noise`: EDM's loss of `denoise(x + sigma n, sigma)` against x (`losses.edm_loss`)."""
    x = jax.lax.stop_gradient(x.astype(jnp.float32))
    return losses.edm_loss(denoise(x + expand(sigma) * noise, sigma), x, sigma, sigma_data)


def dmd_draw(key: jax.Array, z_dim: int, num_classes: int, image_shape: tuple[int, int, int], fake_updates: int,
             sigma_min: float, sigma_max: float, rho: float, p_mean: float, p_std: float, gan: bool = False) -> Draw:
    """The step's global draws, batch first, as one dict, from fold_in(fold_in(key, step), DRAW_SALT): for the K =
    `fake_updates` fake updates "fake_z" (B, K, z_dim), "fake_labels" (B, K), "fake_sigma" (B, K) log-normal and
    "fake_noise" (B, K, H, W, C); for the generator "z" (B, z_dim), "labels" (B,), "sigma" (B,) (`dmd_sigma`) and
    "noise" (B, H, W, C). With `gan`, the realism classifier's levels (`dmd_sigma`) and noise: "real_sigma",
    "real_noise" and "cls_sigma", "cls_noise" (B, K[, H, W, C]) for the updates' real and generated images,
    "gan_sigma", "gan_noise" (B[, H, W, C]) for the generator's term. Labels are uniform in [0, num_classes) (zeros
    when unconditional)."""
    def draw(step: jax.Array, batch_size: int) -> tuple[dict[str, jax.Array]]:
        draw_key = jax.random.fold_in(jax.random.fold_in(key, step), DRAW_SALT)
        part = lambda i: jax.random.fold_in(draw_key, i)
        classes = max(num_classes, 1)
        b, k = batch_size, fake_updates
        level = lambda i, shape: dmd_sigma(jax.random.uniform(part(i), shape), sigma_min, sigma_max, rho)
        out = {"fake_z": jax.random.normal(part(0), (b, k, z_dim)),
               "fake_labels": jax.random.randint(part(1), (b, k), 0, classes),
               "fake_sigma": jnp.exp(p_mean + p_std * jax.random.normal(part(2), (b, k))),
               "fake_noise": jax.random.normal(part(3), (b, k, *image_shape)),
               "z": jax.random.normal(part(4), (b, z_dim)),
               "labels": jax.random.randint(part(5), (b,), 0, classes),
               "sigma": level(6, (b,)),
               "noise": jax.random.normal(part(7), (b, *image_shape))}
        if gan:
            out.update(real_sigma=level(8, (b, k)), real_noise=jax.random.normal(part(9), (b, k, *image_shape)),
                       cls_sigma=level(10, (b, k)), cls_noise=jax.random.normal(part(11), (b, k, *image_shape)),
                       gan_sigma=level(12, (b,)), gan_noise=jax.random.normal(part(13), (b, *image_shape)))
        return (out,)

    return draw


def check_networks(generator: nn.Module, fake: nn.Module) -> None:
    """Raises ValueError unless the generator's images (by `jax.eval_shape`, no compute) have the fake denoiser's
    (and so the teacher's) image shape, the two have the same classes, D_fake is EDM-preconditioned and the
    generator carries no mutable collections but BatchNorm statistics."""
    g_spec, f_spec = generator.spec, fake.spec
    image_shape = (f_spec.resolution, f_spec.resolution, f_spec.channels)
    if getattr(fake, "parameterisation", "edm") != "edm":
        raise ValueError("the fake denoiser must be a denoiser with EDM preconditioning, got parameterisation="
                         f"{fake.parameterisation!r}.")
    if g_spec.num_classes != f_spec.num_classes:
        raise ValueError(f"the generator has num_classes={g_spec.num_classes} but the fake denoiser (and the "
                         f"teacher) {f_spec.num_classes}.")
    z = jax.ShapeDtypeStruct((2, g_spec.z_dim), jnp.float32)
    labels = jax.ShapeDtypeStruct((2,), jnp.int32) if g_spec.num_classes else None
    images, variables = jax.eval_shape(lambda k, z, y: generator.init_with_output(k, z, y), jax.random.key(0), z,
                                       labels)
    if tuple(images.shape[1:]) != image_shape:
        raise ValueError(f"the generator makes images of shape {tuple(images.shape[1:])} but the fake denoiser (and "
                         f"the teacher) works on {image_shape}.")
    if set(variables) - {"params", "batch_stats"}:
        raise ValueError(f"the generator has mutable collections {sorted(set(variables) - {'params'})}; the "
                         "distribution-matching step carries only its parameters and BatchNorm statistics "
                         "('batch_stats').")


def make_dmd_step(generator: nn.Module, fake: nn.Module, teacher: Teacher, tx_g: optax.GradientTransformation,
                  tx_fake: optax.GradientTransformation, mesh: Mesh, key: jax.Array, *, sigma_min: float = 0.002,
                  sigma_max: float = 80.0, rho: float = 7.0, fake_updates_per_step: int = 5,
                  fake_p_mean: float = -1.2, fake_p_std: float = 1.2, gan: GANTerm | None = None) -> Callable:
    """The jitted data-parallel step `(state, batch, teacher_variables) -> (state, metrics)` (module docstring).

    Args:
      generator: the one-step generator, `apply(variables, z, labels, train=...)` -> (B, H, W, C) (a generator-kind
        model such as `mlp_generator.MLPGenerator`, `edm.OneStepGenerator` or the DCGAN generator), without mutable
        collections but BatchNorm statistics (reduced over DATA_AXIS: module docstring).
      fake: D_fake, an EDM-preconditioned denoiser with the teacher's image shape and classes (`mlp_denoiser`,
        `edm_unet`); its initial parameters are the state's (the teacher's, when it has the same network). With the
        GAN term it must return features (`return_features=True`, a "mid" map).
      teacher: the frozen D_real (`progressive.network_teacher(model)`, or a `GaussianMixture` wrapped as
        `lambda v, x, s, l: mixture(x, s, l)`).
      tx_g, tx_fake: the two optimizers (DMD2 uses Adam with the same learning rate for both); tx_fake also
        optimises the GAN term's head.
      key: the run's key; every draw from fold_in(fold_in(key, step), DRAW_SALT).
      sigma_min, sigma_max, rho: the range and schedule of the generator gradient's noise levels (`dmd_sigma`).
      fake_updates_per_step: D_fake updates before each generator update (DMD2's two-time-scale rule: 5).
      fake_p_mean, fake_p_std: the log-normal noise levels of D_fake's training (EDM's).
      gan: DMD2's GAN term (`GANTerm`; the state from `init_state(..., head_params=init_head(...))`), or None.
    `batch`: `latent_batch(B)` without the GAN term; real images {"image": (B, H, W, C)[, "label": (B,)]} with it.
    """
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min={sigma_min} and sigma_max={sigma_max} must satisfy 0 < sigma_min < sigma_max.")
    if not rho > 0:
        raise ValueError(f"rho={rho} must be > 0.")
    if not isinstance(fake_updates_per_step, (int, np.integer)) or fake_updates_per_step < 1:
        raise ValueError(f"fake_updates_per_step={fake_updates_per_step} must be an integer >= 1.")
    if not fake_p_std > 0:
        raise ValueError(f"fake_p_std={fake_p_std} must be > 0.")
    if gan is not None and not (gan.generator_weight >= 0 and gan.classifier_weight >= 0):
        raise ValueError(f"the GAN term's weights must be >= 0, got generator_weight={gan.generator_weight} and "
                         f"classifier_weight={gan.classifier_weight}.")
    check_networks(generator, fake)
    spec, sigma_data = generator.spec, fake.spec.sigma_data
    image_shape = (spec.resolution, spec.resolution, spec.channels)
    conditional = spec.num_classes > 0

    def per_device(state: DMDState, batch: dict, d: dict[str, jax.Array], teacher_variables: Any):
        device_key = jax.random.fold_in(jax.random.fold_in(key, state.step), jax.lax.axis_index(DATA_AXIS))
        keys = lambda i: {"dropout": jax.random.fold_in(device_key, i)}
        label = lambda y: y if conditional else None
        mutable = list(state.generator_state)  # ["batch_stats"] or []
        real_labels = label(batch.get("label")) if gan is not None else None

        def generate(params, z, labels, i):  # (x, updated batch statistics): training mode, batch statistics
            variables = {"params": params, **state.generator_state}
            if not mutable:
                return generator.apply(variables, z, label(labels), train=True, rngs=keys(i)), {}
            x, updated = generator.apply(variables, z, label(labels), train=True, rngs=keys(i), mutable=mutable)
            return x, dict(updated)

        def realism(params, head_params, images, labels, sigma, noise, i):  # C(images; sigma), (B,)
            features = lambda v, s: fake.apply({"params": params}, v, s, labels, train=True, rngs=keys(i),
                                               return_features=True)[1]
            return realism_logits(features, lambda h: gan.head.apply({"params": head_params}, h), images, sigma,
                                  noise, gan.feature)

        def fake_update(params, head_params, opt_state, head_opt, i):  # one D_fake (and head) update
            at = lambda name: d[name][:, i]  # this update's draws
            x, _ = generate(state.generator, at("fake_z"), at("fake_labels"), 3 * i)

            def loss_fn(params, head_params):
                denoise = lambda v, s: fake.apply({"params": params}, v, s, label(at("fake_labels")), train=True,
                                                  rngs=keys(3 * i + 1))
                fake_loss = fake_denoiser_loss(denoise, x, at("fake_sigma"), at("fake_noise"), sigma_data)
                if gan is None:
                    return jax.lax.pmean(fake_loss, DATA_AXIS), (fake_loss, 0.0)
                real_logits = realism(params, head_params, batch["image"], real_labels, at("real_sigma"),
                                      at("real_noise"), 3 * i + 2)
                fake_logits = realism(params, head_params, jax.lax.stop_gradient(x), label(at("fake_labels")),
                                      at("cls_sigma"), at("cls_noise"), 3 * i + 2)
                classifier_loss = losses.d_logistic(real_logits, fake_logits)
                total = fake_loss + gan.classifier_weight * classifier_loss
                return jax.lax.pmean(total, DATA_AXIS), (fake_loss, classifier_loss)

            (_, (fake_loss, classifier_loss)), (grads, head_grads) = jax.value_and_grad(
                loss_fn, argnums=(0, 1), has_aux=True)(params, head_params)
            updates, opt_state = tx_fake.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            if gan is not None:
                updates, head_opt = tx_fake.update(head_grads, head_opt, head_params)
                head_params = optax.apply_updates(head_params, updates)
            return params, head_params, opt_state, head_opt, jax.lax.pmean((fake_loss, classifier_loss), DATA_AXIS)

        # A Python loop, not lax.scan: XLA:CPU lowers the weight-gradient convolutions inside a while loop's body
        # to its slow generic loop emitter (a 10x slower step on this CPU); K is small, so unrolling costs little.
        fake_params, head_params, fake_opt, head_opt = state.fake, state.head, state.fake_opt, state.head_opt
        fake_losses, classifier_losses = [], []
        for i in range(fake_updates_per_step):
            fake_params, head_params, fake_opt, head_opt, (loss, c_loss) = fake_update(
                fake_params, head_params, fake_opt, head_opt, i)
            fake_losses.append(loss)
            classifier_losses.append(c_loss)

        def generator_loss(params):
            i = 3 * fake_updates_per_step
            x, updated = generate(params, d["z"], d["labels"], i)
            x_t = jax.lax.stop_gradient(x) + expand(d["sigma"]) * d["noise"]
            real = teacher(teacher_variables, x_t, d["sigma"], label(d["labels"]))
            fake_denoised = fake.apply({"params": fake_params}, x_t, d["sigma"], label(d["labels"]))
            direction = dmd_direction(jax.lax.stop_gradient(x), real, fake_denoised)
            dm_loss = generator_surrogate(x, direction)
            if gan is None:
                return jax.lax.pmean(dm_loss, DATA_AXIS), (updated, dm_loss, 0.0)
            gan_loss = losses.g_nonsaturating(realism(fake_params, head_params, x, label(d["labels"]),
                                                      d["gan_sigma"], d["gan_noise"], i + 1))
            return jax.lax.pmean(dm_loss + gan.generator_weight * gan_loss, DATA_AXIS), (updated, dm_loss, gan_loss)

        (_, (g_state, dm_loss, gan_loss)), grads = jax.value_and_grad(generator_loss, has_aux=True)(state.generator)
        updates, g_opt = tx_g.update(grads, state.generator_opt, state.generator)
        g_params = optax.apply_updates(state.generator, updates)
        new_state = state.replace(step=state.step + 1, generator=g_params, generator_opt=g_opt, fake=fake_params,
                                  fake_opt=fake_opt, generator_state=g_state, head=head_params, head_opt=head_opt)
        metrics = {"generator_loss": jax.lax.pmean(dm_loss, DATA_AXIS), "fake_loss": jnp.mean(jnp.stack(fake_losses))}
        if gan is not None:
            metrics.update(gan_generator=jax.lax.pmean(gan_loss, DATA_AXIS),
                           gan_classifier=jnp.mean(jnp.stack(classifier_losses)))
        return new_state, metrics

    draw = dmd_draw(key, spec.z_dim, spec.num_classes, image_shape, fake_updates_per_step, sigma_min, sigma_max, rho,
                    fake_p_mean, fake_p_std, gan=gan is not None)
    return data_parallel_step(per_device, mesh, METRICS + (GAN_METRICS if gan is not None else ()), draw)
