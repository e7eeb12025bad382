"""Classic knowledge distillation (Hinton et al. 2015): a classifier teacher taught to a smaller student.

The task `classifier_kd` runs three phases, each resumable, in `workdir/PHASE/`:
1. `teacher`: the teacher trained on the labels (cross-entropy), or loaded from `config.teacher.checkpoint`
   (a model bundle) and frozen;
2. `student_kd`: the student trained on
   `alpha * CE(z_s, y) + (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`
   (`kdjax.losses.classic_kd`) [+ `kd.embedding * relational_distance(e_s, e_t)` on the pooled embeddings],
   the teacher frozen and outside the optimizer and the checkpoints;
3. `student_scratch`: the same student, same budget and seed, on the labels alone (alpha = 1).
Each phase's final variables are exported as a model bundle in `workdir/PHASE/bundle` (see
`kdjax.models.bundles`). Then each is evaluated on the held-out split (accuracy, macro-F1, ECE, parameters,
and retrieval: recall@1, recall@5 and mAP of the test images as queries against the training images)
and the table is written to `report.md`, `report.json` and the console. With
`config.data.validation_fraction > 0` each model is also scored on a validation split carved from the
training images (`report.json`: `PHASE.validation`), to choose settings on without looking at the test split.
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from kdjax import models
from kdjax.core import data, optim, parallel, summaries
from kdjax.evaluation import classification, cost, report, retrieval
from kdjax.models import bundles
from kdjax.steps import loop
from kdjax.steps.classifier import make_predict, make_train_step
from kdjax.steps.state import TrainState
from kdjax.tasks import checks
from kdjax.tasks.phase import model_from_block, run_phase


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates a `classifier_kd` config before any compute (raises ValueError naming the field)."""
    data.check_data_config(config.data)
    for role in ("teacher", "student"):
        checks.check_model_block(config[role], f"config.{role}", "classifier", taken_from="the dataset")
        checks.check_phase(config[role].train, f"config.{role}.train")
    if config.teacher.checkpoint:
        bundles.check_model_bundle(config.teacher.checkpoint, "config.teacher.checkpoint", kind="classifier")
    checks.check_fraction(config.kd.alpha, "config.kd.alpha")
    if not config.kd.temperature > 0:
        raise ValueError(f"config.kd.temperature={config.kd.temperature} must be > 0.")
    if config.kd.embedding < 0:
        raise ValueError(f"config.kd.embedding={config.kd.embedding} must be >= 0 (0: no embedding term).")


def split_outputs(model: nn.Module, variables: Any, split: Sequence[dict], mesh: Mesh,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, pooled embeddings and labels of a whole split (padding removed)."""
    predict = make_predict(model, mesh)
    outputs: tuple[list, list, list] = ([], [], [])
    for batch in data.eval_batches(split, batch_size):
        mask = parallel.to_host(parallel.global_batch(batch["mask"], mesh)) > 0
        logits, embeddings = predict(variables, parallel.global_batch(batch["image"], mesh))
        labels = parallel.to_host(parallel.global_batch(batch["label"], mesh))
        for store, value in zip(outputs, (parallel.to_host(logits), parallel.to_host(embeddings), labels)):
            store.append(value[mask])
    return tuple(np.concatenate(o) for o in outputs)


def train_phase(name: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, model: nn.Module,
                dataset: data.Dataset, mesh: Mesh, writer, budget: loop.StepBudget,
                teacher: tuple[nn.Module, Any] | None = None, alpha: float = 1.0) -> tuple[Any, bool]:
    """Trains one classifier phase; returns (variables, finished)."""
    train_cfg = config.teacher.train if name == "teacher" else config.student.train
    tx = optim.make_optimizer(train_cfg.optimizer, train_cfg.num_steps)
    key = jax.random.key(config.seed)
    sample = jnp.zeros((1, dataset.resolution, dataset.resolution, dataset.channels), jnp.float32)
    init_model = models.outside_data_parallel(model)  # initialisation runs outside the data-parallel step
    # Both students start from the same initialisation (same seed), the teacher from another.
    init_key = jax.random.fold_in(key, 0 if name == "teacher" else 1)
    variables = jax.jit(lambda k: init_model.init(k, sample, train=False))(init_key)
    state = parallel.replicate(TrainState.create(variables, tx), mesh)
    teacher_model, teacher_variables = teacher if teacher is not None else (None, {})
    step = make_train_step(model, tx, mesh, teacher_model, alpha, config.kd.temperature, config.kd.embedding)
    state, finished = run_phase(name, config, workdir, state, lambda s, b: step(s, b, teacher_variables),
                                dataset.train, train_cfg, mesh, writer, budget)
    return state.variables(), finished


def input_shape(dataset: data.Dataset) -> dict[str, list[int]]:
    """A classifier bundle's record of the images it was trained on (its fields do not fix them; export
    reads it)."""
    return {"input_shape": [dataset.resolution, dataset.resolution, dataset.channels]}


def teacher_phase(config: ml_collections.ConfigDict, workdir: pathlib.Path, dataset: data.Dataset, mesh: Mesh,
                  writer, budget: loop.StepBudget, dtype: Any) -> tuple[nn.Module, Any] | None:
    """The teacher: trained here (exported to `workdir/teacher/bundle`), or the frozen bundle
    `config.teacher.checkpoint`. Returns (module, variables), or None when the launch stopped early."""
    if config.teacher.checkpoint:
        model, variables, _ = bundles.load_model(config.teacher.checkpoint, "config.teacher.checkpoint", mesh,
                                                 dtype=dtype)
        return model, variables
    shape = (dataset.resolution, dataset.channels, dataset.num_classes)
    model, kwargs = model_from_block(config.teacher, shape, dtype)
    variables, finished = train_phase("teacher", config, workdir, model, dataset, mesh, writer, budget)
    if not finished:
        return None
    bundles.save_model_bundle(workdir / "teacher" / "bundle", config.teacher.model, kwargs, variables,
                              extra=input_shape(dataset))
    return model, variables


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

    teacher = teacher_phase(config, workdir, dataset, mesh, writer, budget, dtype)
    if teacher is None:
        return None
    # The student, distilled and from scratch, with the same budget and seed.
    student_model, student_kwargs = model_from_block(config.student, (dataset.resolution, dataset.channels,
                                                                      dataset.num_classes), dtype)
    trained = {"teacher": teacher}
    for phase, alpha, phase_teacher in (("student_kd", config.kd.alpha, teacher), ("student_scratch", 1.0, None)):
        variables, finished = train_phase(phase, config, workdir, student_model, dataset, mesh, writer, budget,
                                          teacher=phase_teacher, alpha=alpha)
        if not finished:
            return None
        trained[phase] = (student_model, variables)
        bundles.save_model_bundle(workdir / phase / "bundle", config.student.model, student_kwargs, variables,
                                  extra=input_shape(dataset))

    # Evaluation on the held-out split.
    out: dict[str, Any] = {}
    for phase, (model, variables) in trained.items():
        logits, embeddings, labels = split_outputs(model, variables, dataset.test, mesh, config.eval_batch_size)
        _, gallery, gallery_labels = split_outputs(model, variables, dataset.train, mesh, config.eval_batch_size)
        out[phase] = {**classification.classification_report(logits, labels),
                      "params": cost.count_params(variables),
                      # Test images as queries against the training images, by the pooled embedding.
                      "retrieval": retrieval.retrieval_report(embeddings, labels, gallery, gallery_labels)}
        if len(dataset.validation):  # for choosing settings (e.g. alpha, T) without looking at the test split
            logits, embeddings, labels = split_outputs(model, variables, dataset.validation, mesh,
                                                       config.eval_batch_size)
            out[phase]["validation"] = {
                **classification.classification_report(logits, labels),
                "retrieval": retrieval.retrieval_report(embeddings, labels, gallery, gallery_labels)}
    out["num_test_examples"] = int(len(dataset.test))
    out["num_validation_examples"] = int(len(dataset.validation))
    out["dataset"] = dataset.name
    out["kd"] = {"alpha": config.kd.alpha, "temperature": config.kd.temperature, "embedding": config.kd.embedding}
    writer.write_scalars(config.student.train.num_steps,
                         {f"eval/{p}/{k}": v for p in trained for k, v in out[p].items() if not isinstance(v, dict)})
    writer.flush()
    report.write_report(workdir, "report", out, report_table(out))
    return out


def report_table(out: dict[str, Any]) -> str:
    """The markdown table of the classic-KD report."""
    rows = [[phase, f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}", f"{r['ece']:.4f}",
             f"{r['retrieval']['recall@1']:.4f}", f"{r['retrieval']['map']:.4f}", f"{r['params']:,}"]
            for phase, r in ((p, out[p]) for p in ("teacher", "student_kd", "student_scratch"))]
    kd = out["kd"]
    return (report.markdown_table(["model", "test accuracy", "macro-F1", "ECE", "retrieval recall@1", "retrieval mAP",
                                   "parameters"], rows)
            + f"\n\n{out['num_test_examples']} held-out {out['dataset']} images (retrieval: each a query against the "
            "training images, by cosine similarity of the pooled embeddings); "
            f"alpha = {kd['alpha']}, T = {kd['temperature']}, embedding weight = {kd['embedding']}.")
