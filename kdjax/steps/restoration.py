"""The image-to-image train step (super-resolution, inpainting, enhancement), with or without a teacher.

A batch holds degraded inputs x and their clean targets y (`kdjax.core.photos.PairBatches`). The student S,
with its features f_S (`return_features=True`) and, when distilling, learned 1x1 adapters A (one per matched
map, `FeatureAdapters`, trained with S), minimises on each device

    loss = alpha * L1(S(x), y) + (1 - alpha) * L1(S(x), sg(T(x)))
           + w_feat * FM(A(f_S), sg(f_T)) + w_fakd * FAKD(f_S, sg(f_T))
           + w_adv * g(D(W(S(x))))

- L1 = `losses.l1`, the mean absolute error over pixels and channels (images in [-1, 1]);
- T the frozen teacher: its variables are a constant argument of the step, never in the optimizer or the
  checkpoints; sg = stop_gradient. T(x) and f_T may instead come with the batch, computed once before training
  (a fixed pool of training pairs, `kdjax.tasks.restoration_kd`): the same objective without T's forward pass;
- FM = `losses.feature_matching` (mean squared error) and FAKD = `losses.fakd` (L1 between spatial affinity
  matrices), both over `pairs`: student feature name -> teacher feature name, maps of the same spatial size
  (for EDSR -> ESPCN both at the low resolution). FAKD needs no adapter: an affinity matrix is HW x HW
  whatever the channels. No pairs: both terms are 0.
- the adversarial term (optional, `Adversary`; SRGAN-style): D any kdjax discriminator, judging the central
  window W (`central_window`: the largest power of two <= the crop, as kdjax's discriminators take 2^k
  pixels) of an output; g the generator half of `losses.ADVERSARIAL[loss]` (non-saturating softplus(-D) or
  hinge -D). D is updated in the same step, after the student, by its own optimizer on the pair's half
  d(D(W(y)), D(W(sg(S(x))))): the ground truth is real, the student's output fake. D and its optimizer state
  live in `state.model_state["discriminator"]` (checkpointed, never in the student's optimizer or bundle).
Without a teacher (the teacher's own phase, and the student from scratch) loss = L1(S(x), y).

The gradient is that of `lax.pmean(loss, DATA_AXIS)` (`kdjax.steps.shell`), never a pmean of the gradients of a
per-device loss.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from kdjax import losses
from kdjax.core.parallel import DATA_AXIS
from kdjax.steps.distill import FeatureAdapters
from kdjax.steps.gan import apply_discriminator, discriminator_update
from kdjax.steps.shell import data_parallel_step
from kdjax.steps.state import TrainState

ShapeTree = Mapping[str, jax.ShapeDtypeStruct]


@dataclasses.dataclass(frozen=True)
class Adversary:
    """The optional adversarial term (module docstring): the discriminator D (inputs `window` x `window`), its
    optimizer, the weight w_adv and the loss pair's name in `losses.ADVERSARIAL`."""

    discriminator: nn.Module
    tx: optax.GradientTransformation
    weight: float
    window: int
    loss: str = "logistic"


def central_window(images: jax.Array, size: int) -> jax.Array:
    """The central size x size pixels of (B, H, W, C) images (offsets (H - size) // 2, (W - size) // 2)."""
    top, left = (images.shape[1] - size) // 2, (images.shape[2] - size) // 2
    return images[:, top:top + size, left:left + size]


def window_size(crop: int) -> int:
    """The discriminator's input side for crops of `crop` pixels: the largest power of two <= crop."""
    return 1 << (crop.bit_length() - 1)


def adversarial_term(adversary: Adversary, d_params: Any, restored: jax.Array) -> jax.Array:
    """g(D(W(S(x)))): the generator half of `losses.ADVERSARIAL[adversary.loss]` on the central window."""
    g_loss_of = losses.ADVERSARIAL[adversary.loss][0]
    window = central_window(restored, adversary.window)
    return g_loss_of(apply_discriminator(adversary.discriminator, d_params, {}, window, None))


def adversary_update(adversary: Adversary, discriminator: Mapping[str, Any], real: jax.Array, fake: jax.Array
                     ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """One update of D, per device, on the central windows of `real` images against sg(`fake`) ones with the
    discriminator half of `losses.ADVERSARIAL[adversary.loss]`: (the new {"params", "opt_state"}, its device-mean
    metrics {"d_loss", "d_real", "d_fake"} (the last two mean logits))."""
    d_apply = functools.partial(apply_discriminator, adversary.discriminator)
    window = functools.partial(central_window, size=adversary.window)
    d_params, d_opt, d_aux = discriminator_update(
        d_apply, adversary.tx, discriminator["params"], discriminator["opt_state"], {}, window(real), None,
        window(jax.lax.stop_gradient(fake)), None, losses.ADVERSARIAL[adversary.loss][1], 0.0)
    return {"params": d_params, "opt_state": d_opt}, {k: d_aux[k] for k in ("d_loss", "d_real", "d_fake")}


@dataclasses.dataclass(frozen=True)
class Distillation:
    """What the student learns from the teacher (module docstring): its weights, the matched feature maps
    (`pairs`: student name -> teacher name) and the adapters that map the student's maps to the teacher's
    channels (None without pairs)."""

    teacher: nn.Module
    alpha: float = 0.5
    w_feat: float = 0.0
    w_fakd: float = 0.0
    pairs: Mapping[str, str] = dataclasses.field(default_factory=dict)
    adapters: FeatureAdapters | None = None
    adversary: Adversary | None = None


def feature_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[jax.ShapeDtypeStruct, ShapeTree]:
    """(output, {feature name: map}) shapes of an image-to-image model on inputs of `input_shape` (B, H, W,
    in_channels), from `jax.eval_shape` (nothing is computed)."""
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    (out, feats), _ = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, return_features=True), x)
    return out, feats


def make_adapters(student: nn.Module, teacher: nn.Module, pairs: Mapping[str, str],
                  input_shape: tuple[int, ...]) -> FeatureAdapters | None:
    """One 1x1 adapter per pair, keyed by the student's name, to the teacher map's channels; None without pairs."""
    if not pairs:
        return None
    teacher_feats = feature_shapes(teacher, input_shape)[1]
    return FeatureAdapters({s: teacher_feats[t].shape[-1] for s, t in pairs.items()})


def init_adapters(adapters: FeatureAdapters, student: nn.Module, input_shape: tuple[int, ...],
                  key: jax.Array) -> Any:
    """The adapters' initial variables, for student maps of the shapes inputs of `input_shape` give."""
    feats = feature_shapes(student, input_shape)[1]
    zeros = {s: jnp.zeros(feats[s].shape, jnp.float32) for s in adapters.teacher_channels}
    return jax.jit(adapters.init)(key, zeros)


def matched(student_feats: Mapping[str, jax.Array], teacher_feats: Mapping[str, jax.Array],
            pairs: Mapping[str, str]) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The paired maps, both keyed by the student's name: ({s: f_S[s]}, {s: sg(f_T[t])}) for (s, t) in pairs."""
    return ({s: student_feats[s] for s in pairs},
            {s: jax.lax.stop_gradient(teacher_feats[t]) for s, t in pairs.items()})


def objective(student: nn.Module, params: Any, x: jax.Array, y: jax.Array, kd: Distillation | None,
              teacher_variables: Any, d_params: Any = None, cached: Mapping[str, Any] | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """(the per-device loss (module docstring), its terms, the student's output). `params` = {"student": ...,
    ["adapters": ...]}; `d_params` the discriminator's parameters when `kd.adversary` is set. `cached`: the
    teacher's outputs on x computed before training, {"teacher": T(x), "teacher_features": {name: f_T[name]} (at
    least the paired maps)}, used instead of running T (`teacher_variables` is then unused)."""
    restored, f_s = student.apply({"params": params["student"]}, x, train=True, return_features=True)
    l1_target = losses.l1(restored, y)
    if kd is None:
        return l1_target, {"l1_target": l1_target}, restored
    if cached is None:
        t_restored, f_t = kd.teacher.apply(teacher_variables, x, train=False, return_features=True)
    else:
        t_restored, f_t = cached["teacher"], cached["teacher_features"]
    l1_teacher = losses.l1(restored, jax.lax.stop_gradient(t_restored))
    feature = fakd = jnp.float32(0.0)
    if kd.pairs:
        s_maps, t_maps = matched(f_s, f_t, kd.pairs)
        feature = losses.feature_matching(kd.adapters.apply({"params": params["adapters"]}, s_maps), t_maps)
        fakd = losses.fakd(s_maps, t_maps)
    loss = (kd.alpha * l1_target + (1.0 - kd.alpha) * l1_teacher + kd.w_feat * feature + kd.w_fakd * fakd)
    terms = {"l1_target": l1_target, "l1_teacher": l1_teacher, "feature": feature, "fakd": fakd}
    if kd.adversary is not None:
        terms["adv"] = adversarial_term(kd.adversary, d_params, restored)
        loss = loss + kd.adversary.weight * terms["adv"]
    return loss, terms, restored


def metric_names(kd: Distillation | None) -> list[str]:
    """The step's metrics: loss, l1_target and, with a teacher, l1_teacher, feature, fakd; with an adversary
    adv and the discriminator's d_loss, d_real, d_fake (mean logits)."""
    names = ["loss", "l1_target"] + (["l1_teacher", "feature", "fakd"] if kd is not None else [])
    return names + (["adv", "d_loss", "d_real", "d_fake"] if kd is not None and kd.adversary is not None else [])


def init_discriminator(adversary: Adversary, channels: int, key: jax.Array) -> dict[str, Any]:
    """`state.model_state["discriminator"]`: D's initial parameters (for `window`-pixel images of `channels`)
    and its optimizer state, on the host."""
    model = adversary.discriminator
    params = jax.device_get(jax.jit(lambda k: model.init(
        k, jnp.zeros((1, adversary.window, adversary.window, channels), jnp.float32), None))(key)["params"])
    return {"params": params, "opt_state": jax.device_get(adversary.tx.init(params))}


def make_train_step(student: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    kd: Distillation | None = None) -> Callable:
    """The jitted data-parallel step `(state, batch, teacher_variables) -> (state, metrics)`; `state.params` =
    {"student": ..., ["adapters": ...]}, `batch` = {"input", "target"} and, when the teacher's outputs were
    computed before training, "teacher" and "teacher_features" (`objective`'s `cached`; the teacher is then not
    run and `teacher_variables` may be {}); `teacher_variables` {} without kd; with an adversary
    `state.model_state["discriminator"]` = {"params", "opt_state"} (`init_discriminator`)."""
    adversary = kd.adversary if kd is not None else None

    def per_device(state: TrainState, batch: dict, teacher_variables: Any):
        d = state.model_state.get("discriminator")
        cached = ({k: batch[k] for k in ("teacher", "teacher_features")} if kd is not None and "teacher" in batch
                  else None)

        def loss_fn(params):
            loss, terms, restored = objective(student, params, batch["input"], batch["target"], kd,
                                              teacher_variables, None if d is None else d["params"], cached)
            return jax.lax.pmean(loss, DATA_AXIS), (terms, restored)

        (loss, (terms, restored)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        metrics = {"loss": loss, **jax.lax.pmean(terms, DATA_AXIS)}
        model_state = state.model_state
        if adversary is not None:  # D's update, after the student's: real = ground truth, fake = sg(S(x))
            discriminator, d_metrics = adversary_update(adversary, d, batch["target"], restored)
            model_state = {**model_state, "discriminator": discriminator}
            metrics.update(d_metrics)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state, model_state=model_state)
        return new_state, metrics

    return data_parallel_step(per_device, mesh, metric_names(kd))
