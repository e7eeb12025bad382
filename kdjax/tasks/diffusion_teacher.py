"""Task `diffusion_teacher`: an EDM diffusion model trained on a kdjax dataset, the teacher that few-step and
one-step students will be distilled from (`configs/diffusion_teacher.py`).

Phase `denoiser` (resumable, checkpoints in `workdir/denoiser/`): the preconditioned U-Net `config.denoiser`
(`kdjax.models.edm`) trained with EDM's loss (`kdjax.steps.diffusion`: ln sigma ~ N(P_mean, P_std^2), weight
lambda(sigma)) and an EMA of its parameters; at every log step a preview of the EMA denoiser's Heun samples
(`config.sampler.preview_steps` steps) goes to TensorBoard and `workdir/images/`. The EMA denoiser is exported as
a model bundle in `workdir/denoiser/bundle`.

The report (`report.md`, `report.json`): for every sampler of `config.sampler.methods` ("heun", "euler", "ddim";
`kdjax.models.diffusion_samplers`) at every step count of `config.sampler.steps`, `config.eval.num_samples`
samples from the same initial noise, with the number of network evaluations (NFE), FLOPs per generated image (NFE
times XLA's count for one evaluation) and images/s; with a judge (`config.eval.judge`) also FID, KID and
precision/recall/density/coverage against the real images in the judge's features, as
`kdjax.evaluation.generators` scores generators, and `fid_vs_nfe.png`. `samples.png` has one row per setting, the
same noise in every row, so the rows show what more steps buy.
"""

from __future__ import annotations

import functools
import pathlib
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from kdjax import models
from kdjax.core import data, images, optim, parallel, summaries
from kdjax.evaluation import cost, report
from kdjax.evaluation.generators import judge_pool, quality_metrics
from kdjax.models import bundles, diffusion_samplers
from kdjax.steps import loop
from kdjax.steps.diffusion import init_state, make_train_step
from kdjax.tasks import checks
from kdjax.tasks.phase import model_from_block, run_phase
from kdjax.tasks.pixelcnn_kd import at_resolution, check_eval, judge_and_real

PHASE = "denoiser"
GRID_SAMPLES = 16  # samples per setting in samples.png, and in the previews
PREVIEW_SEED_SALT, EVAL_SEED_SALT = 7, 9  # fold_in(key(seed), .) of the previews' and the report's noise


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates a `diffusion_teacher` config before any compute (raises ValueError naming the field)."""
    data.check_data_config(config.data)
    block = config.denoiser
    checks.check_model_block(block, "config.denoiser", "denoiser",
                             taken_from="the data (config.data; classes: config.conditional)")
    try:
        models.build_model(block.model, **block.kwargs.to_dict(),
                           **models.data_kwargs(block.model, config.data.resolution, config.data.channels, 0)).check()
    except ValueError as e:
        raise ValueError(f"config.denoiser.kwargs: {e}") from e
    checks.check_phase(block.train, "config.denoiser.train")
    if config.conditional and config.data.source == "tfds" and not config.data.label_key:
        raise ValueError("config.conditional=True needs labels; config.data.label_key is '' (unlabelled data).")
    diffusion = config.diffusion
    if not diffusion.p_std > 0:
        raise ValueError(f"config.diffusion.p_std={diffusion.p_std} must be > 0.")
    checks.check_fraction(diffusion.ema_decay, "config.diffusion.ema_decay", closed_high=False)
    check_sampler(config.sampler)
    check_eval(config)


def check_sampler(sampler: ml_collections.ConfigDict) -> None:
    """`config.sampler`: known methods, increasing step counts, a valid EDM noise range."""
    methods, steps = tuple(sampler.methods), tuple(sampler.steps)
    valid = list(diffusion_samplers.SAMPLERS)
    if not methods or any(m not in valid for m in methods) or len(set(methods)) != len(methods):
        raise ValueError(f"config.sampler.methods={methods} must name distinct samplers among {valid}.")
    if not steps or any(int(n) != n or n < 1 for n in steps) or list(steps) != sorted(set(steps)):
        raise ValueError(f"config.sampler.steps={steps} must be increasing integers >= 1.")
    if sampler.preview_steps < 1:
        raise ValueError(f"config.sampler.preview_steps={sampler.preview_steps} must be >= 1.")
    if not 0 < sampler.sigma_min < sampler.sigma_max:
        raise ValueError(f"config.sampler.sigma_min={sampler.sigma_min} and sigma_max={sampler.sigma_max} must "
                         "satisfy 0 < sigma_min < sigma_max.")
    if not sampler.rho > 0:
        raise ValueError(f"config.sampler.rho={sampler.rho} must be > 0.")


def noise_levels(sampler: ml_collections.ConfigDict, method: str, num_steps: int) -> jax.Array:
    """The grid of `method` at `num_steps` steps with the config's EDM range (DDIM: DDPM's levels), padded with
    zeros to the longest grid the config uses, so that one compilation per method serves every step count."""
    length = max(*sampler.steps, sampler.preview_steps) + 1
    grid = diffusion_samplers.noise_levels(method, num_steps, sampler.sigma_min, sampler.sigma_max, sampler.rho)
    return diffusion_samplers.padded(grid, length)


@functools.partial(jax.jit, static_argnames=("model", "method", "shape"))
def generate(model: nn.Module, method: str, shape: tuple[int, ...], params: Any, key: jax.Array,
             labels: jax.Array | None, sigmas: jax.Array, num_steps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(images, nfe): `shape` samples of the denoiser `model` with `params` by `method` down the first `num_steps`
    steps of `sigmas`."""
    denoise = lambda x, sigma: model.apply({"params": params}, x, sigma, labels)
    return diffusion_samplers.sample(denoise, key, shape, method, sigmas, num_steps)


def sample_batches(model: nn.Module, params: Any, method: str, sigmas: jax.Array, num_steps: int, count: int,
                   batch: int, key: jax.Array, desc: str = "") -> tuple[np.ndarray, int, float]:
    """(count images in about [-1, 1], nfe per image, images/s) by `method` over `num_steps` steps of `sigmas`:
    batch b from fold_in(key, b), labels b * batch + i mod classes when conditional. The rate times the batches
    after the first (which may compile), or a second run of the only one. With `desc`, progress is logged."""
    spec = model.spec
    shape = (batch, spec.resolution, spec.resolution, spec.channels)

    def run(b: int) -> tuple[jax.Array, jax.Array]:
        labels = (jnp.arange(b * batch, (b + 1) * batch) % spec.num_classes).astype(jnp.int32) if spec.num_classes \
            else None
        return jax.block_until_ready(generate(model, method, shape, params, jax.random.fold_in(key, b), labels,
                                              sigmas, jnp.int32(num_steps)))

    (images, nfes), rate = timed_batches(run, count, batch, desc)
    return images, int(nfes[0]), rate


def timed_batches(run: Callable[[int], Any], count: int, batch: int, desc: str = "",
                  log_every_s: float = 30.0) -> tuple[Any, float]:
    """Runs `run(b)` (a batch of `batch` images, or a tuple whose first element is one) for the batches b that
    make `count` images; returns (the outputs concatenated and cut to `count`, images/s). The rate times the
    batches after the first (which may compile), or a second run of the only one. With `desc`, logs the images
    done, images/s and the ETA every `log_every_s` seconds and at the end."""
    num_batches = -(-count // batch)
    first = run(0)  # compiles
    start = last_log = time.perf_counter()
    rest = []
    for b in range(1, num_batches):
        rest.append(run(b))
        now = time.perf_counter()
        if desc and (now - last_log >= log_every_s or b == num_batches - 1):
            rate = b * batch / (now - start)
            logging.info("sampling %s: %d/%d images, %.1f images/s, ETA %.0f s", desc, min((b + 1) * batch, count),
                         count, rate, (num_batches - 1 - b) * batch / rate)
            last_log = now
    if not rest:
        run(0)
    rate = batch * max(num_batches - 1, 1) / (time.perf_counter() - start)
    outs = (first, *rest)
    if isinstance(first, tuple):
        return (np.concatenate([np.asarray(o[0]) for o in outs])[:count], [o[1] for o in outs]), rate
    return np.concatenate([np.asarray(o) for o in outs])[:count], rate


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any] | None:
    """Trains the denoiser (resumable), exports its EMA as `workdir/denoiser/bundle` and writes the report;
    returns the report, or None when the launch stopped early."""
    workdir = pathlib.Path(workdir)
    dtype = jnp.dtype(config.compute_dtype)
    mesh = parallel.make_mesh()
    dataset = data.load_dataset(config.data)
    num_classes = dataset.num_classes if config.conditional else 0
    if config.conditional and not num_classes:
        raise ValueError(f"config.conditional=True needs labels; the dataset {dataset.name!r} has none.")
    model, kwargs = model_from_block(config.denoiser, (dataset.resolution, dataset.channels, num_classes), dtype)
    train_cfg = config.denoiser.train
    tx = optim.make_optimizer(train_cfg.optimizer, train_cfg.num_steps)
    key = jax.random.key(config.seed)
    state = parallel.replicate(init_state(model, tx, jax.random.fold_in(key, 0)), mesh)
    step = make_train_step(model, tx, mesh, jax.random.fold_in(key, 1), p_mean=config.diffusion.p_mean,
                           p_std=config.diffusion.p_std, ema_decay=config.diffusion.ema_decay)
    writer = summaries.create_writer(workdir)
    eval_model = models.outside_data_parallel(model)
    preview = noise_levels(config.sampler, "heun", config.sampler.preview_steps)

    def write_samples(step_number: int, state: Any) -> None:
        x, _, _ = sample_batches(eval_model, parallel.to_host(state.ema), "heun", preview,
                                 config.sampler.preview_steps, GRID_SAMPLES, GRID_SAMPLES,
                                 jax.random.fold_in(key, PREVIEW_SEED_SALT))
        summaries.write_images(writer, workdir, step_number, {f"samples/heun_{config.sampler.preview_steps}": x},
                               columns=8)

    state, finished = run_phase(PHASE, config, workdir, state, step, dataset.train, train_cfg, mesh, writer,
                                loop.StepBudget(config.stop_after_steps), on_log=write_samples)
    if not finished:
        return None
    ema = parallel.to_host(state.ema)
    bundle = workdir / PHASE / "bundle"
    bundles.save_model_bundle(bundle, config.denoiser.model, kwargs, {"params": ema})
    out = evaluate(config, workdir, eval_model, ema, dataset, mesh, writer)
    out.update(steps=int(parallel.to_host(state.step)), bundle=str(bundle))
    report.write_report(workdir, "report", out, report_table(out))
    writer.flush()
    return out


def evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path, model: nn.Module, params: Any,
             dataset: data.Dataset, mesh: Any, writer: Any) -> dict[str, Any]:
    """Every sampler setting's samples, cost and (with a judge) quality; writes samples.png and fid_vs_nfe.png."""
    spec = model.spec
    x = jnp.zeros((8, spec.resolution, spec.resolution, spec.channels))
    labels = (jnp.zeros((8,), jnp.int32),) if spec.num_classes else ()
    flops = cost.flops_per_image(lambda p, x, s, *y: model.apply({"params": p}, x, s, *y), params, x, jnp.ones((8,)),
                                 *labels, batch_size=8)
    out: dict[str, Any] = {"dataset": dataset.name, "resolution": spec.resolution, "channels": spec.channels,
                           "num_classes": spec.num_classes, "params": cost.count_params(params),
                           "flops_per_evaluation": flops, "num_samples": config.eval.num_samples,
                           "sigma_min": config.sampler.sigma_min, "sigma_max": config.sampler.sigma_max,
                           "rho": config.sampler.rho, "device": cost.device_name(), "sampling": []}
    judged = judge_and_real(config, dataset, mesh)
    if judged is not None:
        out.update(num_real=len(judged[1]), real_split=config.eval.real_split, judge=str(config.eval.judge))
    key = jax.random.fold_in(jax.random.key(config.seed), EVAL_SEED_SALT)
    batch = min(config.eval_batch_size, -(-config.eval.num_samples // GRID_SAMPLES) * GRID_SAMPLES)
    grids = []
    for method in config.sampler.methods:
        for num_steps in config.sampler.steps:
            sigmas = noise_levels(config.sampler, method, num_steps)
            sampled, nfe, rate = sample_batches(model, params, method, sigmas, num_steps, config.eval.num_samples,
                                                batch, key, desc=f"{method} {num_steps}-step")
            row = {"method": method, "steps": int(num_steps), "nfe": nfe, "flops_per_image": nfe * flops,
                   "images_per_s": rate}
            if judged is not None:
                judge, real_pool, resolution = judged
                pool = judge_pool(judge, at_resolution(np.clip(sampled, -1, 1), resolution), config.eval_batch_size)
                row.update(quality_metrics(real_pool, {"feats": {"pool": pool}}, config.seed))
            out["sampling"].append(row)
            grids.append(images.to_uint8(sampled[:GRID_SAMPLES]))
            # TensorBoard's x axis is the NFE: each metric's curve against the network evaluations.
            writer.write_scalars(nfe, {f"eval/{method}/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
    if jax.process_index() == 0:
        grid = images.image_grid(np.concatenate(grids), columns=min(GRID_SAMPLES, config.eval.num_samples))
        images.save_png(workdir / "samples.png", grid)
        if judged is not None:
            plot_fid_against_nfe(out["sampling"], workdir / "fid_vs_nfe.png")
    return out


def plot_fid_against_nfe(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    """FID (and KID) against NFE, one line per sampler, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        for ax, metric in zip(axes, ("fid", "kid_mean")):
            ax.plot([r["nfe"] for r in mine], [r[metric] for r in mine], marker="o", label=method)
    for ax, metric in zip(axes, ("FID", "KID")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE (network evaluations per image)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_table(out: dict[str, Any]) -> str:
    """The markdown table of the report: one row per sampler setting."""
    judged = "judge" in out
    rows = []
    for r in out["sampling"]:
        row = [r["method"], str(r["steps"]), str(r["nfe"])]
        if judged:
            row += [f"{r['fid']:.2f}", f"{r['kid_mean']:.4f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}"]
        rows.append(row + [f"{r['flops_per_image'] / 1e6:.1f}", f"{r['images_per_s']:.1f}"])
    header = ["sampler", "steps", "NFE"] + (["FID", "KID", "precision", "recall"] if judged else []) + [
        "MFLOPs/image", "images/s"]
    text = report.markdown_table(header, rows)
    text += (f"\n\nEDM denoiser, {out['params']:,} parameters, {out['flops_per_evaluation'] / 1e6:.1f} MFLOPs per "
             f"evaluation, trained {out['steps']} steps on {out['dataset']} at {out['resolution']}x{out['resolution']}"
             f"x{out['channels']}; {out['num_samples']} samples per row from the same noise (sigma from "
             f"{out['sigma_max']} to {out['sigma_min']}, rho {out['rho']}; DDIM on DDPM's levels); images/s on "
             f"{out['device']}.")
    if judged:
        text += (f" FID/KID against {out['num_real']} real images ('{out['real_split']}') in the judge's 'pool' "
                 f"features ({out['judge']}).")
    return text
