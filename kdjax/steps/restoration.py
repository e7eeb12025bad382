"""The image-to-image train step (super-resolution, inpainting, enhancement), with or without a teacher.

A batch holds degraded inputs x and their clean targets y (`kdjax.core.photos.PairBatches`). The student S,
with its features f_S (`return_features=True`) and, when distilling, learned 1x1 adapters A (one per matched
map, `FeatureAdapters`, trained with S), minimises on each device

    loss = alpha * L1(S(x), y) + (1 - alpha) * L1(S(x), sg(T(x)))
           + w_feat * FM(A(f_S), sg(f_T)) + w_fakd * FAKD(f_S, sg(f_T))

- L1 = `losses.l1`, the mean absolute error over pixels and channels (images in [-1, 1]);
- T the frozen teacher: its variables are a constant argument of the step, never in the optimizer or the
  checkpoints; sg = stop_gradient;
- FM = `losses.feature_matching` (mean squared error) and FAKD = `losses.fakd` (L1 between spatial affinity
  matrices), both over `pairs`: student feature name -> teacher feature name, maps of the same spatial size
  (for EDSR -> ESPCN both at the low resolution). FAKD needs no adapter: an affinity matrix is HW x HW
  whatever the channels. No pairs: both terms are 0.
Without a teacher (the teacher's own phase, and the student from scratch) loss = L1(S(x), y).
An adversarial term is out of scope for this step (not implemented).

The gradient is that of `lax.pmean(loss, DATA_AXIS)` (`kdjax.steps.shell`), never a pmean of the gradients of a
per-device loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from kdjax import losses
from kdjax.core.parallel import DATA_AXIS
from kdjax.steps.distill import FeatureAdapters
from kdjax.steps.shell import data_parallel_step
from kdjax.steps.state import TrainState

ShapeTree = Mapping[str, jax.ShapeDtypeStruct]


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
              teacher_variables: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The per-device loss (module docstring) and its terms. `params` = {"student": ..., ["adapters": ...]}."""
    restored, f_s = student.apply({"params": params["student"]}, x, train=True, return_features=True)
    l1_target = losses.l1(restored, y)
    if kd is None:
        return l1_target, {"l1_target": l1_target}
    t_restored, f_t = kd.teacher.apply(teacher_variables, x, train=False, return_features=True)
    l1_teacher = losses.l1(restored, jax.lax.stop_gradient(t_restored))
    feature = fakd = jnp.float32(0.0)
    if kd.pairs:
        s_maps, t_maps = matched(f_s, f_t, kd.pairs)
        feature = losses.feature_matching(kd.adapters.apply({"params": params["adapters"]}, s_maps), t_maps)
        fakd = losses.fakd(s_maps, t_maps)
    loss = (kd.alpha * l1_target + (1.0 - kd.alpha) * l1_teacher + kd.w_feat * feature + kd.w_fakd * fakd)
    return loss, {"l1_target": l1_target, "l1_teacher": l1_teacher, "feature": feature, "fakd": fakd}


def metric_names(kd: Distillation | None) -> list[str]:
    """The step's metrics: loss, l1_target and, with a teacher, l1_teacher, feature, fakd."""
    return ["loss", "l1_target"] + (["l1_teacher", "feature", "fakd"] if kd is not None else [])


def make_train_step(student: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    kd: Distillation | None = None) -> Callable:
    """The jitted data-parallel step `(state, batch, teacher_variables) -> (state, metrics)`; `state.params` =
    {"student": ..., ["adapters": ...]}, `batch` = {"input", "target"}, `teacher_variables` {} without kd."""
    def per_device(state: TrainState, batch: dict, teacher_variables: Any):
        def loss_fn(params):
            loss, terms = objective(student, params, batch["input"], batch["target"], kd, teacher_variables)
            return jax.lax.pmean(loss, DATA_AXIS), terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state)
        return new_state, {"loss": loss, **jax.lax.pmean(terms, DATA_AXIS)}

    return data_parallel_step(per_device, mesh, metric_names(kd))

