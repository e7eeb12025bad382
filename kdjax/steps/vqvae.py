"""The VQ-VAE train step, data-parallel: reconstruction + commitment by gradient, the codebook by EMA.

Per batch x (images in [-1, 1]):
  loss = mean (x - D(z_e + sg(z_q - z_e)))^2 + beta * mean (z_e - sg(z_q))^2      (`losses.l2`, `losses.vq_commitment`)
differentiated for the encoder and decoder (the straight-through estimator carries the reconstruction's
gradient past the quantiser); then the codebook takes one EMA step (`models.vqvae.ema_codebook_update`)
from the assignments of the whole global batch (counts and sums psum-ed over the devices). Metrics: "loss",
"reconstruction" (MSE), "commitment", "perplexity" (exp entropy of the batch's code usage).
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
from kdjax.models.vqvae import assignment_stats, ema_codebook_update
from kdjax.steps.shell import data_parallel_step
from kdjax.steps.state import TrainState

METRICS = ("loss", "reconstruction", "commitment", "perplexity")


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, beta: float,
                    decay: float, reconstruction: Callable[[jax.Array, jax.Array], jax.Array] = losses.l2
                    ) -> Callable:
    """The jitted data-parallel step `(state, batch) -> (state, metrics)`; the codebook is `model_state["vq"]`.
    `model` is any VQ autoencoder whose `apply(variables, x, train=True)` gives {"reconstruction", "z_e", "z_q",
    "codes"} and which has `num_codes` (`models.vqvae.VQVAE`, a `models.vae.VAE` with num_codes > 0);
    `reconstruction` the reconstruction term (`losses.l2`, the module docstring's; `losses.l1`)."""
    def per_device(state: TrainState, batch: dict):
        x = batch["image"]

        def loss_fn(params):
            out = model.apply({"params": params, **state.model_state}, x, train=True)
            rec, commit = reconstruction(out["reconstruction"], x), losses.vq_commitment(out["z_e"], out["z_q"])
            return jax.lax.pmean(rec + beta * commit, DATA_AXIS), (rec, commit, out["z_e"], out["codes"])

        (loss, (rec, commit, z_e, codes)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        counts, sums = jax.lax.psum(assignment_stats(z_e, codes, model.num_codes), DATA_AXIS)
        vq = ema_codebook_update(state.model_state["vq"], counts, sums, decay)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state, model_state={**state.model_state, "vq": vq})
        return new_state, {"loss": loss, "reconstruction": jax.lax.pmean(rec, DATA_AXIS),
                           "commitment": jax.lax.pmean(commit, DATA_AXIS), "perplexity": losses.code_perplexity(counts)}

    return data_parallel_step(per_device, mesh, METRICS)


def make_encoder(model: nn.Module, mesh: Mesh) -> Callable:
    """Jitted data-parallel (variables, images) -> (codes (B, h, h) int32, squared reconstruction error per
    image (B,)) of the quantised reconstruction."""
    def per_device(variables, images):
        out = model.apply(variables, images)
        err = ((out["reconstruction"] - images.astype(out["reconstruction"].dtype)) ** 2).mean(axis=(1, 2, 3))
        return out["codes"], err

    return parallel.data_parallel(per_device, mesh, in_specs=(P(), P(DATA_AXIS)),
                                  out_specs=(P(DATA_AXIS), P(DATA_AXIS)))
