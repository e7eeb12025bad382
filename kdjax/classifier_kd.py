"""Classic knowledge distillation (Hinton et al. 2015): a classifier teacher taught to a smaller student.

The task `classifier_kd` runs three phases, each resumable, in `workdir/PHASE/`:
1. `teacher`: the teacher trained on the labels (cross-entropy), or loaded from `config.teacher.checkpoint`
   (a model bundle) and frozen;
2. `student_kd`: the student trained on
   `alpha * CE(z_s, y) + (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`
   (`kdjax.losses.classic_kd`), the teacher frozen and outside the optimizer and the checkpoints;
3. `student_scratch`: the same student, same budget and seed, on the labels alone (alpha = 1).
Each phase's final variables are exported as a model bundle in `workdir/PHASE/bundle` (see
`kdjax.checkpoints`). Then each is evaluated on the held-out split (accuracy, macro-F1, ECE, parameters) and the table is
written to `report.md`, `report.json` and the console.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from jax.sharding import Mesh, PartitionSpec as P

from kdjax import checkpoints, cost, data, loop, losses, models, optim, parallel, summaries
from kdjax.evaluation import classification
from kdjax.train_state import TrainState

DATA = parallel.DATA_AXIS


def build_classifier(block: ml_collections.ConfigDict, num_classes: int, dtype: Any) -> nn.Module:
    """The classifier a config block (`teacher` / `student`) names, wired for data-parallel training."""
    kwargs = dict(block.kwargs.to_dict())
    return models.build_model(block.model, num_classes=num_classes, dtype=dtype, bn_axis_name=DATA, **kwargs)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    teacher: nn.Module | None = None, alpha: float = 1.0, temperature: float = 1.0) -> Callable:
    """The jitted data-parallel step `(state, batch, teacher_variables) -> (state, metrics)`.

    Without a teacher the loss is CE(z_s, y); with one it is `losses.classic_kd`. The gradient is taken
    of the device-mean loss (`lax.pmean` inside the differentiated function): see `kdjax.parallel`.
    """
    names = ["loss", "ce", "accuracy"] + (["kl"] if teacher is not None else [])
    Metrics = clu_metrics.Collection.create(**{n: clu_metrics.Average.from_output(n) for n in names})

    def per_device(state: TrainState, batch: dict, teacher_variables: Any):
        images, labels = batch["image"], batch["label"]

        def loss_fn(params):
            logits, new_model_state = model.apply({"params": params, **state.model_state}, images, train=True,
                                                  mutable=list(state.model_state.keys()))
            if teacher is None:
                loss = losses.softmax_cross_entropy(logits, labels)
                terms = {"ce": loss}
            else:
                teacher_logits = teacher.apply(teacher_variables, images, train=False)
                loss, terms = losses.classic_kd(logits, teacher_logits, labels, alpha, temperature)
            return jax.lax.pmean(loss, DATA), (terms, new_model_state, logits)

        (loss, (terms, new_model_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state, model_state=new_model_state)
        accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        scalars = jax.lax.pmean({**terms, "accuracy": accuracy}, DATA)
        return new_state, {"loss": loss, **scalars}

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA), P()), out_specs=(P(), P()))

    def step(state, batch, teacher_variables):
        state, scalars = sharded(state, batch, teacher_variables)
        return state, Metrics.single_from_model_output(**scalars)

    return jax.jit(step, donate_argnums=(0,))


def make_predict(model: nn.Module, mesh: Mesh) -> Callable:
    """Jitted data-parallel inference: (variables, images) -> logits, batch-sharded."""
    return parallel.data_parallel(lambda v, x: model.apply(v, x, train=False), mesh,
                                  in_specs=(P(), P(DATA)), out_specs=P(DATA))


def test_logits(model: nn.Module, variables: Any, dataset: data.Dataset, mesh: Mesh,
                batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of the whole held-out split (padding removed)."""
    predict = make_predict(model, mesh)
    all_logits, all_labels = [], []
    for batch in data.eval_batches(dataset.test, batch_size):
        mask = parallel.to_host(parallel.global_batch(batch["mask"], mesh)) > 0
        logits = parallel.to_host(predict(variables, parallel.global_batch(batch["image"], mesh)))
        labels = parallel.to_host(parallel.global_batch(batch["label"], mesh))
        all_logits.append(logits[mask]), all_labels.append(labels[mask])
    return np.concatenate(all_logits), np.concatenate(all_labels)


def train_phase(name: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, model: nn.Module,
                dataset: data.Dataset, mesh: Mesh, writer, budget: loop.StepBudget,
                teacher: tuple[nn.Module, Any] | None = None, alpha: float = 1.0) -> tuple[Any, bool]:
    """Trains one classifier phase; returns (variables, finished)."""
    train_cfg = config.teacher.train if name == "teacher" else config.student.train
    tx = optim.make_optimizer(train_cfg.optimizer, train_cfg.num_steps)
    key = jax.random.key(config.seed)
    sample = jnp.zeros((1, dataset.resolution, dataset.resolution, dataset.channels), jnp.float32)
    init_model = model.clone(bn_axis_name=None)  # initialisation runs outside the data-parallel step
    # Both students start from the same initialisation (same seed), the teacher from another.
    init_key = jax.random.fold_in(key, 0 if name == "teacher" else 1)
    variables = jax.jit(lambda k: init_model.init(k, sample, train=False))(init_key)
    state = parallel.replicate(TrainState.create(variables, tx), mesh)
    teacher_model, teacher_variables = teacher if teacher is not None else (None, {})
    step = make_train_step(model, tx, mesh, teacher_model, alpha, config.kd.temperature)
    batches = data.TrainBatches(dataset.train, train_cfg.batch_size, seed=config.seed,
                                num_threads=config.data.num_threads)
    options = loop.LoopOptions(train_cfg.num_steps, config.log_every, config.checkpoint_every,
                               config.max_to_keep, config.async_checkpoints)
    state, finished = loop.run(name, workdir, state, lambda s, b: step(s, b, teacher_variables),
                               batches.iterate, mesh, options, writer, budget)
    return state.variables(), finished


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any] | None:
    """Runs the three phases and the evaluation; returns the report (None if stopped early)."""
    workdir = pathlib.Path(workdir)
    dtype = jnp.dtype(config.compute_dtype)
    mesh = parallel.make_mesh()
    dataset = data.load_dataset(config.data)
    if dataset.num_classes < 2:
        raise ValueError(f"classifier_kd needs labelled data; dataset {dataset.name!r} has "
                         f"{dataset.num_classes} classes (for a folder: one sub-folder per class).")
    writer = summaries.create_writer(workdir)
    budget = loop.StepBudget(config.stop_after_steps)
    example = data.TrainBatches(dataset.train, min(64, len(dataset.train)), config.seed, 0, 1).batch(0)
    summaries.write_images(writer, workdir, 0, {"data/train_examples": example["image"][:64]})

    # 1. Teacher: trained here, or a frozen bundle.
    student_model = build_classifier(config.student, dataset.num_classes, dtype)
    if config.teacher.checkpoint:
        meta, teacher_vars = checkpoints.load_model_bundle(config.teacher.checkpoint, "config.teacher.checkpoint",
                                                           mesh)
        teacher_model = models.build_model(meta["model"], **{**meta["kwargs"], "dtype": dtype})
        teacher_name, teacher_kwargs = meta["model"], meta["kwargs"]
    else:
        teacher_model = build_classifier(config.teacher, dataset.num_classes, dtype)
        teacher_vars, finished = train_phase("teacher", config, workdir, teacher_model, dataset, mesh, writer, budget)
        if not finished:
            return None
        teacher_name = config.teacher.model
        teacher_kwargs = {**config.teacher.kwargs.to_dict(), "num_classes": dataset.num_classes}
        checkpoints.save_model_bundle(workdir / "teacher" / "bundle", teacher_name, teacher_kwargs, teacher_vars)

    # 2. and 3. The student, distilled and from scratch, with the same budget and seed.
    results_vars = {"teacher": teacher_vars}
    for phase, alpha, teacher in (("student_kd", config.kd.alpha, (teacher_model, teacher_vars)),
                                  ("student_scratch", 1.0, None)):
        variables, finished = train_phase(phase, config, workdir, student_model, dataset, mesh, writer, budget,
                                          teacher=teacher, alpha=alpha)
        if not finished:
            return None
        results_vars[phase] = variables
        student_kwargs = {**config.student.kwargs.to_dict(), "num_classes": dataset.num_classes}
        checkpoints.save_model_bundle(workdir / phase / "bundle", config.student.model, student_kwargs, variables)

    # Evaluation on the held-out split.
    report: dict[str, Any] = {}
    eval_models = {"teacher": teacher_model, "student_kd": student_model, "student_scratch": student_model}
    for phase, model in eval_models.items():
        logits, labels = test_logits(model, results_vars[phase], dataset, mesh, config.eval_batch_size)
        report[phase] = {**classification.classification_report(logits, labels, dataset.num_classes),
                         "params": cost.count_params(results_vars[phase])}
    report["num_test_examples"] = int(len(dataset.test))
    report["dataset"] = dataset.name
    report["kd"] = {"alpha": config.kd.alpha, "temperature": config.kd.temperature}
    step = config.student.train.num_steps
    writer.write_scalars(step, {f"eval/{p}/{k}": v for p in eval_models for k, v in report[p].items()})
    writer.flush()
    if jax.process_index() == 0:
        (workdir / "report.json").write_text(json.dumps(report, indent=2))
        table = report_table(report)
        (workdir / "report.md").write_text(table + "\n")
        print(table)
    return report


def report_table(report: dict[str, Any]) -> str:
    """The markdown table of the classic-KD report."""
    rows = ["| model | test accuracy | macro-F1 | ECE | parameters |", "|---|---|---|---|---|"]
    for phase in ("teacher", "student_kd", "student_scratch"):
        r = report[phase]
        rows.append(f"| {phase} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['ece']:.4f} | {r['params']:,} |")
    kd = report["kd"]
    return "\n".join(rows) + (f"\n\n{report['num_test_examples']} held-out {report['dataset']} images; "
                              f"alpha = {kd['alpha']}, T = {kd['temperature']}.")
