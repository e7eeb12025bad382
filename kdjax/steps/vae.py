"""The VAE teacher's train step and the tiny autoencoders' distillation step, both data-parallel.

The VAE (`make_vae_step`), per batch x of images in [-1, 1]:

    loss = R(D(z), x) + beta * KL(N(mu(x), sigma(x)^2) || N(0, I)),   z = mu(x) + sigma(x) * eps,  eps ~ N(0, I)

R = `losses.l1` or `losses.l2` (`RECONSTRUCTION`, by config name), KL = `losses.gaussian_kl` (per latent
dimension). eps is drawn for the whole global batch from fold_in(fold_in(key, step), DRAW_SALT) by the step
shell (`eps_draw`) and then sharded, so a run's numbers do not depend on the device count and a resumed run
draws the same eps.

The tiny halves (`make_distill_step`, `objective`: one place for the whole objective). T is the frozen VAE
teacher: its variables are a constant argument of the step, never in the optimizer or the checkpoints; sg =
stop_gradient; z = sg(mu_T(x)), the teacher encoder's posterior mean of the real crop x (`teacher_latent`):

    tiny decoder D_s:  loss = w_teacher * L1(D_s(z), sg(D_T(z))) + w_target * L1(D_s(z), x)
                              + w_perceptual * P(J(D_s(z)), sg(J(D_T(z)))) + w_adv * g(D(W(D_s(z))))
    tiny encoder E_s:  loss = MSE(E_s(x), sg(mu_T(x)))

with each term a function below (`decoder_teacher_term`, `decoder_target_term`, `decoder_perceptual_term`,
`restoration.adversarial_term`, `encoder_term`); the perceptual and adversarial terms are TAESD's, optional:
- P = `losses.perceptual` (LPIPS's baseline distance without learned weights) between the feature maps of a
  frozen judge J (a classifier bundle, e.g. the digits judge; its variables are the step's second constant) of the
  tiny decoder's image and the teacher decoder's. kdjax has no feature network for photographs (nothing can be
  downloaded here; LPIPS's VGG included), so this term is for data a judge exists for;
- the adversarial term is the image-to-image step's (`kdjax.steps.restoration.Adversary`): a discriminator D on
  the central window W of the tiny decoder's image, g its generator loss; D is updated in the same step, after
  the decoder, on real crops x against sg(D_s(z)), its state in `state.model_state["discriminator"]`.
The scratch baseline is the same decoder step with w_teacher = 0, w_target = 1 and no other term (the teacher's
encoder still gives z; its decoder is then not run).

Every gradient is that of `lax.pmean(loss, DATA_AXIS)` (`kdjax.steps.shell`), never a pmean of the gradients
of a per-device loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh

from kdjax import losses
from kdjax.core.parallel import DATA_AXIS
from kdjax.steps.restoration import Adversary, adversarial_term, adversary_update
from kdjax.steps.shell import DRAW_SALT, Draw, data_parallel_step
from kdjax.steps.state import TrainState

RECONSTRUCTION: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {"l1": losses.l1, "l2": losses.l2}
ROLES = ("decoder", "encoder")
VAE_METRICS = ("loss", "reconstruction", "kl")


# ----------------------------------------------------------------------------------------- the VAE
def eps_draw(key: jax.Array, latent_shape: tuple[int, int, int]) -> Draw:
    """The VAE step's draw: eps ~ N(0, I) of shape (B, *latent_shape) for the global batch, from the step's
    draw key fold_in(fold_in(key, step), DRAW_SALT)."""
    def draw(step: jax.Array, batch_size: int) -> tuple[jax.Array]:
        draw_key = jax.random.fold_in(jax.random.fold_in(key, step), DRAW_SALT)
        return (jax.random.normal(draw_key, (batch_size, *latent_shape)),)

    return draw


def vae_objective(model: nn.Module, params: Any, x: jax.Array, eps: jax.Array, beta: float,
                  recon: str) -> tuple[jax.Array, dict[str, jax.Array]]:
    """R(D(mu + sigma * eps), x) + beta * KL (module docstring) and its terms {"reconstruction", "kl"}."""
    out = model.apply({"params": params}, x, train=True, eps=eps)
    rec = RECONSTRUCTION[recon](out["reconstruction"], x)
    kl = losses.gaussian_kl(out["mean"], out["logvar"])
    return rec + beta * kl, {"reconstruction": rec, "kl": kl}


def make_vae_step(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, beta: float, recon: str,
                  key: jax.Array, latent_shape: tuple[int, int, int]) -> Callable:
    """The jitted data-parallel step `(state, batch) -> (state, metrics)` of the VAE; `batch` = {"image"},
    `latent_shape` = (h, w, latent_channels) of the training images' latents, `key` the eps draws' key."""
    def per_device(state: TrainState, batch: dict, eps: jax.Array):
        def loss_fn(params):
            loss, terms = vae_objective(model, params, batch["image"], eps, beta, recon)
            return jax.lax.pmean(loss, DATA_AXIS), terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state)
        return new_state, {"loss": loss, **jax.lax.pmean(terms, DATA_AXIS)}

    return data_parallel_step(per_device, mesh, VAE_METRICS, draw=eps_draw(key, latent_shape))


# ----------------------------------------------------------------------------------------- the tiny halves
@dataclasses.dataclass(frozen=True)
class TinyDistillation:
    """What a tiny half learns (module docstring): `role` "decoder" (weights w_teacher, w_target, w_perceptual
    with the frozen classifier `judge`, and the optional `adversary`) or "encoder" (the latent MSE alone), from the
    frozen latent-autoencoder `teacher`."""

    teacher: nn.Module
    role: str = "decoder"
    w_teacher: float = 1.0
    w_target: float = 0.0
    w_perceptual: float = 0.0
    judge: nn.Module | None = None
    adversary: Adversary | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r}; valid: {list(ROLES)}.")
        if self.w_perceptual > 0 and self.judge is None:
            raise ValueError(f"w_perceptual={self.w_perceptual} needs a judge (a classifier) for its features.")
        if self.role == "encoder" and (self.w_perceptual > 0 or self.adversary is not None):
            raise ValueError("the tiny encoder learns the latent MSE alone: no perceptual or adversarial term.")


def teacher_latent(teacher: nn.Module, variables: Any, x: jax.Array) -> jax.Array:
    """z = sg(mu_T(x)): the teacher encoder's posterior mean of the images x, a constant."""
    mean, _ = teacher.apply(variables, x, method=type(teacher).encode)
    return jax.lax.stop_gradient(mean)


def teacher_decoding(teacher: nn.Module, variables: Any, z: jax.Array) -> jax.Array:
    """sg(D_T(z)): the teacher decoder's image of the latent z, a constant."""
    return jax.lax.stop_gradient(teacher.apply(variables, z, method=type(teacher).decode))


def decoder_teacher_term(decoded: jax.Array, teacher_decoded: jax.Array) -> jax.Array:
    """L1(D_s(z), sg(D_T(z))) = mean |D_s(z) - D_T(z)| over pixels and channels: the tiny decoder copies the
    teacher decoder's image of the same latent."""
    return losses.l1(decoded, jax.lax.stop_gradient(teacher_decoded))


def decoder_target_term(decoded: jax.Array, x: jax.Array) -> jax.Array:
    """L1(D_s(z), x) = mean |D_s(z) - x|: the tiny decoder's image of z = mu_T(x) against the real crop x."""
    return losses.l1(decoded, x)


def decoder_perceptual_term(judge: nn.Module, judge_variables: Any, decoded: jax.Array,
                            teacher_decoded: jax.Array) -> jax.Array:
    """P(J(D_s(z)), sg(J(D_T(z)))): `losses.perceptual` between the judge's feature maps (its "pool" vector left
    out, as the GAN distillation's perceptual term does) of the tiny decoder's image and the teacher decoder's."""
    maps = lambda images: {k: v for k, v in judge.apply(judge_variables, images, train=False,
                                                        return_features=True)[1].items() if k != "pool"}
    return losses.perceptual(maps(decoded), jax.lax.stop_gradient(maps(teacher_decoded)))


def encoder_term(latent: jax.Array, teacher_mean: jax.Array) -> jax.Array:
    """MSE(E_s(x), sg(mu_T(x))) = mean (E_s(x) - mu_T(x))^2 over latent positions and channels."""
    return losses.l2(latent, jax.lax.stop_gradient(teacher_mean))


def objective(student: nn.Module, params: Any, x: jax.Array, kd: TinyDistillation, teacher_variables: Any,
              judge_variables: Any = None, d_params: Any = None
              ) -> tuple[jax.Array, tuple[dict[str, jax.Array], jax.Array | None]]:
    """The per-device loss of a tiny half (module docstring) and (its terms, the decoded images or None): terms
    {"latent_mse"} for the encoder; {"l1_target"[, "l1_teacher" when w_teacher > 0][, "perceptual" when
    w_perceptual > 0][, "adv" with an adversary]} for the decoder."""
    z = teacher_latent(kd.teacher, teacher_variables, x)
    if kd.role == "encoder":
        mse = encoder_term(student.apply({"params": params}, x, train=True), z)
        return mse, ({"latent_mse": mse}, None)
    decoded = student.apply({"params": params}, z, train=True)
    terms = {"l1_target": decoder_target_term(decoded, x)}
    loss = kd.w_target * terms["l1_target"]
    if kd.w_teacher > 0 or kd.w_perceptual > 0:
        teacher_decoded = teacher_decoding(kd.teacher, teacher_variables, z)
    if kd.w_teacher > 0:
        terms["l1_teacher"] = decoder_teacher_term(decoded, teacher_decoded)
        loss = loss + kd.w_teacher * terms["l1_teacher"]
    if kd.w_perceptual > 0:
        terms["perceptual"] = decoder_perceptual_term(kd.judge, judge_variables, decoded, teacher_decoded)
        loss = loss + kd.w_perceptual * terms["perceptual"]
    if kd.adversary is not None:
        terms["adv"] = adversarial_term(kd.adversary, d_params, decoded)
        loss = loss + kd.adversary.weight * terms["adv"]
    return loss, (terms, decoded)


def metric_names(kd: TinyDistillation) -> list[str]:
    """The distillation step's metrics: loss and the terms `objective` returns; with an adversary also the
    discriminator's d_loss, d_real, d_fake (mean logits)."""
    if kd.role == "encoder":
        return ["loss", "latent_mse"]
    return (["loss", "l1_target"] + (["l1_teacher"] if kd.w_teacher > 0 else [])
            + (["perceptual"] if kd.w_perceptual > 0 else [])
            + (["adv", "d_loss", "d_real", "d_fake"] if kd.adversary is not None else []))


def make_distill_step(student: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                      kd: TinyDistillation) -> Callable:
    """The jitted data-parallel step `(state, batch, teacher_variables[, judge_variables]) -> (state, metrics)` of
    a tiny half; `state.params` are the student's, `batch` = {"image"}; with a perceptual term the judge's
    variables are the second constant; with an adversary `state.model_state["discriminator"]` = {"params",
    "opt_state"} (`restoration.init_discriminator`)."""
    adversary = kd.adversary

    def per_device(state: TrainState, batch: dict, teacher_variables: Any, judge_variables: Any = None):
        d = state.model_state.get("discriminator")

        def loss_fn(params):
            loss, aux = objective(student, params, batch["image"], kd, teacher_variables, judge_variables,
                                  None if d is None else d["params"])
            return jax.lax.pmean(loss, DATA_AXIS), aux

        (loss, (terms, decoded)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        metrics = {"loss": loss, **jax.lax.pmean(terms, DATA_AXIS)}
        model_state = state.model_state
        if adversary is not None:  # D's update, after the decoder's: real = the crops, fake = sg(D_s(z))
            discriminator, d_metrics = adversary_update(adversary, d, batch["image"], decoded)
            model_state = {**model_state, "discriminator": discriminator}
            metrics.update(d_metrics)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state, model_state=model_state)
        return new_state, metrics

    return data_parallel_step(per_device, mesh, metric_names(kd))
