"""The autoregressive train step (PixelCNN), with or without a teacher, data-parallel.

The batch's images become integer levels x (`pixelcnn.to_levels`) and the model sees them rescaled to
[-1, 1]; its logits z_s (B, H, W, C, L) are scored against x:
- without a teacher: bits/dim, i.e. CE(z_s, x) averaged over pixels and channels, / ln 2;
- with one (word-level KD, Kim & Rush 2016), `losses.pixel_kd`:
  mean over pixels and channels of alpha * CE(z_s, x) + (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)),
  z_t the frozen teacher's logits on the same images (its variables a constant argument: not in the
  optimizer, not in checkpoints).
Sequence-level KD is this step without a teacher on a source of the teacher's samples.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kdjax import losses
from kdjax.core import parallel
from kdjax.core.parallel import DATA_AXIS
from kdjax.models.pixelcnn import to_levels, to_model_input
from kdjax.steps.shell import data_parallel_step
from kdjax.steps.state import TrainState


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, conditional: bool,
                    teacher: nn.Module | None = None, alpha: float = 1.0, temperature: float = 1.0) -> Callable:
    """The jitted data-parallel step `(state, batch, teacher_variables) -> (state, metrics)`; metrics are
    "loss", "bits_per_dim" (of the batch, under the student) and, with a teacher, "kl"."""
    names = ["loss", "bits_per_dim"] + (["kl"] if teacher is not None else [])

    def per_device(state: TrainState, batch: dict, teacher_variables):
        levels = to_levels(batch["image"], model.levels)
        x = to_model_input(levels, model.levels)
        labels = (batch["label"],) if conditional else ()

        def loss_fn(params):
            logits = model.apply({"params": params, **state.model_state}, x, *labels, train=True)
            bpd = losses.bits_per_dim(logits, levels)
            if teacher is None:
                return jax.lax.pmean(bpd, DATA_AXIS), {"bits_per_dim": bpd}
            teacher_logits = teacher.apply(teacher_variables, x, *labels, train=False)
            loss, terms = losses.pixel_kd(logits, teacher_logits, levels, alpha, temperature)
            return jax.lax.pmean(loss, DATA_AXIS), {"bits_per_dim": bpd, "kl": terms["kl"]}

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state)
        return new_state, {"loss": loss, **jax.lax.pmean(terms, DATA_AXIS)}

    return data_parallel_step(per_device, mesh, names)


def make_bits_per_image(model: nn.Module, mesh: Mesh, conditional: bool) -> Callable:
    """Jitted data-parallel evaluation: (variables, images, labels) -> bits/dim of each image (B,)."""
    def per_device(variables, images, labels):
        levels = to_levels(images, model.levels)
        logits = model.apply(variables, to_model_input(levels, model.levels), *((labels,) if conditional else ()))
        return losses.bits_per_image(logits, levels)

    return parallel.data_parallel(per_device, mesh, in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)),
                                  out_specs=P(DATA_AXIS))
