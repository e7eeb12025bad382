"""Knowledge distillation of an autoregressive image model: a large PixelCNN teacher into a small one.

The task `pixelcnn_kd` runs its phases, each resumable, in `workdir/PHASE/`:
1. `teacher`: a PixelCNN trained on the data by maximum likelihood, or the frozen bundle
   `config.teacher.checkpoint`;
2. `student_kd` (word-level KD): the student trained on the data with, at every pixel and channel,
   `alpha * CE(z_s, x) + (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))` (`losses.pixel_kd`);
3. `student_seq` (sequence-level KD, Kim & Rush 2016; when `config.kd.sequence_samples > 0`): the student
   trained by maximum likelihood on that many samples of the teacher (drawn once, stored in
   `workdir/teacher_samples.npz`), with no real image: data-free;
4. `student_scratch`: the same student, same budget and seed, by maximum likelihood on the data.
Each phase's variables are exported as a model bundle in `workdir/PHASE/bundle`. The report
(`report.md`, `report.json`) gives each model's held-out negative log-likelihood in bits/dim (exact: the
model's own probability of every test image, mean and standard error over the images), the same on the
validation split when one is carved out, parameters, FLOPs per forward pass and per sampled image (R * R * C
passes), and sampling images/s; `samples.png` shows samples of every model (rows: teacher, KD, ...). With a
judge (`config.eval.judge`), every model's `config.eval.num_samples` samples get FID, KID and
precision/recall/density/coverage against the real images in the judge's features, as
`kdjax.evaluation.generators` scores generators (samples smaller than the judge's input are upsampled by the
data path's own resize, as the real images are).

With `config.vqvae` set (`kdjax/tasks/vqvae_codes.py`, e.g. `configs/vqvae_prior_kd.py`), a VQ-VAE phase comes
first (or its bundle) and every PixelCNN above models its codes instead of the pixels (levels = the codebook
size): the teacher is a prior over codes, KD is per code, and samples are decoded before they are scored.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from kdjax import models
from kdjax.core import data, images, optim, parallel, summaries
from kdjax.evaluation import cost, report
from kdjax.evaluation.generators import REAL_SPLITS, judge_pool, quality_metrics, real_set
from kdjax.models import bundles
from kdjax.models.pixelcnn import sample, to_levels
from kdjax.steps import loop
from kdjax.steps.autoregressive import make_bits_per_image, make_train_step
from kdjax.steps.state import TrainState
from kdjax.tasks import checks, vqvae_codes
from kdjax.tasks.phase import model_from_block, run_phase

STUDENT_PHASES = ("student_kd", "student_seq", "student_scratch")
SAMPLE_BATCH = 64  # samples drawn per call (the sampling images/s is measured at this batch)
GRID_SAMPLES = 16  # samples per model in samples.png


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates a `pixelcnn_kd` config before any compute (raises ValueError naming the field)."""
    data.check_data_config(config.data)
    for role in ("teacher", "student"):
        if "levels" in config[role].kwargs:
            raise ValueError(f"config.{role}.kwargs.levels: leave it out; config.levels sets it for every model.")
        checks.check_model_block(config[role], f"config.{role}", "autoregressive", taken_from="the dataset")
        checks.check_phase(config[role].train, f"config.{role}.train")
    if config.teacher.checkpoint:
        meta = bundles.check_model_bundle(config.teacher.checkpoint, "config.teacher.checkpoint",
                                          kind="autoregressive")
        kw = meta["kwargs"]
        if kw.get("levels") != config.levels:
            raise ValueError(f"config.teacher.checkpoint models {kw.get('levels')} levels; config.levels="
                             f"{config.levels}. Set config.levels to the teacher's.")
        res, ch, (what, fields) = prior_data_shape(config)
        if (kw.get("resolution"), kw.get("channels")) != (res, ch):
            raise ValueError(f"config.teacher.checkpoint models {kw.get('resolution')}x{kw.get('resolution')}x"
                             f"{kw.get('channels')} {what}; the data is {res}x{res}x{ch} ({fields}).")
        if bool(kw.get("num_classes")) != bool(config.conditional):
            raise ValueError(f"config.teacher.checkpoint is {'' if kw.get('num_classes') else 'un'}conditional; "
                             f"config.conditional={config.conditional}.")
    if not 2 <= config.levels <= 256:
        raise ValueError(f"config.levels={config.levels} must be in [2, 256] (intensity levels per channel).")
    checks.check_fraction(config.kd.alpha, "config.kd.alpha")
    if not config.kd.temperature > 0:
        raise ValueError(f"config.kd.temperature={config.kd.temperature} must be > 0.")
    if config.kd.sequence_samples < 0:
        raise ValueError(f"config.kd.sequence_samples={config.kd.sequence_samples} must be >= 0 (0: no "
                         "sequence-level phase).")
    if config.vqvae.model or config.vqvae.checkpoint:
        vqvae_codes.check_config(config)
    check_eval(config)


def check_eval(config: ml_collections.ConfigDict) -> None:
    """`config.eval`: sample counts, the judge bundle, the real split."""
    cfg = config.eval
    if cfg.num_samples < 1:
        raise ValueError(f"config.eval.num_samples={cfg.num_samples} must be >= 1.")
    if cfg.judge:
        meta = bundles.check_model_bundle(cfg.judge, "config.eval.judge", kind="classifier")
        if len(meta.get("input_shape") or ()) != 3:
            raise ValueError(f"config.eval.judge={cfg.judge!r}: its model.json records no input_shape, so the size "
                             "to score images at is unknown; use a judge bundle written by classifier_kd.")
        if meta["input_shape"][2] != config.data.channels:
            raise ValueError(f"config.eval.judge takes {meta['input_shape'][2]}-channel images; the data has "
                             f"{config.data.channels} (config.data.channels).")
        if cfg.real_split not in REAL_SPLITS:
            raise ValueError(f"config.eval.real_split={cfg.real_split!r}; valid: {list(REAL_SPLITS)}.")


def prior_data_shape(config: ml_collections.ConfigDict) -> tuple[int, int, tuple[str, str]]:
    """(resolution, channels, (what they are, the fields that set them)) of the arrays the PixelCNNs model:
    the images, or the VQ-VAE's grid of codes."""
    if config.vqvae.model or config.vqvae.checkpoint:
        return vqvae_codes.code_shape(config)[0], 1, ("codes", "the VQ-VAE's code grid, config.vqvae")
    return config.data.resolution, config.data.channels, ("images", "config.data.resolution, .channels")


def conditional(model: nn.Module) -> bool:
    return model.spec.num_classes > 0


def train_phase(name: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, model: nn.Module,
                source: Sequence[dict], mesh: Mesh, writer, budget: loop.StepBudget,
                teacher: tuple[nn.Module, Any] | None = None) -> tuple[Any, bool]:
    """Trains one PixelCNN phase on `source`; returns (variables, finished)."""
    train_cfg = config.teacher.train if name == "teacher" else config.student.train
    tx = optim.make_optimizer(train_cfg.optimizer, train_cfg.num_steps)
    spec = model.spec
    init_model = models.outside_data_parallel(model)
    # Every student phase starts from the same initialisation (same seed), the teacher from another.
    init_key = jax.random.fold_in(jax.random.key(config.seed), 0 if name == "teacher" else 1)
    x = jnp.zeros((1, spec.resolution, spec.resolution, spec.channels))
    labels = (jnp.zeros((1,), jnp.int32),) if conditional(model) else ()
    variables = jax.jit(lambda k: init_model.init(k, x, *labels))(init_key)
    state = parallel.replicate(TrainState.create(variables, tx), mesh)
    teacher_model, teacher_variables = teacher if teacher is not None else (None, {})
    step = make_train_step(model, tx, mesh, conditional(model), teacher_model, config.kd.alpha,
                           config.kd.temperature)
    state, finished = run_phase(name, config, workdir, state, lambda s, b: step(s, b, teacher_variables), source,
                                train_cfg, mesh, writer, budget)
    return state.variables(), finished


def draw_samples(model: nn.Module, variables: Any, key: jax.Array, count: int, batch: int) -> np.ndarray:
    """`count` samples (integer levels, (count, R, R, C)) in batches of `batch`, labels cycling over the
    classes for a conditional model; `fold_in(key, i)` for batch i."""
    model = models.outside_data_parallel(model)
    fn = jax.jit(lambda v, k, y: sample(model, v, k, batch, y))
    out = []
    for i in range(-(-count // batch)):
        labels = (jnp.arange(i * batch, (i + 1) * batch) % model.spec.num_classes) if conditional(model) else None
        out.append(np.asarray(fn(variables, jax.random.fold_in(key, i), labels)))
    return np.concatenate(out)[:count]


def levels_to_uint8(levels: np.ndarray, num_levels: int) -> np.ndarray:
    """Integer levels -> the 8-bit images kdjax's data sources hold (`pixelcnn.to_levels` inverts it)."""
    return np.round(levels * (255.0 / (num_levels - 1))).astype(np.uint8)


def teacher_samples(config: ml_collections.ConfigDict, workdir: pathlib.Path, teacher: tuple[nn.Module, Any]
                    ) -> data.ArraySource:
    """The sequence-level phase's data: `config.kd.sequence_samples` teacher samples, drawn once and kept in
    `workdir/teacher_samples.npz` (so a resumed run trains on the same ones)."""
    path = workdir / "teacher_samples.npz"
    model, variables = teacher
    if path.is_file():
        stored = np.load(path)
        levels, labels = stored["levels"], stored["labels"]
    else:
        levels = draw_samples(model, variables, jax.random.fold_in(jax.random.key(config.seed), 7),
                              config.kd.sequence_samples, config.eval_batch_size)
        num_classes = model.spec.num_classes
        labels = (np.arange(len(levels)) % num_classes if num_classes else np.zeros(len(levels))).astype(np.int32)
        if jax.process_index() == 0:
            np.savez(path, levels=levels, labels=labels)
    return data.ArraySource(levels_to_uint8(levels, config.levels), labels)


def held_out_bits(model: nn.Module, variables: Any, split: Sequence[dict], mesh: Mesh, batch_size: int) -> np.ndarray:
    """Bits/dim of every image of a split (padding removed)."""
    fn = make_bits_per_image(models.outside_data_parallel(model), mesh, conditional(model))
    out = []
    for batch in data.eval_batches(split, batch_size):
        mask = parallel.to_host(parallel.global_batch(batch["mask"], mesh)) > 0
        bits = fn(variables, parallel.global_batch(batch["image"], mesh), parallel.global_batch(batch["label"], mesh))
        out.append(parallel.to_host(bits)[mask])
    return np.concatenate(out)


def model_cost(model: nn.Module, variables: Any, batch: int) -> dict[str, float]:
    """Parameters, FLOPs per forward pass and per sampled image, and sampling images/s (batch `batch`)."""
    model = models.outside_data_parallel(model)
    spec = model.spec
    x = jnp.zeros((batch, spec.resolution, spec.resolution, spec.channels))
    labels = (jnp.zeros((batch,), jnp.int32),) if conditional(model) else ()
    forward = cost.flops_per_image(lambda v, x, *y: model.apply(v, x, *y), variables, x, *labels, batch_size=batch)
    fn = jax.jit(lambda v, k: sample(model, v, k, batch, labels[0] if labels else None))
    jax.block_until_ready(fn(variables, jax.random.key(0)))
    start = time.perf_counter()
    jax.block_until_ready(fn(variables, jax.random.key(1)))
    seconds = time.perf_counter() - start
    passes = spec.resolution * spec.resolution * spec.channels
    return {"params": cost.count_params(variables), "flops_per_forward": forward,
            "flops_per_sample": forward * passes, "sample_images_per_s": batch / seconds}


def judge_and_real(config: ml_collections.ConfigDict, dataset: data.Dataset, mesh: Mesh
                   ) -> tuple[tuple[nn.Module, Any], np.ndarray, int] | None:
    """(judge, its 'pool' features of the real set, the judge's resolution), or None without a judge. The real
    set is `config.eval.real_split` of the data at the judge's resolution (loaded again at that size when
    the data is smaller, as the data path resizes: bicubic)."""
    if not config.eval.judge:
        return None
    model, variables, meta = bundles.load_model(config.eval.judge, "config.eval.judge", mesh)
    resolution = int(meta["input_shape"][0])
    if resolution != dataset.resolution:
        cfg = ml_collections.ConfigDict(config.data.to_dict())
        cfg.resolution = resolution
        dataset = data.load_dataset(cfg)
    judge = (model, parallel.to_host(variables))
    return judge, judge_pool(judge, real_set(dataset, config.eval.real_split), config.eval_batch_size), resolution


def at_resolution(images_m11: np.ndarray, resolution: int) -> np.ndarray:
    """Images in [-1, 1] -> the same at `resolution`, through the data path's 8-bit bicubic resize."""
    if images_m11.shape[1] == resolution:
        return images_m11
    u8 = images.to_uint8(images_m11)
    return images.to_model_range(np.stack([data.prepare_image(im, resolution, im.shape[-1]) for im in u8]))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any] | None:
    """Runs the phases and the evaluation; returns the report (None if stopped early)."""
    workdir = pathlib.Path(workdir)
    dtype = jnp.dtype(config.compute_dtype)
    mesh = parallel.make_mesh()
    image_data = data.load_dataset(config.data)
    writer = summaries.create_writer(workdir)
    budget = loop.StepBudget(config.stop_after_steps)

    dataset, autoencoder, vq_figures = image_data, None, {}
    if config.vqvae.model or config.vqvae.checkpoint:  # the PixelCNNs model the VQ-VAE's codes
        ae_model, ae_vars, finished = vqvae_codes.train_or_load(config, workdir, image_data, mesh, writer, budget)
        if not finished:
            return None
        autoencoder = (models.outside_data_parallel(ae_model), parallel.to_host(ae_vars))
        dataset, vq_figures = vqvae_codes.code_dataset(ae_model, ae_vars, image_data, mesh, config.eval_batch_size)
    shape = (dataset.resolution, dataset.channels, dataset.num_classes if config.conditional else 0)

    if config.teacher.checkpoint:
        teacher_model, teacher_vars, _ = bundles.load_model(config.teacher.checkpoint, "config.teacher.checkpoint",
                                                            mesh, dtype=dtype)
    else:
        teacher_model, kwargs = model_from_block(config.teacher, shape, dtype, levels=config.levels)
        teacher_vars, finished = train_phase("teacher", config, workdir, teacher_model, dataset.train, mesh, writer,
                                             budget)
        if not finished:
            return None
        bundles.save_model_bundle(workdir / "teacher" / "bundle", config.teacher.model, kwargs, teacher_vars)
    trained = {"teacher": (teacher_model, teacher_vars)}

    student, student_kwargs = model_from_block(config.student, shape, dtype, levels=config.levels)
    phases = [("student_kd", dataset.train, (teacher_model, teacher_vars))]
    if config.kd.sequence_samples:
        phases.append(("student_seq", teacher_samples(config, workdir, trained["teacher"]), None))
    phases.append(("student_scratch", dataset.train, None))
    for phase, source, teacher in phases:
        variables, finished = train_phase(phase, config, workdir, student, source, mesh, writer, budget, teacher)
        if not finished:
            return None
        trained[phase] = (student, variables)
        bundles.save_model_bundle(workdir / phase / "bundle", config.student.model, student_kwargs, variables)

    out: dict[str, Any] = {"dataset": dataset.name, "levels": config.levels,
                           "num_test_examples": int(len(dataset.test)),
                           "num_validation_examples": int(len(dataset.validation)),
                           "kd": {"alpha": config.kd.alpha, "temperature": config.kd.temperature,
                                  "sequence_samples": config.kd.sequence_samples}}
    judged = judge_and_real(config, image_data, mesh)
    if autoencoder is not None:
        out["vqvae"] = vqvae_summary(autoencoder, vq_figures, dataset, judged, config)
    if judged is not None:
        out.update(num_samples=config.eval.num_samples, num_real=int(len(judged[1])),
                   real_split=config.eval.real_split, judge=str(config.eval.judge))

    def to_images(levels: np.ndarray) -> np.ndarray:  # sampled levels -> images in [-1, 1] at the data's size
        if autoencoder is not None:
            return vqvae_codes.decode(*autoencoder, levels, config.eval_batch_size)
        return images.to_model_range(levels_to_uint8(levels, config.levels))

    key = jax.random.fold_in(jax.random.key(config.seed), 9)
    grids = []
    for phase, (model, variables) in trained.items():
        bits = held_out_bits(model, variables, dataset.test, mesh, config.eval_batch_size)
        out[phase] = {"test_bits_per_dim": float(bits.mean()),
                      "test_bits_per_dim_sem": float(bits.std(ddof=1) / np.sqrt(len(bits))),
                      **model_cost(model, variables, SAMPLE_BATCH)}
        if len(dataset.validation):
            out[phase]["validation_bits_per_dim"] = float(
                held_out_bits(model, variables, dataset.validation, mesh, config.eval_batch_size).mean())
        sampled = to_images(draw_samples(model, variables, key, config.eval.num_samples, SAMPLE_BATCH))
        grids.append(images.to_uint8(sampled[:GRID_SAMPLES]))
        if judged is not None:
            (judge, real_pool, resolution) = judged
            pool = judge_pool(judge, at_resolution(sampled, resolution), config.eval_batch_size)
            out[phase].update(quality_metrics(real_pool, {"feats": {"pool": pool}}, config.seed))
    if jax.process_index() == 0:
        grid = images.image_grid(np.concatenate(grids), columns=GRID_SAMPLES)
        scale = max(1, 256 // (GRID_SAMPLES * image_data.resolution))  # nearest-neighbour: 8x8 digits visible
        images.save_png(workdir / "samples.png", np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1))
    writer.write_scalars(config.student.train.num_steps,
                         {f"eval/{p}/{k}": v for p in trained for k, v in out[p].items()})
    writer.flush()
    report.write_report(workdir, "report", out, report_table(out, list(trained)))
    return out


def vqvae_summary(autoencoder: tuple[nn.Module, Any], figures: dict[str, float], codes: data.Dataset,
                  judged, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The VQ-VAE's figures: reconstruction MSE per split, code usage, decoder cost, and (with a judge) FID/KID
    of its reconstructions of the real set (the codes already encoded in `codes`, decoded): the ceiling of any
    prior's samples through this decoder."""
    model, variables = autoencoder
    spec = model.spec
    real_codes = np.asarray(to_levels(real_set(codes, config.eval.real_split), spec.num_codes))
    out: dict[str, Any] = {**figures, "num_codes": spec.num_codes, "code_resolution": spec.code_resolution,
                           "params": cost.count_params(variables), "codes_used": int(len(np.unique(real_codes))),
                           "decoder_flops": cost.flops_per_image(
                               lambda v, c: model.apply(v, c, method=type(model).decode_codes), variables,
                               np.zeros((8, spec.code_resolution, spec.code_resolution), np.int32), batch_size=8)}
    if judged is not None:
        judge, real_pool, resolution = judged
        recon = vqvae_codes.decode(model, variables, real_codes, config.eval_batch_size)
        pool = judge_pool(judge, at_resolution(recon, resolution), config.eval_batch_size)
        out["reconstruction_quality"] = quality_metrics(real_pool, {"feats": {"pool": pool}}, config.seed)
    return out


def report_table(out: dict[str, Any], phases: Sequence[str]) -> str:
    """The markdown table of the report (FID/KID columns when a judge scored the samples)."""
    judged = "fid" in out[phases[0]]
    rows = []
    for p in phases:
        row = [p, f"{out[p]['test_bits_per_dim']:.4f} +- {out[p]['test_bits_per_dim_sem']:.4f}"]
        if judged:
            row += [f"{out[p]['fid']:.2f}", f"{out[p]['kid_mean']:.4f}"]
        rows.append(row + [f"{out[p]['params']:,}", f"{out[p]['flops_per_forward'] / 1e6:.2f}",
                           f"{out[p]['flops_per_sample'] / 1e6:.1f}", f"{out[p]['sample_images_per_s']:.1f}"])
    header = ["model", "test bits/dim (+- s.e.)"] + (["FID", "KID"] if judged else []) + [
        "parameters", "MFLOPs/forward", "MFLOPs/sample", "samples/s"]
    kd = out["kd"]
    what = "" if "vqvae" in out else " images"  # the codes dataset's name says what it holds
    text = (report.markdown_table(header, rows)
            + f"\n\n{out['num_test_examples']} held-out {out['dataset']}{what} at {out['levels']} levels; "
            f"alpha = {kd['alpha']}, T = {kd['temperature']}; samples.png rows: {', '.join(phases)}.")
    if judged:
        text += (f" FID/KID: {out['num_samples']} samples per model against the {out['num_real']} real images "
                 f"('{out['real_split']}') in the judge's 'pool' features ({out['judge']}).")
    if "vqvae" in out:
        vq = out["vqvae"]
        text += (f"\n\nVQ-VAE: {vq['num_codes']} codes on a {vq['code_resolution']}x{vq['code_resolution']} grid, "
                 f"{vq['params']:,} parameters; test reconstruction MSE {vq['test_reconstruction_mse']:.4f} "
                 f"(images in [-1, 1]); decoder {vq['decoder_flops'] / 1e6:.1f} MFLOPs per image (add it to "
                 "every model's MFLOPs/sample).")
        if "reconstruction_quality" in vq:
            rq = vq["reconstruction_quality"]
            text += (f" Its reconstructions of the real set: FID {rq['fid']:.2f}, KID {rq['kid_mean']:.4f} (the "
                     f"ceiling for samples through this decoder); {vq['codes_used']} of {vq['num_codes']} codes used.")
    return text
