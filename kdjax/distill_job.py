"""The main job (task `distill`): teacher -> distilled student, the same student from scratch, one report.

    python launch.py --config=configs/stylegan_to_dcgan.py

Phases, each resumable, in the workdir:
1. `student_kd`: the student (and its feature adapters) trained with `kdjax.distill.make_distill_step`
   (every term of the objective is there) against the frozen teacher and judge bundles; its EMA is
   exported to `student_kd/bundle`.
2. `student_scratch`: the same student architecture, seed, steps, batch and optimizers trained as a GAN on
   real data (`kdjax.gan`); exported to `student_scratch/bundle`. Off with `config.scratch.enabled=False`.
3. The report (`kdjax.evaluate.evaluate_generators`, on the held-out split, judge features): `report.md`,
   `report.json`, `eval/` (spectra.png, samples.png, eval.json), `loss_curves.png`, `side_by_side.png`
   (teacher / KD student / scratch student on the same latents) and TensorBoard events.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers

from kdjax import checkpoints, data, distill, evaluate, gan, loop, models, optim, parallel, summaries
from kdjax.config_schema import gan_config
from kdjax.data import to_model_range
from kdjax.models import stylegan2

REPORT_KEYS = ("fid", "kid", "precision", "recall", "psnr_vs_teacher", "ssim_vs_teacher", "params",
               "flops_per_image", "images_per_s")
ADV_LOSSES = ("logistic", "hinge")


class MappedStudent(nn.Module):
    """A student that consumes the teacher's w (`distill.reuse_mapping`), wrapped to take z like any generator:
    w = teacher.mapping(z) (frozen, truncated with `truncation_psi`), images = student(w)."""

    teacher: nn.Module
    student: nn.Module
    truncation_psi: float = 1.0

    @property
    def z_dim(self) -> int:
        return self.teacher.z_dim

    @property
    def resolution(self) -> int:
        return self.student.resolution

    @property
    def img_channels(self) -> int:
        return self.student.img_channels

    @property
    def num_classes(self) -> int:
        return self.student.num_classes

    def __call__(self, z, labels=None, *, train: bool = False, return_features: bool = False):
        w = self.teacher.mapping(z, labels, truncation_psi=self.truncation_psi)[:, 0]
        return self.student(w, labels, train=train, return_features=return_features)


def mapped_variables(teacher_vars: dict[str, Any], student_vars: dict[str, Any]) -> dict[str, Any]:
    """The variables of a `MappedStudent`: each collection split into its "teacher" and "student" parts."""
    return {c: {**({"teacher": teacher_vars[c]} if c in teacher_vars else {}),
                **({"student": student_vars[c]} if c in student_vars else {})}
            for c in {*teacher_vars, *student_vars}}


# ------------------------------------------------------------------------------------------ checks
def _bundle_generator(field: str, path: str) -> tuple[dict[str, Any], dict[str, int]]:
    meta = checkpoints.check_model_bundle(path, field)
    if meta["model"] not in gan.FAMILIES or not meta["model"].endswith("_generator"):
        raise ValueError(f"{field}={path!r} holds a {meta['model']!r}; a teacher must be a generator bundle "
                         f"({sorted(n for n in gan.FAMILIES if n.endswith('_generator'))}).")
    return meta, evaluate.generator_spec(models.build_model(meta["model"], **meta["kwargs"]))


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates a `distill` config before any compute (raises ValueError naming the field)."""
    from kdjax import train

    data.check_data_config(config.data)
    t_meta, spec = _bundle_generator("config.teacher.checkpoint", config.teacher.checkpoint)
    if (spec["resolution"], spec["channels"]) != (config.data.resolution, config.data.channels):
        raise ValueError(f"config.teacher.checkpoint makes {spec['resolution']}x{spec['resolution']}x{spec['channels']}"
                         f" images; config.data is {config.data.resolution}x{config.data.resolution}x"
                         f"{config.data.channels} (set --config.data.resolution / --config.data.channels).")
    j_meta = checkpoints.check_model_bundle(config.judge.checkpoint, "config.judge.checkpoint")
    if j_meta["model"].endswith(("_generator", "_discriminator")):
        raise ValueError(f"config.judge.checkpoint holds a {j_meta['model']!r}, not a classifier.")
    for role, kind in (("student", "_generator"), ("discriminator", "_discriminator")):
        block = config[role]
        valid = sorted(n for n in gan.FAMILIES if n.endswith(kind))
        if block.model not in valid:
            raise ValueError(f"config.{role}.model={block.model!r}; valid: {valid}.")
        family = gan.FAMILIES[block.model]
        for field in (family["res"], family["ch"], family["classes"]) + (("z_dim",) if role == "student" else ()):
            if field in block.kwargs:
                raise ValueError(f"config.{role}.kwargs.{field}: leave it out; it is taken from the teacher.")
        models.check_model_kwargs(block.model, block.kwargs.to_dict(), where=f"config.{role}.kwargs")
    d = config.distill
    unknown = set(d.weights) - set(distill.TERMS)
    if unknown:
        raise ValueError(f"config.distill.weights: unknown terms {sorted(unknown)}; valid: {list(distill.TERMS)}.")
    for term in distill.TERMS:
        w = d.weights[term]
        if w.value < 0 or w.end_value < 0:
            raise ValueError(f"config.distill.weights.{term}: weights must be >= 0 (0 turns the term off).")
        if w.end_step > 0 and not 0 <= w.start_step < w.end_step:
            raise ValueError(f"config.distill.weights.{term}: need 0 <= start_step < end_step for a schedule.")
    if not any(d.weights[t].value > 0 or d.weights[t].end_value > 0 for t in distill.TERMS):
        raise ValueError(f"config.distill.weights: every term is 0; turn on at least one of {list(distill.TERMS)}.")
    if d.reuse_mapping and t_meta["model"] != "stylegan2_generator":
        raise ValueError("config.distill.reuse_mapping needs a StyleGAN2 teacher (it has a mapping network); "
                         f"the teacher is a {t_meta['model']!r}.")
    if (d.weights.feature.value > 0 or d.weights.feature.end_value > 0) and t_meta["model"] != "stylegan2_generator":
        raise ValueError("config.distill.weights.feature needs a StyleGAN2 teacher (block features).")
    if not d.temperature > 0:
        raise ValueError(f"config.distill.temperature={d.temperature} must be > 0.")
    if not 0.0 <= d.alpha <= 1.0:
        raise ValueError(f"config.distill.alpha={d.alpha} must be in [0, 1].")
    if not 0.0 <= d.truncation_psi <= 1.0:
        raise ValueError(f"config.distill.truncation_psi={d.truncation_psi} must be in [0, 1].")
    if d.truncation_psi != 1.0 and t_meta["model"] != "stylegan2_generator":
        raise ValueError(f"config.distill.truncation_psi={d.truncation_psi} needs a StyleGAN2 teacher (a mapping "
                         f"network to truncate); the teacher is a {t_meta['model']!r}: leave it at 1.0.")
    if d.adv_loss not in ADV_LOSSES:
        raise ValueError(f"config.distill.adv_loss={d.adv_loss!r}; valid: {list(ADV_LOSSES)}.")
    if d.r1_gamma < 0 or d.r1_every < 1:
        raise ValueError(f"config.distill.r1_gamma={d.r1_gamma} must be >= 0 and r1_every={d.r1_every} >= 1.")
    if not 0.0 <= d.ema_decay < 1.0:
        raise ValueError(f"config.distill.ema_decay={d.ema_decay} must be in [0, 1).")
    train.check_phase(config.train, "config.train")
    optim.check_optimizer_config(config.d_optimizer, "config.d_optimizer")
    if config.scratch.enabled:
        gan.check_gan_config(scratch_config(config, spec["z_dim"]))
    if config.eval.num_samples < 4:
        raise ValueError(f"config.eval.num_samples={config.eval.num_samples} must be >= 4 (k-NN with k = 3).")
    if not config.eval.timing_batch_sizes or min(config.eval.timing_batch_sizes) < 1:
        raise ValueError(f"config.eval.timing_batch_sizes={config.eval.timing_batch_sizes} must be positive sizes.")


def scratch_config(config: ml_collections.ConfigDict, z_dim: int) -> ml_collections.ConfigDict:
    """The `gan` config of the from-scratch baseline: the student and discriminator of `config` (the student
    taking the teacher's z_dim, so all three models share latents), the same seed, steps, batch and
    optimizers (`config.train`, `config.d_optimizer`), trained on real data."""
    cfg = ml_collections.ConfigDict({k: config[k] for k in ("task", "seed", "compute_dtype", "log_every",
                                                            "checkpoint_every", "max_to_keep", "async_checkpoints",
                                                            "stop_after_steps", "eval_batch_size", "data")})
    cfg.task = "gan"
    cfg.generator, cfg.discriminator = ml_collections.ConfigDict(config.student.to_dict()), config.discriminator
    cfg.generator.kwargs.z_dim = z_dim
    cfg.gan = gan_config(loss=config.scratch.loss, r1_gamma=config.scratch.r1_gamma, r1_every=config.scratch.r1_every,
                         ema_decay=config.distill.ema_decay, train=config.train, d_optimizer=config.d_optimizer)
    return cfg


# ------------------------------------------------------------------------------------------- state
def init_state(teacher: nn.Module, teacher_vars: Any, student: nn.Module, discriminator: nn.Module,
               student_in_dim: int, s_tx, d_tx, shape: tuple[int, int, int], key: jax.Array
               ) -> tuple[distill.DistillState, distill.FeatureAdapters]:
    """The initial distillation state (host), and the adapters for the feature names both generators share."""
    res, ch, num_classes = shape
    labels = jnp.zeros((2,), jnp.int32) if num_classes else None
    s_plain, d_plain = gan.outside_data_parallel(student), gan.outside_data_parallel(discriminator)
    s_vars = dict(jax.jit(lambda k: s_plain.init(k, jnp.zeros((2, student_in_dim)), labels))(jax.random.fold_in(key, 0)))
    d_vars = dict(jax.jit(lambda k: d_plain.init(k, jnp.zeros((2, res, res, ch)), labels))(jax.random.fold_in(key, 1)))
    teacher_feats = {}
    if isinstance(teacher, stylegan2.Generator):
        z = jax.ShapeDtypeStruct((2, teacher.z_dim), jnp.float32)
        teacher_feats = jax.eval_shape(lambda v, z: distill.teacher_images(teacher, v, z, labels,
                                                                           return_features=True)[1], teacher_vars, z)
    student_feats = jax.eval_shape(lambda v: s_plain.apply(v, jnp.zeros((2, student_in_dim)), labels,
                                                           return_features=True)[1], s_vars)
    adapters = distill.FeatureAdapters({k: teacher_feats[k].shape[-1] for k in student_feats if k in teacher_feats})
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), student_feats)
    a_params = jax.jit(adapters.init)(jax.random.fold_in(key, 2), zeros).get("params", {})
    s_params, d_params = s_vars.pop("params"), d_vars.pop("params")
    trainable = {"student": s_params, "adapters": a_params}
    state = distill.DistillState(step=jnp.zeros((), jnp.int32), student=trainable, student_state=s_vars,
                                 s_opt=s_tx.init(trainable), d_params=d_params, d_state=d_vars,
                                 d_opt=d_tx.init(d_params), student_ema=s_params)
    return state, adapters


# -------------------------------------------------------------------------------------------- run
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any] | None:
    """Distils, trains the baseline, evaluates; returns the report (None when stopped early)."""
    workdir = pathlib.Path(workdir)
    dtype = jnp.dtype(config.compute_dtype)
    mesh = parallel.make_mesh()
    dataset = data.load_dataset(config.data)
    t_meta, t_vars = checkpoints.load_model_bundle(config.teacher.checkpoint, "config.teacher.checkpoint", mesh)
    j_meta, j_vars = checkpoints.load_model_bundle(config.judge.checkpoint, "config.judge.checkpoint", mesh)
    teacher = models.build_model(t_meta["model"], **t_meta["kwargs"])
    judge = models.build_model(j_meta["model"], **j_meta["kwargs"])
    t_spec = evaluate.generator_spec(teacher)
    shape = (t_spec["resolution"], t_spec["channels"], t_spec["num_classes"])
    d = config.distill
    student_in_dim = teacher.w_dim if d.reuse_mapping else t_spec["z_dim"]
    s_kwargs = {**gan.model_kwargs(config.student, shape), "z_dim": student_in_dim}
    d_kwargs = gan.model_kwargs(config.discriminator, shape)
    student = models.build_model(config.student.model, **s_kwargs, **gan.FAMILIES[config.student.model]["dp"],
                                 dtype=dtype)
    discriminator = models.build_model(config.discriminator.model, **d_kwargs,
                                       **gan.FAMILIES[config.discriminator.model]["dp"], dtype=dtype)
    s_tx = optim.make_optimizer(config.train.optimizer, config.train.num_steps)
    d_tx = optim.make_optimizer(config.d_optimizer, config.train.num_steps)
    key = jax.random.key(config.seed)
    host_t_vars = parallel.to_host(t_vars)
    state, adapters = init_state(teacher, host_t_vars, student, discriminator, student_in_dim, s_tx, d_tx, shape, key)
    state = parallel.replicate(state, mesh)
    step = distill.make_distill_step(teacher, student, judge, discriminator, adapters, s_tx, d_tx, mesh, d,
                                     shape[2], key)
    writer = metric_writers.MultiWriter([summaries.create_writer(workdir), summaries.HistoryWriter(workdir)])
    budget = loop.StepBudget(config.stop_after_steps)

    # Side-by-side samples (teacher row, student EMA row) on fixed latents at every log step.
    eval_student = gan.outside_data_parallel(student)
    eval_gen = MappedStudent(teacher, eval_student, d.truncation_psi) if d.reuse_mapping else eval_student
    sample_z = jax.random.normal(jax.random.fold_in(key, 7), (8, t_spec["z_dim"]))
    sample_y = jnp.arange(8) % shape[2] if shape[2] else None
    teacher_row = distill.teacher_images(teacher, host_t_vars, sample_z, sample_y, d.truncation_psi)

    def student_variables(s: distill.DistillState) -> dict[str, Any]:
        """The EMA student's variables on the host (what the bundle holds)."""
        params, s_state = parallel.to_host((s.student_ema, s.student_state))
        return {"params": params, **s_state}

    def eval_variables(student_vars: dict[str, Any]) -> dict[str, Any]:
        return mapped_variables(host_t_vars, student_vars) if d.reuse_mapping else student_vars

    def write_samples(step_number: int, s: distill.DistillState) -> None:
        row = eval_gen.apply(eval_variables(student_variables(s)), sample_z, sample_y, train=False)
        summaries.write_images(writer, workdir, step_number,
                               {"samples/teacher_vs_student_kd": jnp.concatenate([teacher_row, row])}, columns=8)

    batches = data.TrainBatches(dataset.train, config.train.batch_size, seed=config.seed,
                                num_threads=config.data.num_threads)
    options = loop.LoopOptions(config.train.num_steps, config.log_every, config.checkpoint_every, config.max_to_keep,
                               config.async_checkpoints)
    state, finished = loop.run("student_kd", workdir, state, lambda s, b: step(s, b, t_vars, j_vars), batches.iterate,
                               mesh, options, writer, budget, on_log=write_samples)
    if not finished:
        return None
    kd_vars = student_variables(state)
    # With reuse_mapping the bundle holds the student alone, which consumes the teacher's w (see MappedStudent).
    extra = {"consumes": "teacher w (reuse_mapping)"} if d.reuse_mapping else None
    checkpoints.save_model_bundle(workdir / "student_kd" / "bundle", config.student.model, s_kwargs, kd_vars, extra=extra)
    # "teacher" is what the students were taught to copy (constant noise, truncation psi): the fidelity reference.
    generators = {"teacher": (distill.DistillationTargets(teacher, d.truncation_psi),
                              distill.targets_variables(host_t_vars)),
                  "student_kd": (eval_gen, eval_variables(kd_vars))}

    if config.scratch.enabled:
        scratch_cfg = scratch_config(config, t_spec["z_dim"])
        scratch_cfg.stop_after_steps = (-1 if budget.stop_after_steps < 0
                                        else max(budget.stop_after_steps - budget.used, 0))
        summary = gan.train_and_evaluate(scratch_cfg, workdir, phase="student_scratch", writer=writer)
        if summary is None:
            return None
        s_meta, s_vars = checkpoints.load_model_bundle(summary["generator_bundle"], "student_scratch bundle")
        s_model = models.build_model(s_meta["model"], **s_meta["kwargs"])
        generators["student_scratch"] = (s_model, s_vars)  # with reuse_mapping it takes w: no fidelity columns

    # The report.
    real = to_model_range(np.stack([dataset.test[i]["image"] for i in range(len(dataset.test))]))
    ev = evaluate.evaluate_generators(generators, (judge, parallel.to_host(j_vars)), real, reference="teacher",
                                      num_samples=config.eval.num_samples, batch_size=config.eval_batch_size,
                                      seed=config.seed, workdir=workdir / "eval", writer=writer,
                                      timing_batch_sizes=tuple(config.eval.timing_batch_sizes))
    report = make_report(ev, generators, tuple(config.eval.timing_batch_sizes)[-1], dataset.name)
    if jax.process_index() == 0:
        history = summaries.read_history(workdir)
        summaries.plot_curves(history, workdir / "loss_curves.png")
        (workdir / "report.json").write_text(json.dumps(report, indent=2))
        table = report_table(report, config)
        (workdir / "report.md").write_text(table + "\n\n![loss curves](loss_curves.png)\n\n"
                                           "![samples: teacher, student_kd, student_scratch](eval/samples.png)\n\n"
                                           "![spectra](eval/spectra.png)\n")
        print(table)
    writer.flush()
    return report


def make_report(ev: dict[str, Any], generators: dict[str, Any], timing_batch: int, dataset: str) -> dict[str, Any]:
    """report.json: the issue's keys per model (fidelity vs the teacher; None for the teacher itself), plus
    the rest of the evaluation under `more`."""
    report: dict[str, Any] = {}
    for name in generators:
        r = ev[name]
        report[name] = {
            "fid": r["fid"], "kid": r["kid_mean"], "precision": r["precision"], "recall": r["recall"],
            "psnr_vs_teacher": r.get("psnr_vs_reference"), "ssim_vs_teacher": r.get("ssim_vs_reference"),
            "params": int(r["params"]), "flops_per_image": r["flops_per_image"],
            "images_per_s": r[f"images_per_s_at_{timing_batch}"],
            "more": {k: v for k, v in r.items() if k != "spectrum" and not isinstance(v, (list, dict))}}
    report.update({"num_samples": ev["num_samples"], "num_real": ev["num_real"], "device": ev["device"],
                   "images_per_s_batch_size": timing_batch, "dataset": dataset, "metric_features": "judge 'pool'"})
    return report


def report_table(report: dict[str, Any], config: ml_collections.ConfigDict) -> str:
    """The markdown table of the main job's report."""
    fmt = lambda v, f: "-" if v is None else format(v, f)
    rows = ["| model | FID | KID | precision | recall | PSNR vs teacher | SSIM vs teacher | params | MFLOPs/img | "
            f"img/s (batch {report['images_per_s_batch_size']}) |", "|---" * 10 + "|"]
    for name in ("teacher", "student_kd", "student_scratch"):
        if name not in report:
            continue
        r = report[name]
        rows.append(f"| {name} | {fmt(r['fid'], '.3f')} | {fmt(r['kid'], '.4f')} | {fmt(r['precision'], '.3f')} | "
                    f"{fmt(r['recall'], '.3f')} | {fmt(r['psnr_vs_teacher'], '.2f')} | "
                    f"{fmt(r['ssim_vs_teacher'], '.4f')} | {r['params']:,} | {r['flops_per_image'] / 1e6:.1f} | "
                    f"{r['images_per_s']:,.0f} |")
    active = [t for t in distill.TERMS if config.distill.weights[t].value > 0 or config.distill.weights[t].end_value > 0]
    return "\n".join(rows) + (
        f"\n\nFID/KID/precision/recall against {report['num_real']} held-out {report['dataset']} images in the judge's "
        f"features ({report['num_samples']} samples per model; not comparable to Inception FID). Students: "
        f"{config.train.num_steps} steps at batch {config.train.batch_size}; distillation terms {active}. "
        f"The teacher row is the distillation target the students are compared with (StyleGAN2: constant noise "
        f"inputs, truncation psi {config.distill.truncation_psi}). "
        f"Device: {report['device']}.")
