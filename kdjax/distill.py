"""The generator-distillation step: every term of the objective, in one place.

For latents z (and classes y when the teacher is conditional), the frozen teacher gives x_T = G_T(z, y)
with its block features f_T, the student x_S = G_S(z or w, y) with features f_S, and the frozen judge j
gives logits and feature maps of both. The student (with its 1x1 feature adapters A) minimises

    sum_k  weight_k(step) * term_k

over the terms (each a function in `kdjax.losses`; weight 0 turns a term off, and each weight may
decay linearly, as TinyGAN's pixel weight does):
- `kl`:         T^2 * KL(softmax(j(x_T)/T) || softmax(j(x_S)/T)); with classes,
                alpha * CE(j(x_S), y) + (1 - alpha) * that (classic KD on generated images);
- `recon_l1`:   mean |x_S - x_T|;    `recon_l2`: mean (x_S - x_T)^2;
- `perceptual`: distance between channel-normalised judge feature maps of x_S and x_T;
- `feature`:    mean squared error between A(f_S) and f_T at the resolutions both generators share;
- `adv`:        non-saturating (or hinge) generator loss against a discriminator D.
D is trained in the same step on teacher images as real (optionally real data too) and student images
as fake, with the lazy R1 penalty on its real inputs. The teacher and judge are arguments, never in
the state: no gradients, not in the optimizer, not in checkpoints.

Options: `reuse_mapping` feeds the student the teacher's w = mapping(z) (MobileStyleGAN, StyleKD)
instead of z; `truncation_psi` truncates the teacher's targets.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics as clu_metrics
from jax.sharding import Mesh, PartitionSpec as P

from kdjax import gan as gan_lib
from kdjax import evaluate, losses, parallel
from kdjax.models import stylegan2

DATA = parallel.DATA_AXIS
TERMS = ("kl", "recon_l1", "recon_l2", "perceptual", "feature", "adv")


class FeatureAdapters(nn.Module):
    """Learned 1x1 convolutions mapping each student feature map to the teacher's channel count."""

    teacher_channels: Mapping[str, int]  # feature name -> teacher channels, for the shared names

    @nn.compact
    def __call__(self, student_feats: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        return {name: nn.Conv(c, (1, 1), name=f"adapter_{name}")(student_feats[name].astype(jnp.float32))
                for name, c in sorted(self.teacher_channels.items())}


@flax.struct.dataclass
class DistillState:
    step: jax.Array  # int32 scalar; every random draw is fold_in(key, step)
    student: Any  # {"student": student params, "adapters": adapter params}: what the student optimizer updates
    student_state: Any  # the student's non-trainable collections (batch_stats)
    s_opt: Any
    d_params: Any
    d_state: Any
    d_opt: Any
    student_ema: Any  # EMA of the student's params, used for evaluation


def weight(cfg: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """A term's weight at `step`: `value`, or linear from `value` to `end_value` over [start_step, end_step]."""
    if cfg.end_step <= 0:
        return jnp.asarray(cfg.value, jnp.float32)
    return losses.linear_schedule(step, cfg.value, cfg.end_value, cfg.start_step, cfg.end_step)


class DistillationTargets(nn.Module):
    """The frozen teacher as the student is taught to copy it: a StyleGAN2 teacher with its constant noise
    inputs and truncation `truncation_psi`; any other generator family (a DCGAN teacher) in eval mode, where
    truncation must be 1 (`distill_job.check_config`). A generator module itself, so the report evaluates
    exactly these images as "the teacher" and as the students' fidelity reference. Its variables are the
    teacher's one level down (`targets_variables`)."""

    teacher: nn.Module
    truncation_psi: float = 1.0

    # The generator interface `evaluate.generator_spec` reads: the teacher's.
    @property
    def z_dim(self) -> int:
        return self.teacher.z_dim

    @property
    def num_classes(self) -> int:
        return evaluate.generator_spec(self.teacher)["num_classes"]

    @property
    def resolution(self) -> int:
        return evaluate.generator_spec(self.teacher)["resolution"]

    @property
    def img_channels(self) -> int:
        return self.teacher.img_channels

    def __call__(self, z, labels=None, *, train: bool = False, return_features: bool = False):
        del train  # the teacher is frozen: always eval mode
        if isinstance(self.teacher, stylegan2.Generator):
            return self.teacher(z, labels, noise_mode="const", truncation_psi=self.truncation_psi,
                                return_features=return_features)
        return self.teacher(z, labels, train=False, return_features=return_features)


def targets_variables(teacher_vars: Mapping[str, Any]) -> dict[str, Any]:
    """The variables of `DistillationTargets` from the teacher's."""
    return {collection: {"teacher": v} for collection, v in teacher_vars.items()}


def teacher_images(teacher: nn.Module, teacher_vars: Any, z: jax.Array, labels: jax.Array | None,
                   truncation_psi: float = 1.0, return_features: bool = False):
    """The distillation targets (`DistillationTargets`) for latents z: images, and with `return_features`
    the teacher's block features."""
    return DistillationTargets(teacher, truncation_psi).apply(targets_variables(teacher_vars), z, labels,
                                                              return_features=return_features)


def make_distill_step(teacher: nn.Module, student: nn.Module, judge: nn.Module, discriminator: nn.Module,
                      adapters: FeatureAdapters, s_tx: optax.GradientTransformation,
                      d_tx: optax.GradientTransformation, mesh: Mesh, cfg: ml_collections.ConfigDict,
                      num_classes: int, key: jax.Array) -> Callable:
    """The jitted data-parallel step `(state, batch, teacher_vars, judge_vars) -> (state, metrics)`.

    `cfg` is `config.distill`: `weights.TERM.{value, end_value, start_step, end_step}`, `temperature`,
    `alpha`, `reuse_mapping`, `truncation_psi`, `adv_loss`, `d_real_data`, `r1_gamma`, `r1_every`,
    `ema_decay`. `batch` holds real images (used by D only when `d_real_data`).
    """
    g_adv = losses.g_hinge if cfg.adv_loss == "hinge" else losses.g_nonsaturating
    d_adv = losses.d_hinge if cfg.adv_loss == "hinge" else losses.d_logistic
    active = [t for t in TERMS if cfg.weights[t].value > 0 or cfg.weights[t].end_value > 0]
    use_d = "adv" in active
    r1_weight = cfg.r1_gamma / 2 * cfg.r1_every
    names = ["loss", *active] + (["d_loss", "r1_term"] if use_d else [])
    Metrics = clu_metrics.Collection.create(**{n: clu_metrics.Average.from_output(n) for n in names})
    d_apply = functools.partial(gan_lib.apply_discriminator, discriminator)

    def per_device(state: DistillState, batch: dict, z: jax.Array, labels: jax.Array, teacher_vars, judge_vars,
                   r1: float):
        step = state.step
        y = labels if num_classes else None
        # The frozen teacher: targets and (optionally) the w the student consumes. No gradient flows here.
        x_t, f_t = teacher_images(teacher, teacher_vars, z, y, cfg.truncation_psi, return_features=True)
        student_in = (teacher.apply(teacher_vars, z, y, method=teacher.mapping, truncation_psi=cfg.truncation_psi)[:, 0]
                      if cfg.reuse_mapping else z)
        x_t, f_t, student_in = jax.lax.stop_gradient((x_t, f_t, student_in))
        j_t, jf_t = judge.apply(judge_vars, x_t, train=False, return_features=True)
        jf_t = {k: v for k, v in jf_t.items() if k != "pool"}

        def student_loss(trainable):
            (x_s, f_s), new_state = student.apply({"params": trainable["student"], **state.student_state},
                                                  student_in, y, train=True, return_features=True,
                                                  mutable=list(state.student_state))
            terms = {}
            if "kl" in active or "perceptual" in active:
                j_s, jf_s = judge.apply(judge_vars, x_s, train=False, return_features=True)
                if "kl" in active:
                    terms["kl"] = (losses.classic_kd(j_s, j_t, labels, cfg.alpha, cfg.temperature)[0] if num_classes
                                   else losses.distillation_kl(j_t, j_s, cfg.temperature))
                if "perceptual" in active:
                    terms["perceptual"] = losses.perceptual({k: v for k, v in jf_s.items() if k != "pool"}, jf_t)
            if "recon_l1" in active:
                terms["recon_l1"] = losses.l1(x_s, x_t)
            if "recon_l2" in active:
                terms["recon_l2"] = losses.l2(x_s, x_t)
            if "feature" in active:
                mapped = adapters.apply({"params": trainable["adapters"]}, f_s)
                terms["feature"] = losses.feature_matching(mapped, {k: f_t[k] for k in mapped})
            if "adv" in active:
                terms["adv"] = g_adv(d_apply(state.d_params, state.d_state, x_s, y))
            total = sum(weight(cfg.weights[t], step) * terms[t] for t in active)
            return jax.lax.pmean(total, DATA), (terms, new_state, x_s)

        (loss, (terms, student_state, x_s)), grads = jax.value_and_grad(student_loss, has_aux=True)(state.student)
        updates, s_opt = s_tx.update(grads, state.s_opt, state.student)
        trainable = optax.apply_updates(state.student, updates)
        ema = jax.tree.map(lambda e, p: cfg.ema_decay * e + (1 - cfg.ema_decay) * p, state.student_ema,
                           trainable["student"])
        new = state.replace(step=step + 1, student=trainable, student_state=student_state, s_opt=s_opt, student_ema=ema)
        scalars = {"loss": loss, **jax.lax.pmean(terms, DATA)}
        if use_d:  # D: teacher images (and optionally real data) are real, student images fake.
            x_s = jax.lax.stop_gradient(x_s)
            real = jnp.concatenate([x_t, batch["image"]]) if cfg.d_real_data else x_t
            real_y = (jnp.concatenate([y, batch["label"]]) if cfg.d_real_data else y) if num_classes else None

            d_params, d_opt, d_aux = gan_lib.discriminator_update(
                d_apply, d_tx, state.d_params, state.d_opt, state.d_state, real, real_y, x_s, y, d_adv, r1)
            new = new.replace(d_params=d_params, d_opt=d_opt)
            scalars.update({k: d_aux[k] for k in ("d_loss", "r1_term")})
        return new, scalars

    def make(r1: float) -> Callable:
        sharded = jax.shard_map(functools.partial(per_device, r1=r1), mesh=mesh,
                                in_specs=(P(), P(DATA), P(DATA), P(DATA), P(), P()), out_specs=(P(), P()))

        def step_fn(state: DistillState, batch: dict, teacher_vars, judge_vars):
            draw = jax.random.fold_in(jax.random.fold_in(key, state.step), 2**20)  # global draws: device-count free
            n = batch["image"].shape[0]
            z = jax.random.normal(jax.random.fold_in(draw, 0), (n, teacher.z_dim))
            labels = jax.random.randint(jax.random.fold_in(draw, 1), (n,), 0, max(num_classes, 1))
            state, scalars = sharded(state, batch, z, labels, teacher_vars, judge_vars)
            return state, Metrics.single_from_model_output(**scalars)

        return jax.jit(step_fn, donate_argnums=(0,))

    plain = make(0.0)
    return gan_lib.LazyRegularised(make(r1_weight), plain, cfg.r1_every) if use_d and r1_weight > 0 else plain


def distill_config(**overrides) -> ml_collections.ConfigDict:
    """`config.distill`: weights (with optional linear schedules) and options of the objective."""
    term = lambda value: ml_collections.ConfigDict(dict(value=value, end_value=value, start_step=0, end_step=0))
    cfg = ml_collections.ConfigDict(dict(
        weights=ml_collections.ConfigDict({t: term(0.0) for t in TERMS}),
        temperature=4.0, alpha=0.1, reuse_mapping=False, truncation_psi=1.0, adv_loss="logistic",
        d_real_data=False, r1_gamma=0.05, r1_every=16, ema_decay=0.999))
    cfg.update(overrides)
    return cfg
