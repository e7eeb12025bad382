"""The VQ-VAE stage of `pixelcnn_kd` (when `config.vqvae.model` is set): the autoencoder trained on the
images (phase `vqvae`) or loaded from `config.vqvae.checkpoint`, the dataset turned into its codes (what
the PixelCNN priors then model, with levels = the codebook size), and codes decoded back into images.

Codes travel through kdjax's data path as 1-channel uint8 "images": code k is stored as
round(k * 255 / (K - 1)), which `pixelcnn.to_levels(., K)` maps back to k exactly for K <= 256.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from kdjax import models
from kdjax.core import data, optim, parallel
from kdjax.models import bundles
from kdjax.steps import loop
from kdjax.steps.state import TrainState
from kdjax.steps.vqvae import make_encoder, make_train_step
from kdjax.tasks import checks
from kdjax.tasks.phase import model_from_block, run_phase


def check_config(config: ml_collections.ConfigDict) -> None:
    """The `config.vqvae` block (raises ValueError naming the field)."""
    block = config.vqvae
    if block.checkpoint:
        kw = bundles.check_model_bundle(block.checkpoint, "config.vqvae.checkpoint", kind="autoencoder")["kwargs"]
        if (kw.get("resolution"), kw.get("channels")) != (config.data.resolution, config.data.channels):
            raise ValueError(f"config.vqvae.checkpoint encodes {kw.get('resolution')}x{kw.get('resolution')}x"
                             f"{kw.get('channels')} images; the data is {config.data.resolution}x"
                             f"{config.data.resolution}x{config.data.channels} (config.data.resolution, .channels).")
    else:
        checks.check_model_block(block, "config.vqvae", "autoencoder", taken_from="the dataset")
        checks.check_phase(block.train, "config.vqvae.train")
        if not 0.0 <= block.ema_decay < 1.0:
            raise ValueError(f"config.vqvae.ema_decay={block.ema_decay} must be in [0, 1).")
        if block.beta < 0:
            raise ValueError(f"config.vqvae.beta={block.beta} must be >= 0.")
        factor = 2 ** block.kwargs.get("downsamples", models.build_model(block.model).downsamples)
        if config.data.resolution % factor:
            raise ValueError(f"config.data.resolution={config.data.resolution} must be divisible by 2^downsamples="
                             f"{factor} (config.vqvae.kwargs.downsamples).")
    _, num_codes = code_shape(config)
    if not 2 <= num_codes <= 256:
        raise ValueError(f"config.vqvae.kwargs.num_codes={num_codes} must be in [2, 256].")
    if num_codes != config.levels:
        raise ValueError(f"config.levels={config.levels}: with a VQ-VAE the priors model its codes, so it must be "
                         f"the codebook size, {num_codes} (config.vqvae.kwargs.num_codes).")


def code_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(code grid side h, codebook size K) of the configured or shipped VQ-VAE, without compute."""
    block = config.vqvae
    if block.checkpoint:
        meta = bundles.check_model_bundle(block.checkpoint, "config.vqvae.checkpoint", kind="autoencoder")
        spec = models.build_model(meta["model"], **meta["kwargs"]).spec
    else:
        spec = models.build_model(block.model, **block.kwargs.to_dict(), resolution=config.data.resolution,
                                  channels=config.data.channels).spec
    return spec.code_resolution, spec.num_codes


def train_or_load(config: ml_collections.ConfigDict, workdir: pathlib.Path, dataset: data.Dataset, mesh: Mesh,
                  writer, budget: loop.StepBudget) -> tuple[Any, Any, bool]:
    """(module, variables, finished): the bundle `config.vqvae.checkpoint`, or phase `vqvae` trained on
    `dataset.train` (its bundle written to `workdir/vqvae/bundle`)."""
    dtype = jnp.dtype(config.compute_dtype)
    if config.vqvae.checkpoint:
        model, variables, _ = bundles.load_model(config.vqvae.checkpoint, "config.vqvae.checkpoint", mesh, dtype=dtype)
        return model, variables, True
    block, train_cfg = config.vqvae, config.vqvae.train
    model, kwargs = model_from_block(block, (dataset.resolution, dataset.channels, 0), dtype)
    tx = optim.make_optimizer(train_cfg.optimizer, train_cfg.num_steps)
    x = jnp.zeros((1, dataset.resolution, dataset.resolution, dataset.channels))
    variables = jax.jit(lambda k: model.init(k, x))(jax.random.fold_in(jax.random.key(config.seed), 5))
    state = parallel.replicate(TrainState.create(variables, tx), mesh)
    step = make_train_step(model, tx, mesh, block.beta, block.ema_decay)
    state, finished = run_phase("vqvae", config, workdir, state, step, dataset.train, train_cfg, mesh, writer, budget)
    if finished:
        bundles.save_model_bundle(workdir / "vqvae" / "bundle", block.model, kwargs, state.variables())
    return model, state.variables(), finished


def encode_split(model: Any, variables: Any, split, mesh: Mesh, batch_size: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (N, h, h) int32, per-image MSE of the quantised reconstruction (N,), labels (N,)) of every
    example of a split, in one pass over it."""
    fn = make_encoder(models.outside_data_parallel(model), mesh)
    codes, errors, labels = [], [], []
    for batch in data.eval_batches(split, batch_size):
        mask = parallel.to_host(parallel.global_batch(batch["mask"], mesh)) > 0
        c, e = fn(variables, parallel.global_batch(batch["image"], mesh))
        codes.append(parallel.to_host(c)[mask])
        errors.append(parallel.to_host(e)[mask])
        labels.append(parallel.to_host(parallel.global_batch(batch["label"], mesh))[mask])
    return np.concatenate(codes), np.concatenate(errors), np.concatenate(labels)


def codes_to_uint8(codes: np.ndarray, num_codes: int) -> np.ndarray:
    """Codes (N, h, h) -> the (N, h, h, 1) uint8 "images" the PixelCNN data path reads back exactly."""
    return np.round(codes[..., None] * (255.0 / (num_codes - 1))).astype(np.uint8)


def code_dataset(model: Any, variables: Any, dataset: data.Dataset, mesh: Mesh, batch_size: int
                 ) -> tuple[data.Dataset, dict[str, float]]:
    """The dataset's splits as codes (labels kept), and the quantised reconstruction's MSE on each split."""
    spec, splits, errors = model.spec, {}, {}
    for name in ("train", "validation", "test"):
        source = getattr(dataset, name)
        if not len(source):
            splits[name] = ()
            continue
        codes, err, labels = encode_split(model, variables, source, mesh, batch_size)
        splits[name] = data.ArraySource(codes_to_uint8(codes, spec.num_codes), labels)
        errors[f"{name}_reconstruction_mse"] = float(err.mean())
    codes = data.Dataset(f"{dataset.name} (VQ-VAE codes)", splits["train"], splits["test"], dataset.num_classes,
                         spec.code_resolution, 1, splits["validation"])
    return codes, errors


def decode(model: Any, variables: Any, codes: np.ndarray, batch_size: int) -> np.ndarray:
    """Codes (N, h, h[, 1]) -> images (N, R, R, C) in [-1, 1] (the decoder's output clipped)."""
    model = models.outside_data_parallel(model)
    fn = jax.jit(lambda v, c: jnp.clip(model.apply(v, c, method=type(model).decode_codes), -1.0, 1.0))
    codes = codes.reshape(codes.shape[:3]).astype(np.int32)
    out = [np.asarray(fn(variables, codes[i:i + batch_size])) for i in range(0, len(codes), batch_size)]
    return np.concatenate(out)
