"""A VAE teacher whose decoder and encoder are distilled into tiny ones, TAESD-style.

The task `vae_kd` trains on images x in [-1, 1]: random crops of the training photographs (`config.data` a
`photos_data_config`: the split is by whole photograph, `kdjax.core.photos`) or the training split of a
dataset (`config.data` a `data_config`, e.g. digits; told apart by the block's `crop` field). Its phases, each
resumable, run in `workdir/PHASE/` and export `workdir/PHASE/bundle`:
1. `teacher`: the VAE (`kdjax.models.vae`) trained on L(D(z), x) + beta * KL (`kdjax.steps.vae`), or with a
   quantised latent (`teacher.kwargs.num_codes` > 0) on L(D(z_q), x) + beta * commitment with an EMA codebook
   (`kdjax.steps.vqvae`), or the frozen bundle `config.teacher.checkpoint`;
2. `tiny_decoder_kd`: the tiny decoder (`kdjax.models.tiny_autoencoder`) on the teacher's latents z =
   mu_T(x) (z_q when quantised): w_teacher * L1(D_s(z), D_T(z)) + w_target * L1(D_s(z), x), and TAESD's optional
   perceptual term (a judge's features, `kd.w_perceptual`, `kd.judge`) and adversarial term (`kd.w_adv`,
   `kdjax.tasks.image_adversary`);
3. `tiny_decoder_scratch`: the same decoder, same initialisation and budget, on L1(D_s(z), x) alone;
4. `tiny_encoder`: the tiny encoder on MSE(E_s(x), mu_T(x)).
The tiny halves take `latent_channels` and `factor` from the teacher and `channels` from the data.

The report (`report.md`, `report.json`) scores the reconstructions of the held-out images (photographs whole,
centre-cropped to multiples of the factor and to at most `config.data.eval_max_side`; the test split of a
dataset) through five encoder + decoder pipelines (`PIPELINES`): PSNR and SSIM against the ground truth
(`kdjax.evaluation.restoration.restoration_metrics`: 8-bit, Y channel for RGB, no border shaved; means over the
images), PSNR and L1 against the teacher's reconstruction, and the tiny encoder's latent MSE; the tiny decoder
at initialisation (`tiny_decoder_init`, the same pipeline as tiny_decoder_kd); the cost of each decoder and
encoder (parameters, FLOPs per image and images/s at COST_SIDE-pixel images, in the compute dtype). With
`validation_fraction` > 0 (or, on photographs, `extra_validation`) the same scores on the validation images
(`validation`). Models are evaluated in
float32. `crops.png` shows the same crop of a few test images through the pipelines.
"""

from __future__ import annotations

import itertools
import pathlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from kdjax import models
from kdjax.core import data, images, optim, parallel, photos, summaries
from kdjax.evaluation import cost, report
from kdjax.evaluation.restoration import restoration_metrics
from kdjax.models import bundles
from kdjax.steps import loop
from kdjax.steps.state import TrainState
from kdjax.steps.restoration import init_discriminator
from kdjax.steps.vae import RECONSTRUCTION, TinyDistillation, make_distill_step, make_vae_step
from kdjax.steps.vqvae import make_train_step as make_vqvae_step
from kdjax.tasks import checks
from kdjax.tasks.image_adversary import adversary, check_adversary
from kdjax.tasks.phase import model_from_block, run_phase

PHASES = ("teacher", "tiny_decoder_kd", "tiny_decoder_scratch", "tiny_encoder")
# report row -> (encoder, decoder): which trained model encodes and which decodes.
PIPELINES = {"teacher": ("teacher", "teacher"), "tiny_decoder_kd": ("teacher", "tiny_decoder_kd"),
             "tiny_decoder_scratch": ("teacher", "tiny_decoder_scratch"), "tiny_encoder": ("tiny_encoder", "teacher"),
             "tiny_encoder_decoder": ("tiny_encoder", "tiny_decoder_kd")}
TINY = {"tiny_decoder": "latent_decoder", "tiny_encoder": "latent_encoder"}  # config block -> model kind
SSIM_WINDOW = 11  # SSIM's Gaussian window: an evaluated image keeps at least this many pixels a side
COST_SIDE = 64  # FLOPs and images/s at images of (COST_SIDE // factor * factor) pixels a side
COST_BATCH = 16  # the batch images/s is timed at
CROP_IMAGES = 4  # test images shown in crops.png
CROP_SIDE = 64  # side of the crop shown, at most
CROP_COLUMNS = ("ground truth", "teacher", "tiny_decoder_kd", "tiny_decoder_scratch", "tiny_encoder_decoder")
TRAINING_ONLY = ("discriminator",)  # model state a phase trains with but does not export


# ----------------------------------------------------------------------------------------- config
def uses_photos(config: ml_collections.ConfigDict) -> bool:
    """Whether `config.data` is a `photos_data_config` (it has `crop`) rather than a `data_config`."""
    return "crop" in config.data


def train_side(config: ml_collections.ConfigDict) -> int:
    """The side of the training images: the crop of photographs, a dataset's resolution."""
    return config.data.crop if uses_photos(config) else config.data.resolution


def build_teacher(config: ml_collections.ConfigDict, dtype: Any) -> tuple[nn.Module, dict[str, Any]]:
    """(module, bundle kwargs) of `config.teacher` for the data's channels."""
    return model_from_block(config.teacher, (0, config.data.channels, 0), dtype)


def build_tiny(config: ml_collections.ConfigDict, role: str, spec: models.LatentAutoencoderSpec, dtype: Any
               ) -> tuple[nn.Module, dict[str, Any]]:
    """(module, bundle kwargs) of `config.tiny_decoder` or `config.tiny_encoder` for the teacher's `spec`."""
    return model_from_block(config[role], (0, spec.channels, 0), dtype, latent_channels=spec.latent_channels,
                            factor=spec.factor)


def check_builds(model: nn.Module, args: tuple[jax.Array, ...], field: str) -> None:
    """The model initialises on `args` (`jax.eval_shape`: nothing is computed), or a ValueError naming `field`."""
    try:
        jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from e


def teacher_spec(config: ml_collections.ConfigDict) -> models.LatentAutoencoderSpec:
    """The teacher's spec, from its bundle or its block (checked, without compute)."""
    channels = config.data.channels
    if config.teacher.checkpoint:
        meta = bundles.check_model_bundle(config.teacher.checkpoint, "config.teacher.checkpoint",
                                          kind="latent_autoencoder")
        spec = models.build_model(meta["model"], **meta["kwargs"]).spec
        if spec.channels != channels:
            raise ValueError(f"config.teacher.checkpoint ({meta['model']!r}) encodes {spec.channels}-channel images; "
                             f"the data has {channels} (config.data.channels).")
        return spec
    checks.check_model_block(config.teacher, "config.teacher", "latent_autoencoder", taken_from="config.data.channels")
    checks.check_phase(config.teacher.train, "config.teacher.train")
    if config.teacher.recon not in RECONSTRUCTION:
        raise ValueError(f"config.teacher.recon={config.teacher.recon!r}; valid: {sorted(RECONSTRUCTION)}.")
    if not config.teacher.beta >= 0:
        raise ValueError(f"config.teacher.beta={config.teacher.beta} must be >= 0 (the KL term's weight, or the "
                         "commitment term's with a quantised latent).")
    checks.check_fraction(config.teacher.vq_decay, "config.teacher.vq_decay", closed_high=False)
    teacher = build_teacher(config, jnp.float32)[0]
    spec = teacher.spec
    check_builds(teacher, (jnp.zeros((1, spec.factor, spec.factor, channels)),), "config.teacher.kwargs")
    return spec


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates a `vae_kd` config before any compute (raises ValueError naming the field)."""
    if uses_photos(config):
        photos.check_photos_config(config.data)
    else:
        data.check_data_config(config.data)
    spec = teacher_spec(config)
    side, field = train_side(config), "config.data.crop" if uses_photos(config) else "config.data.resolution"
    if side % spec.factor or side < SSIM_WINDOW:
        raise ValueError(f"{field}={side} must be a multiple of the teacher's downsampling factor {spec.factor} and "
                         f">= {SSIM_WINDOW} (the SSIM window).")
    for role, kind in TINY.items():
        block = config[role]
        checks.check_model_block(block, f"config.{role}", kind,
                                 taken_from="config.data.channels and the teacher (its latent_channels and factor)",
                                 also_taken=("latent_channels", "factor"))
        checks.check_phase(block.train, f"config.{role}.train")
        model = build_tiny(config, role, spec, jnp.float32)[0]
        shape = (1, 2, 2, spec.latent_channels) if kind == "latent_decoder" else (1, spec.factor, spec.factor,
                                                                                  spec.channels)
        check_builds(model, (jnp.zeros(shape),), f"config.{role}.kwargs")
    for name in ("w_teacher", "w_target"):
        if not config.kd[name] >= 0:
            raise ValueError(f"config.kd.{name}={config.kd[name]} must be >= 0 (0 turns the term off).")
    if config.kd.w_teacher + config.kd.w_target <= 0:
        raise ValueError("config.kd.w_teacher and config.kd.w_target are both 0: the tiny decoder would learn "
                         "nothing; set at least one > 0.")
    if not config.kd.w_perceptual >= 0:
        raise ValueError(f"config.kd.w_perceptual={config.kd.w_perceptual} must be >= 0 (0 turns the term off).")
    if config.kd.w_perceptual > 0:
        check_judge(config, side)
    check_adversary(config.kd, side, config.data.channels, field)


def check_judge(config: ml_collections.ConfigDict, side: int) -> None:
    """The perceptual term's judge: a classifier bundle whose input is the training images (side, channels)."""
    if not config.kd.judge:
        raise ValueError(f"config.kd.w_perceptual={config.kd.w_perceptual} needs config.kd.judge, a classifier bundle "
                         "taking the training images (e.g. kdjax/pretrained/digits32/judge for :digits).")
    meta = bundles.check_model_bundle(config.kd.judge, "config.kd.judge", kind="classifier")
    judged = tuple(meta.get("input_shape", ()))
    if judged != (side, side, config.data.channels):
        raise ValueError(f"config.kd.judge={config.kd.judge!r} takes images of shape {judged}; the training images "
                         f"are {(side, side, config.data.channels)}.")


# ----------------------------------------------------------------------------------------- data
def crop_batches(train_photos: Sequence[np.ndarray], crop: int, global_batch_size: int, seed: int
                 ) -> Callable[[int], Iterator[dict[str, np.ndarray]]]:
    """`start step -> iterator of {"image"}`: this process's rows of global batch s, the random crops
    `photos.random_crops(train_photos, crop, s, seed, global_batch_size)` in [-1, 1] (a pure function of
    (seed, s))."""
    local = global_batch_size // jax.process_count()
    rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)

    def iterate(start: int) -> Iterator[dict[str, np.ndarray]]:
        for step in itertools.count(start):
            crops = photos.random_crops(train_photos, crop, step, seed, global_batch_size)[rows]
            yield {"image": images.to_model_range(crops)}

    return iterate


def load_images(config: ml_collections.ConfigDict, factor: int
                ) -> tuple[Callable[[int], Callable[[int], Iterator[dict]]], list[np.ndarray], list[np.ndarray]]:
    """(global batch size -> training batches by start step, validation arrays, test arrays): the evaluation
    images as a list of (B, H, W, C) float32 arrays in [-1, 1], one per photograph (centre-cropped to a multiple
    of `factor` and at most `eval_max_side`) or batches of `config.eval_batch_size` images of a dataset."""
    cfg = config.data
    if uses_photos(config):
        train, validation, test = photos.load_splits(cfg)
        batches = lambda size: crop_batches(train, cfg.crop, size, config.seed)
        whole = lambda ims: [images.to_model_range(photos.eval_crop(im, factor, cfg.eval_max_side)[None])
                             for im in ims]
        return batches, whole(validation), whole(test)
    dataset = data.load_dataset(cfg)

    def batches(size: int) -> Callable[[int], Iterator[dict]]:
        return data.TrainBatches(dataset.train, size, seed=config.seed, num_threads=cfg.num_threads).iterate

    def chunks(split: Sequence[dict]) -> list[np.ndarray]:
        every, size = (data.all_images(split) if len(split) else []), config.eval_batch_size
        return [every[i:i + size] for i in range(0, len(every), size)]

    return batches, chunks(dataset.validation), chunks(dataset.test)


# ----------------------------------------------------------------------------------------- training
def initial_variables(model: nn.Module, input_shape: tuple[int, ...], key: jax.Array) -> dict[str, Any]:
    """A model's initial variables for inputs of `input_shape` (jitted init; the key is an explicit draw)."""
    init_model = models.outside_data_parallel(model)
    return jax.device_get(jax.jit(lambda k: init_model.init(k, jnp.zeros(input_shape, jnp.float32)))(key))


def initial_params(model: nn.Module, input_shape: tuple[int, ...], key: jax.Array) -> Any:
    """A model's initial parameters for inputs of `input_shape` (`initial_variables`' "params")."""
    return initial_variables(model, input_shape, key)["params"]


def train_phase(phase: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, train_cfg, params: Any,
                make_step: Callable, batches: Callable, mesh: Mesh, writer, budget: loop.StepBudget,
                constants: tuple[Any, ...] = (), model_state: Mapping[str, Any] | None = None
                ) -> tuple[dict[str, Any], bool]:
    """Trains one phase from `params` and `model_state` (e.g. {"discriminator": ...}; `make_step(tx)` builds its
    step; `constants` its frozen arguments); returns (the model's variables, finished)."""
    tx = optim.make_optimizer(train_cfg.optimizer, train_cfg.num_steps)
    state = parallel.replicate(TrainState.create({"params": params, **(model_state or {})}, tx), mesh)
    step = make_step(tx)
    state, finished = run_phase(phase, config, workdir, state, lambda s, b: step(s, b, *constants), (), train_cfg,
                                mesh, writer, budget, batches=batches(train_cfg.batch_size))
    kept = {k: v for k, v in state.model_state.items() if k not in TRAINING_ONLY}  # e.g. a VQ teacher's codebook
    return {"params": state.params, **kept}, finished


# ----------------------------------------------------------------------------------------- evaluation
def forwards(trained: Mapping[str, tuple[nn.Module, Any]]) -> dict[str, Callable]:
    """Jitted float32 forward passes outside the data-parallel step (compiled once per input size):
    "encode_teacher" (x -> mu_T, or z_q when quantised), "decode_teacher" (z -> D_T(z)), "snap_teacher" (a latent
    onto the teacher's latent space: itself, or its nearest codes), "decode_tiny" (z -> D_s(z), any tiny decoder's
    variables), "encode_tiny" (x -> E_s(x))."""
    f32 = lambda name: models.outside_data_parallel(trained[name][0]).clone(dtype=jnp.float32)
    teacher, decoder, encoder = f32("teacher"), f32("tiny_decoder_kd"), f32("tiny_encoder")
    return {"encode_teacher": jax.jit(lambda v, x: teacher.apply(v, x, method=type(teacher).encode)[0]),
            "decode_teacher": jax.jit(lambda v, z: teacher.apply(v, z, method=type(teacher).decode)),
            "snap_teacher": jax.jit(lambda v, z: teacher.apply(v, z, method=type(teacher).snap)),
            "decode_tiny": jax.jit(lambda v, z: decoder.apply(v, z)),
            "encode_tiny": jax.jit(lambda v, x: encoder.apply(v, x))}


def reconstruct_all(fns: Mapping[str, Callable], trained: Mapping[str, tuple[nn.Module, Any]], initial: Any,
                    batches: Sequence[np.ndarray]) -> tuple[dict[str, list[np.ndarray]], list[np.ndarray]]:
    """(reconstructions of every batch through each pipeline of `PIPELINES` and `tiny_decoder_init`, the
    per-image latent MSE of the tiny encoder against mu_T per batch). A quantised teacher's codebook snaps the tiny
    encoder's latents before either decoder reads them (the MSE is of the unsnapped latents)."""
    host = {name: parallel.to_host(v) for name, (_, v) in trained.items()}
    host["tiny_decoder_init"] = initial
    outputs = {name: [] for name in (*PIPELINES, "tiny_decoder_init")}
    latent_mse = []
    for x in batches:
        latents = {"teacher": fns["encode_teacher"](host["teacher"], x),
                   "tiny_encoder": fns["encode_tiny"](host["tiny_encoder"], x)}
        snapped = {**latents, "tiny_encoder": fns["snap_teacher"](host["teacher"], latents["tiny_encoder"])}
        for name, (encoder, decoder) in (*PIPELINES.items(), ("tiny_decoder_init", ("teacher", "tiny_decoder_init"))):
            fn = fns["decode_teacher"] if decoder == "teacher" else fns["decode_tiny"]
            outputs[name].append(np.asarray(fn(host[decoder], snapped[encoder])))
        latent_mse.append(np.asarray(jnp.mean((latents["tiny_encoder"] - latents["teacher"]) ** 2, axis=(1, 2, 3))))
    return outputs, latent_mse


def scores(outputs: Sequence[np.ndarray], targets: Sequence[np.ndarray], teacher: Sequence[np.ndarray] | None
           ) -> dict[str, float]:
    """Means over the images of PSNR and SSIM against the targets and, given the teacher's reconstructions, PSNR
    and L1 (mean |output - teacher's|, [-1, 1] units, unquantised) against those."""
    cat = lambda per_batch: float(np.mean(np.concatenate(per_batch)))
    pairs = lambda others: zip(outputs, others, strict=True)
    per_batch = [restoration_metrics(o, t) for o, t in pairs(targets)]
    out = {"psnr": cat([m["psnr"] for m in per_batch]), "ssim": cat([m["ssim"] for m in per_batch])}
    if teacher is not None:
        out["psnr_vs_teacher"] = cat([restoration_metrics(o, t)["psnr"] for o, t in pairs(teacher)])
        out["l1_vs_teacher"] = cat([np.abs(o - t).mean(axis=(1, 2, 3)) for o, t in pairs(teacher)])
    return out


def score_all(fns: Mapping[str, Callable], trained: Mapping[str, tuple[nn.Module, Any]], initial: Any,
              batches: Sequence[np.ndarray]) -> tuple[dict[str, dict[str, float]], dict[str, list[np.ndarray]]]:
    """(`scores` by row, reconstructions by row) on `batches`; every row but the teacher's also against the
    teacher's reconstructions, the tiny-encoder rows with its latent MSE."""
    outputs, latent_mse = reconstruct_all(fns, trained, initial, batches)
    teacher = outputs["teacher"]
    rows = {name: scores(out, batches, None if name == "teacher" else teacher) for name, out in outputs.items()}
    for name in ("tiny_encoder", "tiny_encoder_decoder"):
        rows[name]["latent_mse"] = float(np.mean(np.concatenate(latent_mse)))
    return rows, outputs


def model_cost(forward: Callable, variables: Any, input_shape: tuple[int, ...], params: int) -> dict[str, float]:
    """{params, FLOPs per image (XLA's count, batch 1), images/s (batch COST_BATCH)} of `forward(v, x)` on inputs
    of `input_shape` (H, W, C)."""
    host = parallel.to_host(variables)
    flops = cost.flops_per_image(forward, host, np.zeros((1, *input_shape), np.float32), batch_size=1)
    speed = cost.images_per_second(forward, lambda b: (host, jnp.zeros((b, *input_shape))), COST_BATCH, warmup=1,
                                   iters=3)
    return {"params": params, "flops_per_image": flops, "images_per_s": speed}


def costs(trained: Mapping[str, tuple[nn.Module, Any]]) -> dict[str, dict[str, float]]:
    """The cost of each half, in the compute dtype, at COST_SIDE // factor * factor pixel images: teacher_decoder,
    tiny_decoder, teacher_encoder, tiny_encoder (the teacher's halves' parameters counted from its `decode` and
    `encode` alone)."""
    teacher, t_vars = trained["teacher"]
    decoder, d_vars = trained["tiny_decoder_kd"]
    encoder, e_vars = trained["tiny_encoder"]
    teacher, decoder, encoder = (models.outside_data_parallel(m) for m in (teacher, decoder, encoder))
    spec = teacher.spec
    side = COST_SIDE // spec.factor
    image, latent = (side * spec.factor,) * 2 + (spec.channels,), (side, side, spec.latent_channels)
    half_params = lambda method, shape: cost.count_params(jax.eval_shape(
        lambda: teacher.init(jax.random.key(0), jnp.zeros((1, *shape)), method=method)))
    return {
        "teacher_decoder": model_cost(lambda v, z: teacher.apply(v, z, method=type(teacher).decode), t_vars, latent,
                                      half_params(type(teacher).decode, latent)),
        "tiny_decoder": model_cost(lambda v, z: decoder.apply(v, z), d_vars, latent, cost.count_params(d_vars)),
        "teacher_encoder": model_cost(lambda v, x: teacher.apply(v, x, method=type(teacher).encode)[0], t_vars, image,
                                      half_params(type(teacher).encode, image)),
        "tiny_encoder": model_cost(lambda v, x: encoder.apply(v, x), e_vars, image, cost.count_params(e_vars)),
    }


def crop_grid(batches: Sequence[np.ndarray], outputs: Mapping[str, Sequence[np.ndarray]]) -> np.ndarray:
    """crops.png: for each of the first CROP_IMAGES test images (rows) the same centred crop (at most CROP_SIDE
    pixels a side) through each of `CROP_COLUMNS`, enlarged by pixel repetition to about 128 pixels."""
    columns = {"ground truth": batches, **{name: outputs[name] for name in CROP_COLUMNS[1:]}}
    firsts = lambda arrays: [image for array in arrays for image in array][:CROP_IMAGES]
    shown = {name: firsts(arrays) for name, arrays in columns.items()}
    side = min(CROP_SIDE, *(min(im.shape[:2]) for im in shown["ground truth"]))
    tiles = []
    for k, image in enumerate(shown["ground truth"]):
        top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
        tiles += [shown[name][k][top:top + side, left:left + side] for name in CROP_COLUMNS]
    grid = images.image_grid(images.to_uint8(np.stack(tiles)), columns=len(CROP_COLUMNS))
    zoom = max(1, 128 // side)
    return np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)


# ----------------------------------------------------------------------------------------- the task
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any] | None:
    """Runs the phases and the evaluation; returns the report (None if stopped early)."""
    workdir = pathlib.Path(workdir)
    dtype = jnp.dtype(config.compute_dtype)
    mesh = parallel.make_mesh()
    writer = summaries.create_writer(workdir)
    budget = loop.StepBudget(config.stop_after_steps)
    channels, side = config.data.channels, train_side(config)

    # The teacher draws eps from fold_in(key, 3). Parameters start from 'rbg' keys (XLA:CPU compiles threefry
    # initialisers slowly: the tiny VAE's jitted init took 9.9 s against 2.5 s): the teacher from
    # fold_in(init_key, 0), both tiny decoders from fold_in(init_key, 1), the same initialisation, the tiny
    # encoder from fold_in(init_key, 2).
    key, init_key = jax.random.key(config.seed), jax.random.key(config.seed, impl="rbg")
    if config.teacher.checkpoint:
        teacher, teacher_vars, _ = bundles.load_model(config.teacher.checkpoint, "config.teacher.checkpoint", mesh,
                                                      dtype=dtype)
        spec = teacher.spec
        batches, validation, test = load_images(config, spec.factor)
    else:
        teacher, kwargs = build_teacher(config, dtype)
        spec, block = teacher.spec, config.teacher
        batches, validation, test = load_images(config, spec.factor)
        latent_shape = (side // spec.factor, side // spec.factor, spec.latent_channels)
        if teacher.num_codes:  # VQ: reconstruction + beta * commitment, the codebook by EMA
            make_step = lambda tx: make_vqvae_step(teacher, tx, mesh, block.beta, block.vq_decay,
                                                   RECONSTRUCTION[block.recon])
        else:
            make_step = lambda tx: make_vae_step(teacher, tx, mesh, block.beta, block.recon,
                                                 jax.random.fold_in(key, 3), latent_shape)
        initial = initial_variables(teacher, (1, side, side, channels), jax.random.fold_in(init_key, 0))
        teacher_vars, finished = train_phase("teacher", config, workdir, block.train, initial.pop("params"),
                                             make_step, batches, mesh, writer, budget, model_state=initial)
        if not finished:
            return None
        bundles.save_model_bundle(workdir / "teacher" / "bundle", block.model, kwargs, teacher_vars)
    trained = {"teacher": (teacher, teacher_vars)}

    latent = (1, side // spec.factor, side // spec.factor, spec.latent_channels)
    decoder, decoder_kwargs = build_tiny(config, "tiny_decoder", spec, dtype)
    encoder, encoder_kwargs = build_tiny(config, "tiny_encoder", spec, dtype)
    decoder_init = initial_params(decoder, latent, jax.random.fold_in(init_key, 1))
    judge, judge_vars = None, {}
    if config.kd.w_perceptual > 0:
        judge, judge_vars, _ = bundles.load_model(config.kd.judge, "config.kd.judge", mesh)
    kd_adversary = adversary(config.kd, side, channels, config.tiny_decoder.train.num_steps, dtype)
    kd_state = ({"discriminator": init_discriminator(kd_adversary, channels, jax.random.fold_in(init_key, 3))}
                if kd_adversary is not None else {})
    phases = (("tiny_decoder_kd", decoder, decoder_kwargs, decoder_init,
               TinyDistillation(teacher, "decoder", config.kd.w_teacher, config.kd.w_target, config.kd.w_perceptual,
                                judge, kd_adversary)),
              ("tiny_decoder_scratch", decoder, decoder_kwargs, decoder_init,
               TinyDistillation(teacher, "decoder", w_teacher=0.0, w_target=1.0)),
              ("tiny_encoder", encoder, encoder_kwargs,
               initial_params(encoder, (1, side, side, channels), jax.random.fold_in(init_key, 2)),
               TinyDistillation(teacher, "encoder")))
    for phase, model, kwargs, params, kd in phases:
        block = config["tiny_encoder" if kd.role == "encoder" else "tiny_decoder"]
        make_step = lambda tx, model=model, kd=kd: make_distill_step(model, tx, mesh, kd)
        variables, finished = train_phase(phase, config, workdir, block.train, params, make_step, batches, mesh,
                                          writer, budget, (teacher_vars, judge_vars),
                                          kd_state if phase == "tiny_decoder_kd" else None)
        if not finished:
            return None
        trained[phase] = (model, variables)
        bundles.save_model_bundle(workdir / phase / "bundle", block.model, kwargs, variables)

    fns, initial = forwards(trained), {"params": decoder_init}
    rows, outputs = score_all(fns, trained, initial, test)
    out: dict[str, Any] = {
        "data": config.data.source, "photographs": uses_photos(config), "channels": channels,
        "factor": spec.factor, "latent_channels": spec.latent_channels,
        "num_test_images": int(sum(len(b) for b in test)),
        "test_image_sizes": sorted({tuple(b.shape[1:3]) for b in test}),
        "eval_max_side": config.data.eval_max_side if uses_photos(config) else 0,
        "num_codes": int(getattr(teacher, "num_codes", 0)),
        "teacher_loss": ({"beta": config.teacher.beta, "recon": config.teacher.recon} if not config.teacher.checkpoint
                         else {"checkpoint": config.teacher.checkpoint}),
        "kd": {"w_teacher": config.kd.w_teacher, "w_target": config.kd.w_target,
               "w_perceptual": config.kd.w_perceptual, "judge": config.kd.judge if config.kd.w_perceptual else "",
               "w_adv": config.kd.w_adv},
        "device": cost.device_name(), **rows, "cost": costs(trained)}
    out["test_image_sizes"] = [list(s) for s in out["test_image_sizes"]]
    if validation:  # the images to choose settings on: the same scores, no costs
        out["validation"] = score_all(fns, trained, initial, validation)[0]
        out["num_validation_images"] = int(sum(len(b) for b in validation))
        out["validation_origin"] = (photos.validation_origin(config.data, out["num_validation_images"])
                                    if uses_photos(config) else "set aside from the training side")
    if jax.process_index() == 0:
        images.save_png(workdir / "crops.png", crop_grid(test, outputs))
    scalars = {f"eval/{m}/{k}": v for m in (*PIPELINES, "tiny_decoder_init") for k, v in rows[m].items()}
    scalars.update({f"validation/{m}/{k}": v for m, r in out.get("validation", {}).items() for k, v in r.items()})
    writer.write_scalars(config.tiny_decoder.train.num_steps, scalars)
    writer.flush()
    report.write_report(workdir, "report", out, report_text(out))
    return out


def report_text(out: Mapping[str, Any]) -> str:
    """The markdown report: the reconstruction table, the cost table, then what every number means."""
    fmt = lambda v, f: "-" if v is None else format(v, f)
    rows = []
    for name, (encoder, decoder) in PIPELINES.items():
        r = out[name]
        rows.append([name, f"{encoder} + {decoder.replace('tiny_decoder_', 'tiny decoder ')}", fmt(r["psnr"], ".2f"),
                     fmt(r["ssim"], ".4f"), fmt(r.get("psnr_vs_teacher"), ".2f"), fmt(r.get("l1_vs_teacher"), ".4f"),
                     fmt(r.get("latent_mse"), ".4f")])
    table = report.markdown_table(["pipeline", "encoder + decoder", "PSNR (dB)", "SSIM", "PSNR vs teacher",
                                   "L1 vs teacher", "latent MSE"], rows)
    cost_rows = [[name, fmt(c["params"], ","), fmt(c["flops_per_image"] / 1e6, ".1f"), fmt(c["images_per_s"], ".1f")]
                 for name, c in out["cost"].items()]
    cost_table = report.markdown_table(["network", "parameters", "MFLOPs/image", "images/s"], cost_rows)
    side = COST_SIDE // out["factor"] * out["factor"]
    what = (f"{out['num_test_images']} held-out {out['data']} photographs (whole"
            + (f", centre-cropped to at most {out['eval_max_side']} pixels a side" if out["eval_max_side"] else "")
            + f"; sizes {out['test_image_sizes']})" if out["photographs"] else
            f"the {out['num_test_images']} {out['data']} test images")
    init, kd = out["tiny_decoder_init"], out["kd"]
    return (table + "\n\n" + cost_table
            + f"\n\nReconstructions of {what}: each image encoded (the teacher's posterior mean, or the tiny "
            "encoder's latent) and decoded. PSNR and SSIM against the ground truth, means over the images, of the "
            "8-bit outputs (models run in float32) " + ("on the Y channel (ITU-R BT.601)" if out["channels"] == 3
                                                         else "on the grey image")
            + ". PSNR vs teacher: the same PSNR against the teacher's reconstruction; L1 vs teacher: mean |output - "
            "teacher's reconstruction| (images in [-1, 1], unquantised); latent MSE: mean (E_s(x) - mu_T(x))^2. "
            f"Factor {out['factor']}, {out['latent_channels']} latent channels"
            + (f", quantised to {out['num_codes']} codes (the tiny encoder's latents snapped to them before "
               "decoding)" if out.get("num_codes") else "") + ". Costs: the teacher's halves "
            f"(its decode and encode alone) and the tiny ones, XLA's FLOPs of one forward pass at {side}x{side} "
            f"images (latents {side // out['factor']}x{side // out['factor']}); images/s at batch {COST_BATCH} on "
            f"{out['device']}. tiny_decoder_kd: w_teacher = {kd['w_teacher']}, w_target = {kd['w_target']}, "
            f"w_perceptual = {kd['w_perceptual']}" + (f" (judge {kd['judge']})" if kd["judge"] else "")
            + f", w_adv = {kd['w_adv']} (tiny_decoder_scratch: 0 and 1; no perceptual or adversarial term). "
            "The tiny decoder at initialisation: "
            f"PSNR {init['psnr']:.2f} dB, L1 vs teacher {init['l1_vs_teacher']:.4f}. crops.png columns: "
            f"{', '.join(CROP_COLUMNS)}." + validation_text(out))


def validation_text(out: Mapping[str, Any]) -> str:
    """The report's sentence on the validation images (where settings are chosen), "" without them."""
    if "validation" not in out:
        return ""
    psnrs = ", ".join(f"{name} {out['validation'][name]['psnr']:.2f}" for name in PIPELINES)
    return (f" Validation ({out['num_validation_images']} images: {out['validation_origin']}; the ones to "
            f"choose settings on; same protocol): PSNR (dB) {psnrs}; `report.json` has every score under "
            "`validation`.")
