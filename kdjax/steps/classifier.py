"""The classifier train step, with or without a teacher (classic knowledge distillation), data-parallel.

Without a teacher the loss is CE(z_s, y); with one it is `losses.classic_kd`:
`alpha * CE(z_s, y) + (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`, the teacher frozen
(its variables a constant argument: not in the optimizer, not in checkpoints), plus, with
`embedding_weight` w > 0, embedding distillation for retrieval: `w * losses.relational_distance(e_s, e_t)`
on the pooled embeddings of the *global* batch (gathered over the devices, so the pairs do not depend on
how the batch is split).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from kdjax import losses
from kdjax.core import parallel
from kdjax.core.parallel import DATA_AXIS
from kdjax.steps.shell import data_parallel_step
from kdjax.steps.state import TrainState


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    teacher: nn.Module | None = None, alpha: float = 1.0, temperature: float = 1.0,
                    embedding_weight: float = 0.0) -> Callable:
    """The jitted data-parallel step `(state, batch, teacher_variables) -> (state, metrics)`.

    The gradient is taken of the device-mean loss (`lax.pmean` inside the differentiated function): see
    `kdjax.core.parallel`.
    """
    embed = teacher is not None and embedding_weight > 0
    names = ["loss", "ce", "accuracy"] + (["kl"] if teacher is not None else []) + (["embedding"] if embed else [])

    def per_device(state: TrainState, batch: dict, teacher_variables):
        images, labels = batch["image"], batch["label"]

        def loss_fn(params):
            (logits, features), new_model_state = model.apply(
                {"params": params, **state.model_state}, images, train=True, return_features=True,
                mutable=list(state.model_state.keys()))
            if teacher is None:
                loss = losses.softmax_cross_entropy(logits, labels)
                terms = {"ce": loss}
            else:
                teacher_logits, teacher_features = teacher.apply(teacher_variables, images, train=False,
                                                                 return_features=True)
                loss, terms = losses.classic_kd(logits, teacher_logits, labels, alpha, temperature)
                if embed:
                    gather = lambda e: jax.lax.all_gather(e, DATA_AXIS, tiled=True)  # noqa: E731
                    terms["embedding"] = losses.relational_distance(gather(features["pool"]),
                                                                    gather(teacher_features["pool"]))
                    loss = loss + embedding_weight * terms["embedding"]
            return jax.lax.pmean(loss, DATA_AXIS), (terms, new_model_state, logits)

        (loss, (terms, new_model_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state, model_state=new_model_state)
        accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        scalars = jax.lax.pmean({**terms, "accuracy": accuracy}, DATA_AXIS)
        return new_state, {"loss": loss, **scalars}

    return data_parallel_step(per_device, mesh, names)


def make_predict(model: nn.Module, mesh: Mesh) -> Callable:
    """Jitted data-parallel inference: (variables, images) -> (logits, embeddings), batch-sharded; the
    embedding is the classifier's pooled feature vector (`features["pool"]`)."""
    def predict(variables, images):
        logits, features = model.apply(variables, images, train=False, return_features=True)
        return logits, features["pool"]

    return parallel.data_parallel(predict, mesh, in_specs=(P(), P(DATA_AXIS)),
                                  out_specs=(P(DATA_AXIS), P(DATA_AXIS)))
