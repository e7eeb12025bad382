"""The main job (task `distill`): teacher -> distilled student, the same student from scratch, one report.

    python launch.py --config=configs/stylegan_to_dcgan.py

Phases, each resumable, in the workdir:
1. `student_kd`: the student (and its feature adapters) trained with `kdjax.steps.distill` (every term of the
   objective is there) against the frozen teacher and judge bundles; its EMA is exported to
   `student_kd/bundle`.
2. `student_scratch`: the same student architecture, seed, steps, batch and optimizers trained as a GAN on
   real data (`kdjax.tasks.gan`); exported to `student_scratch/bundle`. Off with `config.scratch.enabled=False`.
3. The report (`kdjax.evaluation.generators`, judge features): every model against the real set
   (`config.eval.real_split`, all the data by default) and against `config.eval.teacher_samples` samples of the
   teacher; `report.md`, `report.json`, `eval/` (spectra.png, samples.png with teacher / KD student / scratch
   student on the same latents, eval.json), `learning_curves.png` (both students' FID/KID during training,
   against steps and wall-clock; `kdjax.evaluation.curves`), `loss_curves.png` and TensorBoard events.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from kdjax import losses, models
from kdjax.config import DISTILL_TERMS, gan_config
from kdjax.core import data, optim, parallel, summaries
from kdjax.evaluation import generators as generator_eval
from kdjax.evaluation import report as report_io
from kdjax.evaluation.curves import LearningCurve, at_equal_time, plot_learning_curves
from kdjax.evaluation.generators import TEACHER_SUFFIX
from kdjax.models import bundles
from kdjax.models.wrappers import AtStage, DistillationTargets, MappedStudent, mapped_variables, targets_variables
from kdjax.steps import distill as distill_step
from kdjax.steps import loop
from kdjax.tasks import checks, gan
from kdjax.tasks.phase import model_from_block, run_phase

if TYPE_CHECKING:
    from clu import metric_writers

REPORT_KEYS = ("fid", "kid", "precision", "recall", "fid_vs_teacher_dist", "kid_vs_teacher_dist", "psnr_vs_teacher",
               "ssim_vs_teacher", "params", "flops_per_image", "images_per_s")


# ------------------------------------------------------------------------------------------ checks
def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates a `distill` config before any compute (raises ValueError naming the field)."""
    data.check_data_config(config.data)
    t_meta = bundles.check_model_bundle(config.teacher.checkpoint, "config.teacher.checkpoint", kind="generator")
    spec = models.build_model(t_meta["model"], **t_meta["kwargs"]).spec
    if (spec.resolution, spec.channels) != (config.data.resolution, config.data.channels):
        raise ValueError(f"config.teacher.checkpoint makes {spec.resolution}x{spec.resolution}x{spec.channels}"
                         f" images; config.data is {config.data.resolution}x{config.data.resolution}x"
                         f"{config.data.channels} (set --config.data.resolution / --config.data.channels).")
    bundles.check_model_bundle(config.judge.checkpoint, "config.judge.checkpoint", kind="classifier")
    checks.check_model_block(config.student, "config.student", "generator", "the teacher", also_taken=("z_dim",))
    checks.check_model_block(config.discriminator, "config.discriminator", "discriminator", "the teacher")
    check_objective(config.distill, t_meta["model"] == "stylegan2_generator", t_meta["model"])
    check_growth(config, spec.resolution)
    checks.check_phase(config.train, "config.train")
    optim.check_optimizer_config(config.d_optimizer, "config.d_optimizer")
    if config.scratch.num_steps < 0:
        raise ValueError(f"config.scratch.num_steps={config.scratch.num_steps} must be >= 0 (0 = config.train's).")
    if config.scratch.enabled:
        gan.check_config(scratch_config(config, spec.z_dim))
    ev = config.eval
    if ev.num_samples < 4 or 0 < ev.teacher_samples < 4 or ev.curve_samples < 4:
        raise ValueError(f"config.eval: num_samples={ev.num_samples}, curve_samples={ev.curve_samples} and "
                         f"teacher_samples={ev.teacher_samples} (0 = off) must be >= 4 (k-NN with k = 3).")
    if ev.real_split not in generator_eval.REAL_SPLITS:
        raise ValueError(f"config.eval.real_split={ev.real_split!r}; valid: {list(generator_eval.REAL_SPLITS)}.")
    if ev.curve_every < 1 or ev.curve_every % config.log_every:
        raise ValueError(f"config.eval.curve_every={ev.curve_every} must be a positive multiple of config.log_every="
                         f"{config.log_every} (curve points are taken at log steps).")
    if not config.eval.timing_batch_sizes or min(config.eval.timing_batch_sizes) < 1:
        raise ValueError(f"config.eval.timing_batch_sizes={config.eval.timing_batch_sizes} must be positive sizes.")


def check_objective(d: ml_collections.ConfigDict, stylegan2_teacher: bool, teacher_model: str) -> None:
    """`config.distill`: the term weights and schedules, and the options that need a StyleGAN2 teacher."""
    unknown = set(d.weights) - set(DISTILL_TERMS)
    if unknown:
        raise ValueError(f"config.distill.weights: unknown terms {sorted(unknown)}; valid: {list(DISTILL_TERMS)}.")
    for term in DISTILL_TERMS:
        w = d.weights[term]
        if w.value < 0 or w.end_value < 0:
            raise ValueError(f"config.distill.weights.{term}: weights must be >= 0 (0 turns the term off).")
        if w.end_step > 0 and not 0 <= w.start_step < w.end_step:
            raise ValueError(f"config.distill.weights.{term}: need 0 <= start_step < end_step for a schedule.")
    if not distill_step.active_terms(d.weights):
        raise ValueError(f"config.distill.weights: every term is 0; turn on at least one of {list(DISTILL_TERMS)}.")
    if d.reuse_mapping and not stylegan2_teacher:
        raise ValueError("config.distill.reuse_mapping needs a StyleGAN2 teacher (it has a mapping network); "
                         f"the teacher is a {teacher_model!r}.")
    if "feature" in distill_step.active_terms(d.weights) and not stylegan2_teacher:
        raise ValueError("config.distill.weights.feature needs a StyleGAN2 teacher (block features).")
    if not d.temperature > 0:
        raise ValueError(f"config.distill.temperature={d.temperature} must be > 0.")
    checks.check_fraction(d.alpha, "config.distill.alpha")
    checks.check_fraction(d.truncation_psi, "config.distill.truncation_psi")
    if d.truncation_psi != 1.0 and not stylegan2_teacher:
        raise ValueError(f"config.distill.truncation_psi={d.truncation_psi} needs a StyleGAN2 teacher (a mapping "
                         f"network to truncate); the teacher is a {teacher_model!r}: leave it at 1.0.")
    if d.adv_loss not in losses.ADVERSARIAL:
        raise ValueError(f"config.distill.adv_loss={d.adv_loss!r}; valid: {list(losses.ADVERSARIAL)}.")
    if d.r1_gamma < 0 or d.r1_every < 1:
        raise ValueError(f"config.distill.r1_gamma={d.r1_gamma} must be >= 0 and r1_every={d.r1_every} >= 1.")
    checks.check_fraction(d.ema_decay, "config.distill.ema_decay", closed_high=False)


def check_growth(config: ml_collections.ConfigDict, resolution: int) -> None:
    """`config.distill.progressive`: a DCGAN student, a power-of-two start in [8, resolution], a fade fraction,
    at least one step per stage."""
    g = config.distill.progressive
    if not g.enabled:
        return
    if config.student.model != "dcgan_generator":
        raise ValueError(f"config.distill.progressive needs a 'dcgan_generator' student (it grows stage by stage); "
                         f"the student is a {config.student.model!r}.")
    start = g.start_resolution
    if start < 8 or start > resolution or start & (start - 1):
        raise ValueError(f"config.distill.progressive.start_resolution={start} must be a power of two in "
                         f"[8, {resolution}] (the data's resolution).")
    checks.check_fraction(g.fade_fraction, "config.distill.progressive.fade_fraction")
    stages = distill_step.Growth.plan(start, resolution, config.train.num_steps, g.fade_fraction).stages
    if config.train.num_steps < len(stages):
        raise ValueError(f"config.train.num_steps={config.train.num_steps} is fewer than the {len(stages)} stages "
                         f"{list(stages)} of config.distill.progressive.")


def scratch_config(config: ml_collections.ConfigDict, z_dim: int) -> ml_collections.ConfigDict:
    """The `gan` config of the from-scratch baseline: the student and discriminator of `config` (the student
    taking the teacher's z_dim, so all three models share latents), the same seed, steps, batch and
    optimizers (`config.train`, `config.d_optimizer`; `config.scratch.num_steps` steps when it is not 0, e.g.
    for a comparison at equal wall-clock time), trained on real data."""
    cfg = ml_collections.ConfigDict({k: config[k] for k in ("task", "seed", "compute_dtype", "log_every",
                                                            "checkpoint_every", "max_to_keep", "async_checkpoints",
                                                            "stop_after_steps", "eval_batch_size", "data")})
    cfg.task = "gan"
    cfg.generator, cfg.discriminator = ml_collections.ConfigDict(config.student.to_dict()), config.discriminator
    cfg.generator.kwargs.z_dim = z_dim
    train = ml_collections.ConfigDict(config.train.to_dict())
    train.num_steps = config.scratch.num_steps or config.train.num_steps
    cfg.gan = gan_config(loss=config.scratch.loss, r1_gamma=config.scratch.r1_gamma, r1_every=config.scratch.r1_every,
                         ema_decay=config.distill.ema_decay, train=train, d_optimizer=config.d_optimizer)
    return cfg


# -------------------------------------------------------------------------------------------- run
def load_frozen(config: ml_collections.ConfigDict, mesh) -> dict[str, tuple[nn.Module, Any]]:
    """The teacher and the judge, (module, variables replicated over `mesh`), from their bundles."""
    teacher, t_vars, _ = bundles.load_model(config.teacher.checkpoint, "config.teacher.checkpoint", mesh)
    judge, j_vars, _ = bundles.load_model(config.judge.checkpoint, "config.judge.checkpoint", mesh)
    return {"teacher": (teacher, t_vars), "judge": (judge, j_vars)}


def distill_phase(config: ml_collections.ConfigDict, workdir: pathlib.Path, dataset: data.Dataset,
                  frozen: dict[str, tuple[nn.Module, Any]], writer: metric_writers.MetricWriter,
                  budget: loop.StepBudget, curve: LearningCurve) -> dict[str, Any] | None:
    """Phase `student_kd`: distils the teacher into the student; exports `student_kd/bundle`. Returns the
    generators the report evaluates so far ("teacher": the distillation targets, "student_kd"), each as
    (module, host variables), or None when the launch stopped early."""
    dtype = jnp.dtype(config.compute_dtype)
    mesh = parallel.make_mesh()
    (teacher, t_vars), (judge, j_vars) = frozen["teacher"], frozen["judge"]
    spec, d = teacher.spec, config.distill
    shape = (spec.resolution, spec.channels, spec.num_classes)
    student_in_dim = teacher.w_dim if d.reuse_mapping else spec.z_dim
    growth = (distill_step.Growth.plan(d.progressive.start_resolution, spec.resolution, config.train.num_steps,
                                       d.progressive.fade_fraction) if d.progressive.enabled else None)
    student, s_kwargs = model_from_block(config.student, shape, dtype, z_dim=student_in_dim,
                                         **({"progressive": True} if growth else {}))
    discriminator, _ = model_from_block(config.discriminator, shape, dtype)
    s_tx = optim.make_optimizer(config.train.optimizer, config.train.num_steps)
    d_tx = optim.make_optimizer(config.d_optimizer, config.train.num_steps)
    key = jax.random.key(config.seed)
    host_t_vars = parallel.to_host(t_vars)
    state, adapters = distill_step.init_state(teacher, host_t_vars, student, discriminator, student_in_dim, s_tx,
                                              d_tx, shape, key)
    objective = distill_step.Objective(teacher, student, judge, discriminator, adapters, d, shape[2], growth)
    step = distill_step.make_distill_step(objective, s_tx, d_tx, mesh, key)

    # Side-by-side samples (teacher row, student EMA row) on fixed latents and the learning curve, at log steps.
    eval_student = models.outside_data_parallel(student)
    eval_gen = MappedStudent(teacher, eval_student, d.truncation_psi) if d.reuse_mapping else eval_student
    eval_vars = lambda student_vars: mapped_variables(host_t_vars, student_vars) if d.reuse_mapping else student_vars
    sample_z = jax.random.normal(jax.random.fold_in(key, 7), (8, spec.z_dim))
    sample_y = jnp.arange(8) % shape[2] if shape[2] else None
    teacher_row = distill_step.teacher_images(teacher, host_t_vars, sample_z, sample_y, d.truncation_psi)

    def on_log(step_number: int, s: distill_step.DistillState) -> None:
        generator, variables = eval_gen, eval_vars(student_variables(s))
        if growth is not None and step_number < config.train.num_steps:  # the student as grown so far
            index = growth.stage_index(step_number)
            generator = AtStage(eval_gen, growth.stages[index], float(growth.alpha(index, step_number)))
            variables = {c: {"generator": v} for c, v in variables.items()}
        row = generator.apply(variables, sample_z, sample_y, train=False)
        summaries.write_images(writer, workdir, step_number,
                               {"samples/teacher_vs_student_kd": jnp.concatenate([teacher_row, row])}, columns=8)
        curve.probe("student_kd", step_number, generator, variables)

    curve.start("student_kd", summaries.read_history(workdir))
    state, finished = run_phase("student_kd", config, workdir, parallel.replicate(state, mesh),
                                lambda s, b: step(s, b, t_vars, j_vars), dataset.train, config.train, mesh, writer,
                                budget, on_log=on_log)
    if not finished:
        return None
    kd_vars = student_variables(state)
    # With reuse_mapping the bundle holds the student alone, which consumes the teacher's w (see MappedStudent).
    extra = {"consumes": "teacher w (reuse_mapping)"} if d.reuse_mapping else None
    bundles.save_model_bundle(workdir / "student_kd" / "bundle", config.student.model, s_kwargs, kd_vars, extra=extra)
    # "teacher" is what the students were taught to copy (constant noise, truncation psi): the fidelity reference.
    return {"teacher": (DistillationTargets(teacher, d.truncation_psi), targets_variables(host_t_vars)),
            "student_kd": (eval_gen, eval_vars(kd_vars))}


def student_variables(state: distill_step.DistillState) -> dict[str, Any]:
    """The EMA student's variables on the host (what the bundle holds)."""
    params, s_state = parallel.to_host((state.student_ema, state.student_state))
    return {"params": params, **s_state}


def scratch_phase(config: ml_collections.ConfigDict, workdir: pathlib.Path, z_dim: int,
                  writer: metric_writers.MetricWriter, budget: loop.StepBudget,
                  curve: LearningCurve) -> tuple[nn.Module, Any] | None:
    """Phase `student_scratch`: the same student trained as a GAN on real data with the same budget (the
    rest of this launch's step budget); returns (module, variables) of its bundle, or None when stopped."""
    scratch_cfg = scratch_config(config, z_dim)
    scratch_cfg.stop_after_steps = -1 if budget.stop_after_steps < 0 else max(budget.stop_after_steps - budget.used, 0)
    curve.start("student_scratch", summaries.read_history(workdir))
    summary = gan.train_and_evaluate(scratch_cfg, workdir, phase="student_scratch", writer=writer,
                                     probe=lambda step, g, v: curve.probe("student_scratch", step, g, v))
    if summary is None:
        return None
    model, variables, _ = bundles.load_model(summary["generator_bundle"], "student_scratch bundle")
    return model, variables  # with reuse_mapping it takes w: no fidelity columns


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any] | None:
    """Distils, trains the baseline, evaluates; returns the report (None when stopped early)."""
    workdir = pathlib.Path(workdir)
    dataset = data.load_dataset(config.data)
    writer = summaries.create_writer(workdir, history=True)
    budget = loop.StepBudget(config.stop_after_steps)
    frozen = load_frozen(config, parallel.make_mesh())
    real = generator_eval.real_set(dataset, config.eval.real_split)
    judge = (frozen["judge"][0], parallel.to_host(frozen["judge"][1]))
    spec = frozen["teacher"][0].spec
    curve = LearningCurve(judge, generator_eval.judge_pool(judge, real, config.eval_batch_size),
                          config.eval.curve_samples, config.eval.curve_every, config.seed, writer, spec.z_dim,
                          spec.num_classes)
    generators = distill_phase(config, workdir, dataset, frozen, writer, budget, curve)
    if generators is None:
        return None
    if config.scratch.enabled:
        scratch = scratch_phase(config, workdir, spec.z_dim, writer, budget, curve)
        if scratch is None:
            return None
        generators["student_scratch"] = scratch

    teacher_distribution = (generators["teacher"], config.eval.teacher_samples) if config.eval.teacher_samples else None
    ev = generator_eval.evaluate_generators(
        generators, judge, real, reference="teacher", num_samples=config.eval.num_samples,
        batch_size=config.eval_batch_size, seed=config.seed, workdir=workdir / "eval", writer=writer,
        timing_batch_sizes=tuple(config.eval.timing_batch_sizes), teacher_distribution=teacher_distribution)
    history = summaries.read_history(workdir)
    out = make_report(ev, generators, tuple(config.eval.timing_batch_sizes)[-1], dataset.name,
                      config.eval.real_split, history)
    if jax.process_index() == 0:
        summaries.plot_curves(history, workdir / "loss_curves.png")
        plot_learning_curves(history, workdir / "learning_curves.png")
    report_io.write_report(workdir, "report", out, report_table(out, config),
                           "\n\n![learning curves](learning_curves.png)\n\n![loss curves](loss_curves.png)\n\n"
                           "![samples: teacher, student_kd, student_scratch](eval/samples.png)\n\n"
                           "![spectra](eval/spectra.png)")
    writer.flush()
    return out


def make_report(ev: dict[str, Any], generators: dict[str, Any], timing_batch: int, dataset: str, real_split: str,
                history: dict[str, list[tuple[int, float]]]) -> dict[str, Any]:
    """report.json: `REPORT_KEYS` per model (fidelity vs the teacher; None for the teacher itself), plus the
    rest of the evaluation under `more`, the sample counts, and the students at equal training time."""
    out: dict[str, Any] = {}
    for name in generators:
        r = ev[name]
        out[name] = {
            "fid": r["fid"], "kid": r["kid_mean"], "precision": r["precision"], "recall": r["recall"],
            "fid_vs_teacher_dist": r.get("fid" + TEACHER_SUFFIX), "kid_vs_teacher_dist": r.get("kid_mean" + TEACHER_SUFFIX),
            "psnr_vs_teacher": r.get("psnr_vs_reference"), "ssim_vs_teacher": r.get("ssim_vs_reference"),
            "params": int(r["params"]), "flops_per_image": r["flops_per_image"],
            "images_per_s": r[f"images_per_s_at_{timing_batch}"],
            "more": {k: v for k, v in r.items() if k != "spectrum" and not isinstance(v, (list, dict))}}
    out.update({"num_samples": ev["num_samples"], "num_real": ev["num_real"], "real_split": real_split,
                "num_teacher_samples": ev["num_teacher_samples"], "device": ev["device"],
                "images_per_s_batch_size": timing_batch, "dataset": dataset, "metric_features": "judge 'pool'"})
    if "student_scratch" in out:  # the claims: KD against scratch and against the teacher
        rows = {"scratch": "student_scratch", "teacher": "teacher"}
        out["ratios"] = {f"kd_over_{other}_{m}": out["student_kd"][m] / out[row][m]
                         for other, row in rows.items() for m in ("fid", "kid") if out[row][m]}
    equal_time = {m: at_equal_time(history, "student_scratch", "student_kd", m) for m in ("fid", "kid")}
    if all(equal_time.values()):
        out["equal_time"] = equal_time  # the KD student's curve value at the scratch phase's total time
    return out


def report_table(out: dict[str, Any], config: ml_collections.ConfigDict) -> str:
    """The markdown table of the main job's report."""
    cell = report_io.cell
    headers = ["model", "FID", "KID", "precision", "recall", "FID vs T dist", "KID vs T dist", "PSNR vs teacher",
               "SSIM vs teacher", "params", "MFLOPs/img", f"img/s (batch {out['images_per_s_batch_size']})"]
    rows = [[name, cell(r["fid"], ".3f"), cell(r["kid"], ".4f"), cell(r["precision"], ".3f"),
             cell(r["recall"], ".3f"), cell(r["fid_vs_teacher_dist"], ".3f"), cell(r["kid_vs_teacher_dist"], ".4f"),
             cell(r["psnr_vs_teacher"], ".2f"), cell(r["ssim_vs_teacher"], ".4f"), f"{r['params']:,}",
             cell(r["flops_per_image"], ".1f", 1e-6), f"{r['images_per_s']:,.0f}"]
            for name, r in ((n, out[n]) for n in ("teacher", "student_kd", "student_scratch") if n in out)]
    active = distill_step.active_terms(config.distill.weights)
    text = report_io.markdown_table(headers, rows) + (
        f"\n\nFID/KID/precision/recall against {out['num_real']} real {out['dataset']} images (split "
        f"'{out['real_split']}') in the judge's features, {out['num_samples']} samples per model; "
        + (f"'vs T dist': against {out['num_teacher_samples']} samples of the teacher on latents of their own (the "
           "teacher's own row is the floor at this sample count); " if out["num_teacher_samples"] else "")
        + f"not comparable to Inception FID. Students: {config.train.num_steps} "
        f"steps at batch {config.train.batch_size}; distillation terms {active}"
        + (" (D also sees real data)" if config.distill.d_real_data and "adv" in active else "")
        + ". The teacher row is the "
        f"distillation target the students are compared with (StyleGAN2: constant noise inputs, truncation psi "
        f"{config.distill.truncation_psi}). Device: {out['device']}.")
    if "equal_time" in out:
        e = out["equal_time"]
        text += (f" At equal training time ({e['fid']['seconds']:.0f} s, the scratch phase's whole run), the learning"
                 f" curves ({config.eval.curve_samples} samples) give FID {e['fid']['student_kd']:.2f} / KID "
                 f"{e['kid']['student_kd']:.4f} for student_kd against {e['fid']['student_scratch']:.2f} / "
                 f"{e['kid']['student_scratch']:.4f} for student_scratch.")
    return text
