"""The generator-distillation step: every term of the objective, in one place.

For latents z (and classes y when the teacher is conditional), the frozen teacher gives x_T = G_T(z, y)
with its block features f_T, the student x_S = G_S(z or w, y) with features f_S, and the frozen judge j
gives logits and feature maps of both. The student (with its 1x1 feature adapters A) minimises

    sum_k  weight_k(step) * term_k

over the terms (`Objective.terms`, each a function in `kdjax.losses`; weight 0 turns a term off, and each
weight may decay linearly, as TinyGAN's pixel weight does):
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
instead of z; `truncation_psi` truncates the teacher's targets; `progressive` grows the student stage by
stage (`Growth`: each stage's targets are the teacher's images average-pooled to its resolution, each new
stage faded in), one jitted variant per stage.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from kdjax import losses, models
from kdjax.config import DISTILL_TERMS
from kdjax.core.parallel import DATA_AXIS
from kdjax.models import stylegan2
from kdjax.models.wrappers import DistillationTargets, targets_variables
from kdjax.steps.gan import apply_discriminator, discriminator_update
from kdjax.steps.lazy import HostSwitch
from kdjax.steps.shell import data_parallel_step, latent_draw

DATA = DATA_AXIS


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


def active_terms(weights: ml_collections.ConfigDict) -> list[str]:
    """The terms with a nonzero weight at some step, in `DISTILL_TERMS` order."""
    return [t for t in DISTILL_TERMS if weights[t].value > 0 or weights[t].end_value > 0]


def weight(cfg: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """A term's weight at `step`: `value`, or linear from `value` to `end_value` over [start_step, end_step]
    (constant outside it; `optax.linear_schedule`)."""
    if cfg.end_step <= 0:
        return jnp.asarray(cfg.value, jnp.float32)
    schedule = optax.linear_schedule(cfg.value, cfg.end_value, cfg.end_step - cfg.start_step, cfg.start_step)
    return jnp.asarray(schedule(step), jnp.float32)


@dataclasses.dataclass(frozen=True)
class Growth:
    """Progressive growth of the student (ProGAN-style): the resolutions `stages` (e.g. 8, 16, 32), stage i
    trained on steps [boundaries[i], boundaries[i + 1]) (the budget split evenly), each new stage fading in
    over its first `fade_fraction` of steps (alpha from 0 to 1; the first stage starts at alpha 1)."""

    stages: tuple[int, ...]
    boundaries: tuple[int, ...]  # len(stages) + 1 step numbers, from 0 to num_steps
    fade_fraction: float

    @classmethod
    def plan(cls, start: int, resolution: int, num_steps: int, fade_fraction: float) -> "Growth":
        stages = tuple(start * 2**i for i in range(int(math.log2(resolution // start)) + 1))
        return cls(stages, tuple(round(i * num_steps / len(stages)) for i in range(len(stages) + 1)), fade_fraction)

    def stage_index(self, step: int) -> int:
        """The stage trained at `step` (on the host; the last stage after the budget)."""
        return max(i for i in range(len(self.stages)) if self.boundaries[i] <= step)

    def alpha(self, index: int, step: jax.Array) -> jax.Array:
        """The fade-in of stage `index` at `step` (may be traced): linear from 0 to 1 over its first
        `fade_fraction` of steps; 1 for the first stage."""
        if index == 0:
            return jnp.float32(1.0)
        length = max(self.fade_fraction * (self.boundaries[index + 1] - self.boundaries[index]), 1.0)
        return jnp.clip((step - self.boundaries[index]) / length, 0.0, 1.0).astype(jnp.float32)


def at_resolution(images: jax.Array, stage: int, resolution: int) -> jax.Array:
    """Images shown at `stage` x `stage` then stretched back to `resolution`: average-pooled to the stage (when
    larger) and pixel-repeated to the full size. The targets and the student's images of a growing student
    are compared, and judged by D, at full size through this."""
    factor = images.shape[1] // stage
    if factor > 1:
        b, h, w, c = images.shape
        images = images.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
    up = resolution // stage
    return jnp.repeat(jnp.repeat(images, up, axis=1), up, axis=2) if up > 1 else images


def teacher_images(teacher: nn.Module, teacher_vars: Any, z: jax.Array, labels: jax.Array | None,
                   truncation_psi: float = 1.0, return_features: bool = False):
    """The distillation targets (`DistillationTargets`) for latents z: images, and with `return_features`
    the teacher's block features."""
    return DistillationTargets(teacher, truncation_psi).apply(targets_variables(teacher_vars), z, labels,
                                                              return_features=return_features)


@dataclasses.dataclass(frozen=True)
class Objective:
    """The student's objective, sum_k weight_k(step) * term_k over the active terms (module docstring)."""

    teacher: nn.Module
    student: nn.Module
    judge: nn.Module
    discriminator: nn.Module
    adapters: FeatureAdapters
    cfg: ml_collections.ConfigDict  # config.distill
    num_classes: int
    growth: Growth | None = None  # a progressive student's schedule; None = the full student throughout
    stage: int | None = None  # the resolution this objective trains (progressive only; static per variant)

    def targets(self, z: jax.Array, y: jax.Array | None, teacher_vars: Any, judge_vars: Any) -> dict[str, Any]:
        """What the frozen teacher and judge give for latents z (no gradient flows here): the images x_t and
        block features f_t, the student's input (z, or the teacher's w with `reuse_mapping`), the judge's
        logits j_t and feature maps jf_t of x_t."""
        cfg, teacher = self.cfg, self.teacher
        x_t, f_t = teacher_images(teacher, teacher_vars, z, y, cfg.truncation_psi, return_features=True)
        student_in = (teacher.apply(teacher_vars, z, y, method=teacher.mapping, truncation_psi=cfg.truncation_psi)[:, 0]
                      if cfg.reuse_mapping else z)
        x_t, f_t, student_in = jax.lax.stop_gradient((x_t, f_t, student_in))
        if self.stage is not None:  # a growing student copies the teacher at its current resolution
            x_t = at_resolution(x_t, self.stage, x_t.shape[1])
        j_t, jf_t = self.judge.apply(judge_vars, x_t, train=False, return_features=True)
        return {"x_t": x_t, "f_t": f_t, "student_in": student_in, "j_t": j_t,
                "jf_t": {k: v for k, v in jf_t.items() if k != "pool"}}

    def terms(self, x_s: jax.Array, f_s: Mapping[str, jax.Array], adapter_params: Any, targets: Mapping[str, Any],
              labels: jax.Array, judge_vars: Any, d_params: Any, d_state: Any) -> dict[str, jax.Array]:
        """Every active term of the objective, unweighted, for the student's images x_s and features f_s."""
        cfg, active, y = self.cfg, active_terms(self.cfg.weights), labels if self.num_classes else None
        terms = {}
        if "kl" in active or "perceptual" in active:
            j_s, jf_s = self.judge.apply(judge_vars, x_s, train=False, return_features=True)
            if "kl" in active:
                terms["kl"] = (losses.classic_kd(j_s, targets["j_t"], labels, cfg.alpha, cfg.temperature)[0]
                               if self.num_classes else losses.distillation_kl(targets["j_t"], j_s, cfg.temperature))
            if "perceptual" in active:
                terms["perceptual"] = losses.perceptual({k: v for k, v in jf_s.items() if k != "pool"},
                                                        targets["jf_t"])
        if "recon_l1" in active:
            terms["recon_l1"] = losses.l1(x_s, targets["x_t"])
        if "recon_l2" in active:
            terms["recon_l2"] = losses.l2(x_s, targets["x_t"])
        if "feature" in active:
            mapped = self.adapters.apply({"params": adapter_params}, f_s)
            terms["feature"] = losses.feature_matching(mapped, {k: targets["f_t"][k] for k in mapped})
        if "adv" in active:
            g_adv, _ = losses.ADVERSARIAL[cfg.adv_loss]
            terms["adv"] = g_adv(apply_discriminator(self.discriminator, d_params, d_state, x_s, y))
        return terms

    def __call__(self, trainable: Any, state: DistillState, targets: Mapping[str, Any], labels: jax.Array,
                 judge_vars: Any) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any, jax.Array]]:
        """(device-mean weighted loss, (terms, the student's new state, x_s)) for the trainable parameters."""
        y = labels if self.num_classes else None
        grow = {} if self.stage is None else {"stage": self.stage,
                                              "alpha": self.growth.alpha(self.growth.stages.index(self.stage), state.step)}
        (x_s, f_s), new_state = self.student.apply({"params": trainable["student"], **state.student_state},
                                                   targets["student_in"], y, train=True, return_features=True,
                                                   mutable=list(state.student_state), **grow)
        if self.stage is not None:
            x_s = at_resolution(x_s, self.stage, targets["x_t"].shape[1])
        terms = self.terms(x_s, f_s, trainable["adapters"], targets, labels, judge_vars, state.d_params,
                           state.d_state)
        total = sum(weight(self.cfg.weights[t], state.step) * terms[t] for t in active_terms(self.cfg.weights))
        return jax.lax.pmean(total, DATA), (terms, new_state, x_s)


def make_distill_step(objective: Objective, s_tx: optax.GradientTransformation, d_tx: optax.GradientTransformation,
                      mesh: Mesh, key: jax.Array) -> Callable:
    """The jitted data-parallel step `(state, batch, teacher_vars, judge_vars) -> (state, metrics)`.

    `objective.cfg` is `config.distill`: `weights.TERM.{value, end_value, start_step, end_step}`, `temperature`,
    `alpha`, `reuse_mapping`, `truncation_psi`, `adv_loss`, `d_real_data`, `r1_gamma`, `r1_every`,
    `ema_decay`. `batch` holds real images (used by D only when `d_real_data`).
    """
    cfg, num_classes = objective.cfg, objective.num_classes
    active = active_terms(cfg.weights)
    use_d = "adv" in active
    names = ["loss", *active] + (["d_loss", "r1_term"] if use_d else [])
    d_apply = functools.partial(apply_discriminator, objective.discriminator)
    _, d_adv = losses.ADVERSARIAL[cfg.adv_loss]

    def per_device(objective: Objective, state: DistillState, batch: dict, z: jax.Array, labels: jax.Array,
                   teacher_vars, judge_vars, r1: float):
        y = labels if num_classes else None
        targets = objective.targets(z, y, teacher_vars, judge_vars)
        (loss, (terms, student_state, x_s)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.student, state, targets, labels, judge_vars)
        updates, s_opt = s_tx.update(grads, state.s_opt, state.student)
        trainable = optax.apply_updates(state.student, updates)
        ema = optax.incremental_update(trainable["student"], state.student_ema, 1.0 - cfg.ema_decay)  # decay*ema + (1-decay)*p
        new = state.replace(step=state.step + 1, student=trainable, student_state=student_state, s_opt=s_opt,
                            student_ema=ema)
        scalars = {"loss": loss, **jax.lax.pmean(terms, DATA)}
        if use_d:  # D: teacher images (and optionally real data) are real, student images fake.
            x_s, x_t = jax.lax.stop_gradient(x_s), targets["x_t"]
            real = jnp.concatenate([x_t, batch["image"]]) if cfg.d_real_data else x_t
            real_y = (jnp.concatenate([y, batch["label"]]) if cfg.d_real_data else y) if num_classes else None
            d_params, d_opt, d_aux = discriminator_update(
                d_apply, d_tx, state.d_params, state.d_opt, state.d_state, real, real_y, x_s, y, d_adv, r1)
            new = new.replace(d_params=d_params, d_opt=d_opt)
            scalars.update({k: d_aux[k] for k in ("d_loss", "r1_term")})
        return new, scalars

    draw = latent_draw(key, objective.teacher.spec.z_dim, num_classes)
    r1_weight = cfg.r1_gamma / 2 * cfg.r1_every if use_d else 0.0

    def make(variant: tuple[int | None, bool]) -> Callable:
        stage, with_r1 = variant
        per_stage = functools.partial(per_device, dataclasses.replace(objective, stage=stage),
                                      r1=r1_weight if with_r1 else 0.0)
        return data_parallel_step(per_stage, mesh, names, draw)

    growth = objective.growth
    stage_of = (lambda step: growth.stages[growth.stage_index(step)]) if growth else (lambda step: None)
    if growth is None and r1_weight <= 0:
        return make((None, False))
    return HostSwitch(lambda step: (stage_of(step), r1_weight > 0 and step % cfg.r1_every == 0), make)


def init_state(teacher: nn.Module, teacher_vars: Any, student: nn.Module, discriminator: nn.Module,
               student_in_dim: int, s_tx, d_tx, shape: tuple[int, int, int], key: jax.Array
               ) -> tuple[DistillState, FeatureAdapters]:
    """The initial distillation state (host), and the adapters for the feature names both generators share."""
    res, ch, num_classes = shape
    labels = jnp.zeros((2,), jnp.int32) if num_classes else None
    s_plain, d_plain = models.outside_data_parallel(student), models.outside_data_parallel(discriminator)
    s_vars = dict(jax.jit(lambda k: s_plain.init(k, jnp.zeros((2, student_in_dim)), labels))(jax.random.fold_in(key, 0)))
    d_vars = dict(jax.jit(lambda k: d_plain.init(k, jnp.zeros((2, res, res, ch)), labels))(jax.random.fold_in(key, 1)))
    teacher_feats = {}
    if isinstance(teacher, stylegan2.Generator):
        z = jax.ShapeDtypeStruct((2, teacher.z_dim), jnp.float32)
        teacher_feats = jax.eval_shape(lambda v, z: teacher_images(teacher, v, z, labels, return_features=True)[1],
                                       teacher_vars, z)
    student_feats = jax.eval_shape(lambda v: s_plain.apply(v, jnp.zeros((2, student_in_dim)), labels,
                                                           return_features=True)[1], s_vars)
    adapters = FeatureAdapters({k: teacher_feats[k].shape[-1] for k in student_feats if k in teacher_feats})
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), student_feats)
    a_params = jax.jit(adapters.init)(jax.random.fold_in(key, 2), zeros).get("params", {})
    s_params, d_params = s_vars.pop("params"), d_vars.pop("params")
    trainable = {"student": s_params, "adapters": a_params}
    state = DistillState(step=jnp.zeros((), jnp.int32), student=trainable, student_state=s_vars,
                         s_opt=s_tx.init(trainable), d_params=d_params, d_state=d_vars,
                         d_opt=d_tx.init(d_params), student_ema=s_params)
    return state, adapters
