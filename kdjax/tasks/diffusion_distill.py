"""Task `diffusion_distill`: few-step and one-step students of a diffusion teacher (`configs/diffusion_distill.py`),
measured against the teacher's own sampler at every number of network evaluations (NFE).

The teacher is an EDM denoiser bundle (`config.teacher.bundle`, the `diffusion_teacher` task's export), frozen.
`config.method` picks the distillation, each its own step function in `kdjax.steps`:

- "progressive" (`kdjax.steps.progressive`, Salimans & Ho 2022): the student starts from the teacher's weights
  and learns to make one Euler step of two of the teacher's, on the teacher's grid of `base_steps` EDM levels;
  phase `stage{N}` trains the N-step student, whose EMA is the next stage's teacher, N = base_steps / 2 down to
  `final_steps`, for its share (`stage_fractions`) of `train.num_steps` steps. Every stage's student is in the
  report, sampled with its N Euler steps.
- "consistency" (`kdjax.steps.consistency`, Song et al. 2023): the teacher's network with the consistency
  parameterisation (f(x; sigma_min) = x), started from the teacher's weights, learns to map every point of the
  teacher's Heun ODE steps between `num_levels` EDM levels to the same end; phase `consistency`. Sampled with 1
  step and with more, re-noising to `mid_sigmas` (the consistency models' multistep sampler).
- "dmd" (`kdjax.steps.distribution_matching`, DMD2, Yin et al. 2024): a one-step generator G(z) = D(sigma_max z;
  sigma_max) made of the teacher's network (`kdjax.models.edm.OneStepGenerator`) and started from its weights,
  trained data-free by the difference of the teacher and a fake denoiser (the teacher's network too, started
  from its weights) that learns the generator's distribution online; phase `dmd`. With `config.dmd.gan.
  generator_weight` > 0, DMD2's GAN term on the training images too: a realism head on the fake denoiser's middle
  map (`kdjax.models.edm.RealismHead`), trained with it.

Every phase resumes from its checkpoints (`workdir/<phase>/`) and exports its student as a model bundle
(`workdir/<phase>/bundle`). The report (`report.md`, `report.json`): the teacher's Heun sampler at each step count
of `config.sampler.teacher_steps` and every student, with NFE, FLOPs per generated image (XLA's count of one
network evaluation times the NFE), images/s, and with a judge (`config.eval.judge`) FID, KID and
precision/recall against the real images and the same against the teacher's samples at its most steps (the
reference a student imitates), `config.eval.num_samples` samples each, as a list (`rows`) and by row (`figures`,
what `kdjax.sweep` averages over seeds); `fid_vs_nfe.png` (FID against NFE, the
teacher's line and the students' points) and `samples.png` (one row per model, the same noise where the sampler
draws it the same way).
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import losses, models
from kdjax.core import data, images, optim, parallel, summaries
from kdjax.evaluation import cost, report
from kdjax.evaluation.generators import judge_pool, quality_metrics
from kdjax.models import bundles, diffusion_samplers, edm
from kdjax.steps import consistency, distribution_matching, loop, progressive
from kdjax.tasks import checks
from kdjax.tasks.diffusion_teacher import GRID_SAMPLES, noise_levels, sample_batches, timed_batches
from kdjax.tasks.phase import model_from_block, run_phase
from kdjax.tasks.pixelcnn_kd import at_resolution, check_eval, judge_and_real

METHODS = ("progressive", "consistency", "dmd")
# Teachers whose network the students can be made of: kdjax's U-Net, and the official EDM networks imported by
# `python -m kdjax.edm_import` (each with the `parameterisation` and `dropout` fields the students set).
TEACHER_MODELS = ("edm_unet", "edm_songunet", "edm_dhariwalunet")
EVAL_SEED_SALT = 9  # fold_in(key(seed), .) of the report's noise (as the teacher task's)
STEP_SALT = {"progressive": 11, "consistency": 12, "dmd": 13}  # fold_in(key(seed), .) of each method's step key


@dataclasses.dataclass(frozen=True)
class Student:
    """A trained student as the report sees it: `sample(key, labels) -> images` of `batch` images, jitted."""

    name: str  # e.g. "progressive 4-step"
    method: str
    nfe: int  # network evaluations per image
    sample: Callable[[jax.Array, jax.Array | None], jax.Array]
    params: int
    flops_per_evaluation: float
    bundle: str


# ----------------------------------------------------------------------------------------- config checks
def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates a `diffusion_distill` config before any compute (raises ValueError naming the field)."""
    data.check_data_config(config.data)
    teacher = teacher_kwargs(config)
    shape = (config.data.resolution, config.data.channels)
    if (teacher["resolution"], teacher["channels"]) != shape:
        raise ValueError(f"config.teacher.bundle={config.teacher.bundle!r} denoises {teacher['resolution']}x"
                         f"{teacher['resolution']}x{teacher['channels']} images; the data gives {shape[0]}x{shape[0]}x"
                         f"{shape[1]} (config.data.resolution, config.data.channels).")
    if teacher.get("num_classes", 0) and config.data.source == "tfds" and not config.data.label_key:
        raise ValueError("the teacher is class-conditional; config.data.label_key is '' (unlabelled data).")
    sampler = config.sampler
    if not 0 < sampler.sigma_min < sampler.sigma_max:
        raise ValueError(f"config.sampler.sigma_min={sampler.sigma_min} and sigma_max={sampler.sigma_max} must "
                         "satisfy 0 < sigma_min < sigma_max.")
    if not sampler.rho > 0:
        raise ValueError(f"config.sampler.rho={sampler.rho} must be > 0.")
    steps = tuple(sampler.teacher_steps)
    if not steps or any(int(n) != n or n < 1 for n in steps) or list(steps) != sorted(set(steps)):
        raise ValueError(f"config.sampler.teacher_steps={steps} must be increasing integers >= 1.")
    if config.method not in METHODS:
        raise ValueError(f"config.method={config.method!r}; valid: {list(METHODS)}.")
    {"progressive": check_progressive, "consistency": check_consistency, "dmd": check_dmd}[config.method](config)
    check_eval(config)


def teacher_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The teacher bundle's model fields (checked: a denoiser bundle of `TEACHER_MODELS`)."""
    meta = bundles.check_model_bundle(config.teacher.bundle, "config.teacher.bundle", kind="denoiser")
    if meta["model"] not in TEACHER_MODELS:
        raise ValueError(f"config.teacher.bundle={config.teacher.bundle!r} holds a {meta['model']!r}; the students "
                         f"are made of the teacher's network, which must be one of {list(TEACHER_MODELS)} "
                         "(configs/diffusion_teacher.py trains an edm_unet; python -m kdjax.edm_import imports the "
                         "official ones).")
    if meta["kwargs"].get("parameterisation", "edm") != "edm":
        raise ValueError(f"config.teacher.bundle={config.teacher.bundle!r} is a consistency function, not a denoiser.")
    return {**meta["kwargs"], "model": meta["model"]}


def is_power_of_two(n: int) -> bool:
    return int(n) == n and n >= 1 and (n & (n - 1)) == 0


def check_progressive(config: ml_collections.ConfigDict) -> None:
    cfg = config.progressive
    if not is_power_of_two(cfg.base_steps) or cfg.base_steps < 2:
        raise ValueError(f"config.progressive.base_steps={cfg.base_steps} must be a power of two >= 2 (each stage "
                         "halves the steps).")
    if not is_power_of_two(cfg.final_steps) or cfg.final_steps >= cfg.base_steps:
        raise ValueError(f"config.progressive.final_steps={cfg.final_steps} must be a power of two below base_steps="
                         f"{cfg.base_steps}.")
    checks.check_phase(cfg.train, "config.progressive.train")
    checks.check_fraction(cfg.ema_decay, "config.progressive.ema_decay", closed_high=False)
    num_stages = int(np.log2(cfg.base_steps // cfg.final_steps))
    fractions = tuple(cfg.stage_fractions)
    if fractions and (len(fractions) != num_stages or min(stage_steps(cfg)) < 1):
        raise ValueError(f"config.progressive.stage_fractions={fractions} must be empty (every stage trains "
                         f"train.num_steps={cfg.train.num_steps} steps) or give each of the {num_stages} stages "
                         f"({cfg.base_steps} -> {cfg.final_steps} steps) its share of them, each >= 1 step.")


def stage_steps(cfg: ml_collections.ConfigDict) -> list[int]:
    """The training steps of each progressive stage, base stage first: `train.num_steps` times the stage's
    `stage_fractions` entry, rounded (all of them when `stage_fractions` is empty)."""
    num_stages = int(np.log2(cfg.base_steps // cfg.final_steps))
    fractions = tuple(cfg.stage_fractions) or (1.0,) * num_stages
    return [int(round(f * cfg.train.num_steps)) for f in fractions]


def check_consistency(config: ml_collections.ConfigDict) -> None:
    cfg, sampler = config.consistency, config.sampler
    if int(cfg.num_levels) != cfg.num_levels or cfg.num_levels < 2:
        raise ValueError(f"config.consistency.num_levels={cfg.num_levels} must be an integer >= 2.")
    if cfg.distance not in losses.CONSISTENCY_DISTANCES:
        raise ValueError(f"config.consistency.distance={cfg.distance!r}; valid: {list(losses.CONSISTENCY_DISTANCES)}.")
    checks.check_fraction(cfg.target_decay, "config.consistency.target_decay", closed_high=False)
    mids = tuple(cfg.mid_sigmas)
    if any(not sampler.sigma_min < s < sampler.sigma_max for s in mids) or list(mids) != sorted(mids, reverse=True):
        raise ValueError(f"config.consistency.mid_sigmas={mids} must decrease, each between sigma_min="
                         f"{sampler.sigma_min} and sigma_max={sampler.sigma_max}.")
    steps = tuple(cfg.sample_steps)
    if not steps or any(int(n) != n or not 1 <= n <= len(mids) + 1 for n in steps) or len(set(steps)) != len(steps):
        raise ValueError(f"config.consistency.sample_steps={steps} must be distinct integers from 1 to 1 + "
                         f"len(mid_sigmas) = {len(mids) + 1}.")
    checks.check_phase(cfg.train, "config.consistency.train")


def check_dmd(config: ml_collections.ConfigDict) -> None:
    cfg = config.dmd
    checks.check_model_block(cfg.generator, "config.dmd.generator", "generator",
                             taken_from="the teacher (its resolution, channels and classes)")
    if cfg.generator.model == "edm_one_step" and cfg.generator.kwargs:
        raise ValueError(f"config.dmd.generator.kwargs={cfg.generator.kwargs.to_dict()}: leave them out; "
                         "edm_one_step is the teacher's network.")
    if cfg.generator.model == "edm_one_step" and teacher_kwargs(config)["model"] != "edm_unet":
        raise ValueError(f"config.dmd.generator.model='edm_one_step' wraps an edm_unet; the teacher is an "
                         f"{teacher_kwargs(config)['model']!r}: choose a generator model (e.g. dcgan_generator).")
    if cfg.generator.model != "edm_one_step":  # builds, and makes the teacher's images (eval_shape: no compute)
        fields = teacher_kwargs(config)
        teacher = models.build_model(fields.pop("model"), **fields)
        try:
            generator, _ = model_from_block(cfg.generator, (fields["resolution"], fields["channels"],
                                                            fields.get("num_classes", 0)), jnp.float32)
            distribution_matching.check_networks(models.outside_data_parallel(generator), teacher)
        except ValueError as e:
            raise ValueError(f"config.dmd.generator: {e}") from e
    if int(cfg.fake_updates_per_step) != cfg.fake_updates_per_step or cfg.fake_updates_per_step < 1:
        raise ValueError(f"config.dmd.fake_updates_per_step={cfg.fake_updates_per_step} must be an integer >= 1.")
    if not cfg.fake_learning_rate > 0:
        raise ValueError(f"config.dmd.fake_learning_rate={cfg.fake_learning_rate} must be > 0.")
    for field in ("generator_weight", "classifier_weight"):
        if not cfg.gan[field] >= 0:
            raise ValueError(f"config.dmd.gan.{field}={cfg.gan[field]} must be >= 0 (generator_weight 0: no GAN term).")
    checks.check_phase(cfg.train, "config.dmd.train")


# ----------------------------------------------------------------------------------------- the methods
def run_progressive(config, workdir, teacher_model, teacher_params, dataset, mesh, writer, budget
                    ) -> list[Student] | None:
    """The stages base_steps -> base_steps / 2 -> ... -> final_steps (module docstring); None if stopped early."""
    cfg, sampler = config.progressive, config.sampler
    base = diffusion_samplers.edm_sigmas(cfg.base_steps, sampler.sigma_min, sampler.sigma_max, sampler.rho)
    student = teacher_model.clone(dropout=cfg.dropout)
    frozen = progressive.network_teacher(teacher_model.clone(dropout=0.0))
    key = jax.random.fold_in(jax.random.key(config.seed), STEP_SALT["progressive"])
    params, teacher_steps, students = teacher_params, cfg.base_steps, []
    for num_steps in stage_steps(cfg):
        steps = teacher_steps // 2
        grid = progressive.stage_grid(base, teacher_steps)
        train_cfg = ml_collections.ConfigDict({**cfg.train.to_dict(), "num_steps": num_steps})
        tx = optim.make_optimizer(train_cfg.optimizer, num_steps)
        state = parallel.replicate(progressive.init_state(params, tx), mesh)
        step = progressive.make_progressive_step(student, frozen, grid, tx, mesh, jax.random.fold_in(key, steps),
                                                 ema_decay=cfg.ema_decay)
        constants = parallel.replicate({"params": params}, mesh)
        name = f"stage{steps}"
        state, finished = run_phase(name, config, workdir, state, lambda s, b: step(s, b, constants), dataset.train,
                                    train_cfg, mesh, writer, budget)
        if not finished:
            return None
        params = parallel.to_host(state.ema)
        bundle = export(workdir / name / "bundle", registry_name(student), module_kwargs(student), {"params": params})
        students.append(Student(f"progressive {steps}-step", "progressive", steps,
                                denoiser_sampler(student, params, grid[::2], "euler", shape_of(config)),
                                cost.count_params(params), evaluation_flops(student, params), bundle))
        teacher_steps = steps
    return students


def run_consistency(config, workdir, teacher_model, teacher_params, dataset, mesh, writer, budget
                    ) -> list[Student] | None:
    """Consistency distillation into the teacher's network (module docstring); None if stopped early."""
    cfg, sampler = config.consistency, config.sampler
    levels = consistency.consistency_levels(cfg.num_levels, sampler.sigma_min, sampler.sigma_max, sampler.rho)
    student = teacher_model.clone(parameterisation="consistency", sigma_min=sampler.sigma_min, dropout=cfg.dropout)
    frozen = progressive.network_teacher(teacher_model.clone(dropout=0.0))
    tx = optim.make_optimizer(cfg.train.optimizer, cfg.train.num_steps)
    key = jax.random.fold_in(jax.random.key(config.seed), STEP_SALT["consistency"])
    state = parallel.replicate(consistency.init_state(teacher_params, tx), mesh)
    step = consistency.make_consistency_step(student, frozen, levels, tx, mesh, key, distance=cfg.distance,
                                             target_decay=cfg.target_decay)
    constants = parallel.replicate({"params": teacher_params}, mesh)
    state, finished = run_phase("consistency", config, workdir, state, lambda s, b: step(s, b, constants),
                                dataset.train, cfg.train, mesh, writer, budget)
    if not finished:
        return None
    params = parallel.to_host(state.target)  # the EMA target network theta^-
    bundle = export(workdir / "consistency" / "bundle", registry_name(student), module_kwargs(student),
                    {"params": params})
    flops = evaluation_flops(student, params)
    students = []
    for steps in cfg.sample_steps:
        sigmas = jnp.asarray((sampler.sigma_max, *tuple(cfg.mid_sigmas)[: steps - 1]), jnp.float32)
        students.append(Student(f"consistency {steps}-step", "consistency", int(steps),
                                consistency_sampler(student, params, sigmas, sampler.sigma_min, shape_of(config)),
                                cost.count_params(params), flops, bundle))
    return students


def dmd_generator(config: ml_collections.ConfigDict, teacher_model: nn.Module, teacher_params: Any, key: jax.Array
                  ) -> tuple[nn.Module, nn.Module, dict[str, Any], Any]:
    """(the generator for the data-parallel step, the same outside it, its bundle kwargs, its initial variables):
    `edm_one_step` is the teacher's network started from its weights; any other generator (`config.dmd.generator`,
    e.g. the DCGAN student) starts from its own initialisation."""
    block = config.dmd.generator
    if block.model == "edm_one_step":
        fields = {k: v for k, v in dataclasses.asdict(teacher_model).items() if k not in ("parent", "name")}
        generator = edm.OneStepGenerator(**edm.one_step_kwargs({**fields, "dropout": 0.0}, config.sampler.sigma_max))
        return generator, generator, module_kwargs(generator), {"params": edm.from_denoiser(teacher_params)}
    spec = teacher_model.spec
    generator, kwargs = model_from_block(block, (spec.resolution, spec.channels, spec.num_classes),
                                         jnp.dtype(config.compute_dtype))
    outside = models.outside_data_parallel(generator)
    z = jnp.zeros((2, outside.spec.z_dim))
    labels = jnp.zeros((2,), jnp.int32) if spec.num_classes else None
    variables = jax.jit(lambda k: outside.init(k, z, labels))(key)
    return generator, outside, kwargs, variables


def run_dmd(config, workdir, teacher_model, teacher_params, dataset, mesh, writer, budget) -> list[Student] | None:
    """Distribution-matching distillation into a one-step generator (module docstring); None if stopped early."""
    cfg, sampler = config.dmd, config.sampler
    key = jax.random.fold_in(jax.random.key(config.seed), STEP_SALT["dmd"])
    generator, outside, kwargs, variables = dmd_generator(config, teacher_model, teacher_params,
                                                          jax.random.fold_in(key, 1))
    fake = teacher_model.clone(dropout=0.0)
    tx_g = optim.make_optimizer(cfg.train.optimizer, cfg.train.num_steps)
    fake_optimizer = ml_collections.ConfigDict(cfg.train.optimizer.to_dict())
    fake_optimizer.learning_rate = cfg.fake_learning_rate
    tx_fake = optim.make_optimizer(fake_optimizer, cfg.train.num_steps * cfg.fake_updates_per_step)
    generator_state = {k: v for k, v in variables.items() if k != "params"}
    gan, head = None, None
    if cfg.gan.generator_weight > 0:  # DMD2's GAN term, on the training images
        gan = distribution_matching.GANTerm(edm.RealismHead(), float(cfg.gan.generator_weight),
                                            float(cfg.gan.classifier_weight))
        head = distribution_matching.init_head(gan, fake, teacher_params, jax.random.fold_in(key, 2))
    state = parallel.replicate(distribution_matching.init_state(variables["params"], teacher_params, tx_g, tx_fake,
                                                                generator_state, head), mesh)
    step = distribution_matching.make_dmd_step(
        generator, fake, progressive.network_teacher(fake), tx_g, tx_fake, mesh, key, sigma_min=sampler.sigma_min,
        sigma_max=sampler.sigma_max, rho=sampler.rho, fake_updates_per_step=int(cfg.fake_updates_per_step), gan=gan)
    constants = parallel.replicate({"params": teacher_params}, mesh)
    local = distribution_matching.latent_batch(cfg.train.batch_size // jax.process_count())
    source, batches = (dataset.train, None) if gan else ((), lambda start: itertools.repeat(local))
    state, finished = run_phase("dmd", config, workdir, state, lambda s, b: step(s, b, constants), source, cfg.train,
                                mesh, writer, budget, batches=batches)
    if not finished:
        return None
    variables = {"params": parallel.to_host(state.generator), **parallel.to_host(state.generator_state)}
    bundle = export(workdir / "dmd" / "bundle", cfg.generator.model, kwargs, variables)
    z = jnp.zeros((8, outside.spec.z_dim))
    labels = (jnp.zeros((8,), jnp.int32),) if outside.spec.num_classes else ()
    flops = cost.flops_per_image(lambda v, z, *y: outside.apply(v, z, *y), variables, z, *labels, batch_size=8)
    return [Student(f"DMD2 one-step ({cfg.generator.model})", "dmd", 1,
                    generator_sampler(outside, variables, shape_of(config)), cost.count_params(variables["params"]),
                    flops, bundle)]


RUNNERS = {"progressive": run_progressive, "consistency": run_consistency, "dmd": run_dmd}


# ----------------------------------------------------------------------------------------- samplers, cost, export
def shape_of(config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
    """The report's sampling batch shape (B, R, R, C)."""
    batch = min(config.eval_batch_size, -(-config.eval.num_samples // GRID_SAMPLES) * GRID_SAMPLES)
    return (batch, config.data.resolution, config.data.resolution, config.data.channels)


def denoiser_sampler(model: nn.Module, params: Any, sigmas: jax.Array, method: str, shape: tuple[int, ...]
                     ) -> Callable:
    """`(key, labels) -> images`: `method` down `sigmas` from sigmas[0] n, n ~ N(0, I) from `key`."""
    @jax.jit
    def sample(key, labels):
        denoise = lambda x, sigma: model.apply({"params": params}, x, sigma, labels)
        return diffusion_samplers.sample(denoise, key, shape, method, sigmas)[0]
    return sample


def consistency_sampler(model: nn.Module, params: Any, sigmas: jax.Array, sigma_min: float, shape: tuple[int, ...]
                        ) -> Callable:
    """`(key, labels) -> images`: the consistency models' multistep sampler at levels `sigmas`."""
    @jax.jit
    def sample(key, labels):
        f = lambda x, sigma: model.apply({"params": params}, x, sigma, labels)
        return diffusion_samplers.consistency_sample(f, key, shape, sigmas, sigma_min)[0]
    return sample


def generator_sampler(model: nn.Module, variables: Any, shape: tuple[int, ...]) -> Callable:
    """`(key, labels) -> images`: G(z), z ~ N(0, I) from `key` (BatchNorm on its running statistics)."""
    @jax.jit
    def sample(key, labels):
        z = jax.random.normal(key, (shape[0], model.spec.z_dim), jnp.float32)
        return model.apply(variables, z, labels)
    return sample


def evaluation_flops(model: nn.Module, params: Any) -> float:
    """XLA's FLOPs per image of one evaluation of a denoiser `model` (batch 8)."""
    spec = model.spec
    x = jnp.zeros((8, spec.resolution, spec.resolution, spec.channels))
    labels = (jnp.zeros((8,), jnp.int32),) if spec.num_classes else ()
    return cost.flops_per_image(lambda p, x, s, *y: model.apply({"params": p}, x, s, *y), params, x, jnp.ones((8,)),
                                *labels, batch_size=8)


def registry_name(model: nn.Module) -> str:
    """The model registry's name of a teacher-network module (one of `TEACHER_MODELS`)."""
    return next(name for name in TEACHER_MODELS if models.model_class(name) is type(model))


def module_kwargs(model: nn.Module) -> dict[str, Any]:
    """A module's fields as a bundle records them (without the dtype, which the loader chooses)."""
    return {k: v for k, v in dataclasses.asdict(model).items() if k not in ("parent", "name", "dtype")}


def export(path: pathlib.Path, name: str, kwargs: dict[str, Any], variables: Any) -> str:
    """Saves a student's model bundle."""
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    bundles.save_model_bundle(path, name, kwargs, variables)
    return str(path)


def sample_student(student: Student, num_classes: int, count: int, batch: int, key: jax.Array
                   ) -> tuple[np.ndarray, float]:
    """(count images, images/s) of a student, batch b from fold_in(key, b) (labels b * batch + i mod classes when
    conditional), timed as the teacher's (`diffusion_teacher.timed_batches`)."""
    def run(b: int) -> jax.Array:
        labels = (jnp.arange(b * batch, (b + 1) * batch) % num_classes).astype(jnp.int32) if num_classes else None
        return jax.block_until_ready(student.sample(jax.random.fold_in(key, b), labels))

    return timed_batches(run, count, batch, desc=student.name)


# ----------------------------------------------------------------------------------------- the task
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any] | None:
    """Distils the teacher by `config.method` (resumable) and writes the report; returns it, or None when the
    launch stopped early."""
    workdir = pathlib.Path(workdir)
    dtype = jnp.dtype(config.compute_dtype)
    mesh = parallel.make_mesh()
    dataset = data.load_dataset(config.data)
    teacher_model, variables, meta = bundles.load_model(config.teacher.bundle, "config.teacher.bundle", dtype=dtype)
    # model.json holds lists; a module's fields must be hashable (it is a static argument of jitted samplers).
    teacher_model = teacher_model.clone(**{k: tuple(v) for k, v in meta["kwargs"].items() if isinstance(v, list)})
    teacher_params = variables["params"]
    writer = summaries.create_writer(workdir)
    students = RUNNERS[config.method](config, workdir, teacher_model, teacher_params, dataset, mesh, writer,
                                      loop.StepBudget(config.stop_after_steps))
    if students is None:
        return None
    out = evaluate(config, workdir, teacher_model.clone(dropout=0.0), teacher_params, students, dataset, mesh, writer)
    report.write_report(workdir, "report", out, report_table(out))
    writer.flush()
    return out


def evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path, teacher: nn.Module, teacher_params: Any,
             students: list[Student], dataset: data.Dataset, mesh: Any, writer: Any) -> dict[str, Any]:
    """The teacher's Heun rows and every student's row (module docstring); writes samples.png and fid_vs_nfe.png."""
    spec, sampler = teacher.spec, config.sampler
    flops = evaluation_flops(teacher, teacher_params)
    out: dict[str, Any] = {"method": config.method, "dataset": dataset.name, "teacher_bundle": config.teacher.bundle,
                           "teacher_params": cost.count_params(teacher_params), "flops_per_evaluation": flops,
                           "num_samples": config.eval.num_samples, "device": cost.device_name(), "rows": []}
    judged = judge_and_real(config, dataset, mesh)
    if judged is not None:
        out.update(num_real=len(judged[1]), real_split=config.eval.real_split, judge=str(config.eval.judge))
    key = jax.random.fold_in(jax.random.key(config.seed), EVAL_SEED_SALT)
    batch = shape_of(config)[0]
    teacher_config = ml_collections.ConfigDict(dict(
        steps=tuple(sampler.teacher_steps), preview_steps=1, sigma_min=sampler.sigma_min,
        sigma_max=sampler.sigma_max, rho=sampler.rho))
    samples = []
    for steps in sampler.teacher_steps:
        x, nfe, rate = sample_batches(teacher, teacher_params, "heun", noise_levels(teacher_config, "heun", steps),
                                      steps, config.eval.num_samples, batch, key, desc=f"teacher Heun {steps}-step")
        samples.append(x)
        out["rows"].append({"model": "teacher", "sampler": f"Heun {steps}-step", "nfe": nfe,
                            "flops_per_image": nfe * flops, "images_per_s": rate,
                            "params": out["teacher_params"]})
    for student in students:
        x, rate = sample_student(student, spec.num_classes, config.eval.num_samples, batch, key)
        samples.append(x)
        out["rows"].append({"model": student.method, "sampler": student.name, "nfe": student.nfe,
                            "flops_per_image": student.nfe * student.flops_per_evaluation, "images_per_s": rate,
                            "params": student.params, "bundle": student.bundle})
    if judged is not None:
        judge, real_pool, resolution = judged
        pools = [judge_pool(judge, at_resolution(np.clip(x, -1, 1), resolution), config.eval_batch_size)
                 for x in samples]
        reference = pools[len(sampler.teacher_steps) - 1]  # the teacher at its most steps
        out["teacher_reference"] = out["rows"][len(sampler.teacher_steps) - 1]["sampler"]
        for row, pool in zip(out["rows"], pools):
            row.update(quality_metrics(real_pool, {"feats": {"pool": pool}}, config.seed))
            row.update(quality_metrics(reference, {"feats": {"pool": pool}}, config.seed, suffix="_vs_teacher"))
    out["figures"] = {row_key(row): {k: v for k, v in row.items() if isinstance(v, (int, float))}
                      for row in out["rows"]}
    for row in out["rows"]:
        writer.write_scalars(row["nfe"], {f"eval/{row['sampler']}/{k}": v for k, v in row.items()
                                          if isinstance(v, (int, float))})
    if jax.process_index() == 0:
        grid = images.image_grid(np.concatenate([images.to_uint8(np.clip(x[:GRID_SAMPLES], -1, 1)) for x in samples]),
                                 columns=min(GRID_SAMPLES, config.eval.num_samples))
        images.save_png(workdir / "samples.png", grid)
        if judged is not None:
            plot_fid_against_nfe(out["rows"], workdir / "fid_vs_nfe.png")
    return out


def row_key(row: dict[str, Any]) -> str:
    """A report row's key in `figures` (what `kdjax.sweep` aggregates over seeds): "MODEL/SAMPLER" in lower case,
    runs of other characters as "_", e.g. "teacher/heun_16-step", "progressive/progressive_4-step",
    "dmd/dmd2_one-step_edm_one_step"."""
    slug = lambda text: re.sub(r"[^a-z0-9-]+", "_", text.lower()).strip("_")
    return f"{slug(row['model'])}/{slug(row['sampler'])}"


def plot_fid_against_nfe(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    """FID against real images and against the teacher's samples, by NFE: the teacher's Heun line, the students'
    points (one marker per method); FID on a log scale (symmetric-log against the teacher's samples, whose
    reference row is 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in zip(axes, ("fid", "fid_vs_teacher"), ("FID against the real images",
                                                                    "FID against the teacher's samples")):
        teacher = [r for r in rows if r["model"] == "teacher"]
        ax.plot([r["nfe"] for r in teacher], [r[metric] for r in teacher], marker="o", label="teacher (Heun)")
        for method, marker in zip(METHODS, ("s", "^", "*")):
            mine = [r for r in rows if r["model"] == method]
            if mine:
                ax.plot([r["nfe"] for r in mine], [r[metric] for r in mine], marker=marker, linestyle="--",
                        markersize=10, label=method)
        ax.set_xscale("log", base=2)
        # FIDs span 1 to several hundred; against the teacher's samples the reference row is 0 (or a hair below)
        if metric == "fid":
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=0.1)
            ax.set_ylim(bottom=0.0)
        ax.set_xlabel("NFE (network evaluations per image)")
        ax.set_ylabel("FID")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_table(out: dict[str, Any]) -> str:
    """The markdown table of the report: one row per teacher setting and per student."""
    judged = "judge" in out
    rows = []
    for r in out["rows"]:
        row = [r["model"], r["sampler"], str(r["nfe"])]
        if judged:
            row += [f"{r['fid']:.2f}", f"{r['kid_mean']:.4f}", f"{r['fid_vs_teacher']:.2f}",
                    f"{r['kid_mean_vs_teacher']:.4f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}"]
        rows.append(row + [f"{r['flops_per_image'] / 1e6:.1f}", f"{r['images_per_s']:.1f}", f"{r['params']:,}"])
    header = ["model", "sampler", "NFE"] + (["FID", "KID", "FID vs teacher", "KID vs teacher", "precision", "recall"]
                                            if judged else []) + ["MFLOPs/image", "images/s", "parameters"]
    text = report.markdown_table(header, rows)
    text += (f"\n\nTeacher: {out['teacher_bundle']} ({out['teacher_params']:,} parameters, "
             f"{out['flops_per_evaluation'] / 1e6:.1f} MFLOPs per evaluation); method {out['method']}; "
             f"{out['num_samples']} samples per row; images/s on {out['device']}.")
    if judged:
        text += (f" FID/KID against {out['num_real']} real images ('{out['real_split']}') and against the teacher's "
                 f"{out['teacher_reference']} samples, in the judge's 'pool' features ({out['judge']}).")
    return text
