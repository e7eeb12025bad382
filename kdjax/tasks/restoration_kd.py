"""Knowledge distillation of an image-restoration network (super-resolution, inpainting, enhancement).

The task `restoration_kd` trains on pairs made from photographs (`kdjax.core.photos.PairSource`: random crops
of the training photographs as targets, their degradation `config.degradation` as inputs; the split is by whole
photograph) and runs its phases, each resumable, in `workdir/PHASE/`:
1. `teacher`: trained on the ground truth (L1), or the frozen bundle `config.teacher.checkpoint`;
2. `student_kd`: the student trained with the teacher (`kdjax.steps.restoration`, every term there):
   alpha * L1(S(x), y) + (1 - alpha) * L1(S(x), sg(T(x))) + w_feat * FM(A(f_S), f_T) + w_fakd * FAKD(f_S, f_T);
3. `student_scratch`: the same student, same seed and initialisation, on L1(S(x), y) alone.
With `config.data.train_pool` = N > 0 both students train on one fixed pool of N pairs (`photos.PoolSource`: the
first N pairs of the stream, drawn at random each step), and the teacher's outputs and paired maps on the pool
are computed once before the student_kd phase (`training_pool`) instead of at every step: the same objective,
without the teacher's forward pass in the step (most of a KD step's cost when the teacher is 15x the student).
The pool is rebuilt, the same, at every launch (a resumed run included).
Each model's variables are exported as a bundle in `workdir/PHASE/bundle`. The models' `scale` and
`extra_inputs` come from the degradation (x2 super-resolution: scale 2; inpainting: one mask channel).

The report (`report.md`, `report.json`) scores, on the held-out photographs (whole, centre-cropped to a multiple
of the scale and to at most `config.data.eval_max_side` pixels a side; models run in float32), every model and
the plain baseline (bicubic upsampling of the input for super-resolution, the masked or degraded image
otherwise): PSNR and SSIM against the ground truth (`kdjax.evaluation.restoration.restoration_metrics`: 8-bit,
Y channel for RGB, a `scale`-pixel border shaved for super-resolution; means over the photographs), PSNR and L1
against the teacher's output, parameters, FLOPs per image and images/s at 64 x 64 outputs (in the compute
dtype); `report.json` also scores the student at initialisation (`student_init`) and, with
`config.data.validation_fraction` > 0 or `config.data.extra_validation`, every model on the validation photographs
(`validation`: carved from the training side by whole image, plus every photograph of the extra source), where
settings are chosen. `crops.png` shows the same
crop of a few test photographs through every model.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from kdjax import models
from kdjax.core import degradations, images, optim, parallel, photos, summaries
from kdjax.evaluation import cost, report
from kdjax.evaluation.restoration import restoration_metrics
from kdjax.models import bundles
from kdjax.steps import loop
from kdjax.steps.restoration import (Distillation, feature_shapes, init_adapters, init_discriminator, make_adapters,
                                     make_train_step)
from kdjax.steps.state import TrainState
from kdjax.tasks import checks
from kdjax.tasks.image_adversary import adversary, check_adversary
from kdjax.tasks.phase import model_from_block, run_phase

PHASES = ("teacher", "student_kd", "student_scratch")
SSIM_WINDOW = 11  # SSIM's Gaussian window: an evaluated image keeps at least this many pixels a side
COST_SIDE = 64  # FLOPs and images/s at outputs of (COST_SIDE // scale * scale) pixels a side
COST_BATCH = 16  # the batch images/s is timed at
CROP_IMAGES = 4  # test photographs shown in crops.png
CROP_SIDE = 64  # side (output pixels) of the crop shown, at most
CROP_COLUMNS = ("input", "baseline", "student_scratch", "student_kd", "teacher", "ground truth")
POOL_MAX_BYTES = 8 * 2**30  # the most a training pool (config.data.train_pool) may hold
POOL_BATCH = 64  # pairs per teacher pass while the pool's teacher outputs are computed


# ----------------------------------------------------------------------------------------- config
def degradation_of(config: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]]:
    """(name, parameters) of `config.degradation` (every field but `name` is a parameter)."""
    block = config.degradation.to_dict()
    return block.pop("name"), block


def feature_pairs(text: str) -> dict[str, str]:
    """`config.kd.pairs` "s1:t1,s2:t2" -> {student feature: teacher feature} ("" -> {})."""
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        student, sep, teacher = (s.strip() for s in item.partition(":"))
        if not sep or not student or not teacher or student in pairs:
            raise ValueError(f"config.kd.pairs={text!r}: expected comma-separated 'student:teacher' feature names, "
                             "each student name once, e.g. 'hidden1:body1,hidden2:body' ('' = no feature terms).")
        pairs[student] = teacher
    return pairs


def model_fields(block_model: str, scale: int, extra_inputs: int) -> dict[str, int]:
    """The fields the degradation sets on a model: `extra_inputs`, and `scale` where the family has one."""
    fields = {"extra_inputs": extra_inputs}
    if "scale" in models.model_fields(block_model):
        fields["scale"] = scale
    return fields


def build(block: ml_collections.ConfigDict, channels: int, scale: int, extra_inputs: int, dtype: Any
          ) -> tuple[nn.Module, dict[str, Any]]:
    """(module, bundle kwargs) of a `{model, kwargs}` block for this data and degradation."""
    return model_from_block(block, (0, channels, 0), dtype, **model_fields(block.model, scale, extra_inputs))


def check_spec(model: nn.Module, field: str, channels: int, scale: int, extra_inputs: int, degradation: str) -> None:
    """The model restores `channels`-channel images from inputs with `extra_inputs` more channels at `scale`."""
    spec = model.spec
    if spec.scale != scale:
        scalable = [n for n in models.names_of_kind("image_to_image") if "scale" in models.model_fields(n)]
        raise ValueError(f"{field} upscales by {spec.scale}; config.degradation.name={degradation!r} needs scale "
                         f"{scale} (image_to_image models with a scale: {scalable}).")
    if (spec.out_channels, spec.in_channels) != (channels, channels + extra_inputs):
        raise ValueError(f"{field} maps {spec.in_channels} input channels to {spec.out_channels}; the data and "
                         f"degradation need {channels + extra_inputs} to {channels} (config.data.channels={channels}, "
                         f"config.degradation.name={degradation!r}).")


def check_pairs(pairs: Mapping[str, str], student: nn.Module, teacher: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Every pair names a student map and a teacher map of the same spatial size (at the training input size)."""
    s_feats, t_feats = feature_shapes(student, input_shape)[1], feature_shapes(teacher, input_shape)[1]
    for s, t in pairs.items():
        if s not in s_feats or t not in t_feats:
            side, valid = ("student", sorted(s_feats)) if s not in s_feats else ("teacher", sorted(t_feats))
            raise ValueError(f"config.kd.pairs: {s if side == 'student' else t!r} is not a {side} feature; valid "
                             f"{side} features: {valid}.")
        if s_feats[s].shape[1:3] != t_feats[t].shape[1:3]:
            raise ValueError(f"config.kd.pairs: '{s}:{t}' pairs maps of different sizes, {s_feats[s].shape[1:3]} "
                             f"vs {t_feats[t].shape[1:3]} (H, W); pair maps of the same resolution.")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates a `restoration_kd` config before any compute (raises ValueError naming the field)."""
    photos.check_photos_config(config.data)
    name, params = degradation_of(config)
    degradations.check_degradation(name, params, config.data.crop)
    channels, crop = config.data.channels, config.data.crop
    scale, extra = photos.degraded_shape(name, params, crop, channels)
    shave = scale if scale > 1 else 0
    if crop < 2 * shave + SSIM_WINDOW:
        raise ValueError(f"config.data.crop={crop} must be >= {2 * shave + SSIM_WINDOW} (the SSIM window of "
                         f"{SSIM_WINDOW} pixels plus a border of {shave} shaved at each side).")
    for role in ("teacher", "student"):
        checks.check_model_block(config[role], f"config.{role}", "image_to_image",
                                 taken_from="config.data.channels and config.degradation",
                                 also_taken=("scale", "extra_inputs"))
        checks.check_phase(config[role].train, f"config.{role}.train")
    checks.check_fraction(config.kd.alpha, "config.kd.alpha")
    for field in ("w_feat", "w_fakd"):
        if not config.kd[field] >= 0:
            raise ValueError(f"config.kd.{field}={config.kd[field]} must be >= 0 (0 turns the term off).")
    check_adversary(config.kd, config.data.crop, config.data.channels, "config.data.crop")
    student = build(config.student, channels, scale, extra, jnp.float32)[0]
    check_spec(student, f"config.student (model {config.student.model!r})", channels, scale, extra, name)
    if config.teacher.checkpoint:
        meta = bundles.check_model_bundle(config.teacher.checkpoint, "config.teacher.checkpoint",
                                          kind="image_to_image")
        teacher = models.build_model(meta["model"], **meta["kwargs"])
        check_spec(teacher, f"config.teacher.checkpoint ({meta['model']!r})", channels, scale, extra, name)
    else:
        teacher = build(config.teacher, channels, scale, extra, jnp.float32)[0]
        check_spec(teacher, f"config.teacher (model {config.teacher.model!r})", channels, scale, extra, name)
    input_shape = (1, crop // scale, crop // scale, channels + extra)
    check_pairs(feature_pairs(config.kd.pairs), student, teacher, input_shape)
    check_pool(config.data.train_pool, teacher, feature_pairs(config.kd.pairs), input_shape)


def check_pool(size: int, teacher: nn.Module, pairs: Mapping[str, str], input_shape: tuple[int, ...]) -> None:
    """`config.data.train_pool`: an integer >= 0 whose pool fits in POOL_MAX_BYTES."""
    if int(size) != size or size < 0:
        raise ValueError(f"config.data.train_pool={size} must be an integer >= 0 (0: fresh pairs every step).")
    need = size * pool_item_bytes(teacher, pairs, input_shape)
    if need > POOL_MAX_BYTES:
        raise ValueError(f"config.data.train_pool={size} would hold {need / 2**30:.1f} GiB (inputs, targets, the "
                         f"teacher's outputs and paired maps in float32); at most {POOL_MAX_BYTES / 2**30:.0f} GiB, "
                         f"i.e. train_pool <= {POOL_MAX_BYTES // pool_item_bytes(teacher, pairs, input_shape)}.")


def pool_item_bytes(teacher: nn.Module, pairs: Mapping[str, str], input_shape: tuple[int, ...]) -> int:
    """Bytes of one pool item: its input, target, the teacher's output (the target's size) and the teacher's
    maps named in `pairs`, float32 (shapes from `jax.eval_shape`)."""
    out, feats = feature_shapes(teacher, input_shape)
    sizes = [int(np.prod(input_shape)), 2 * out.size, *(feats[t].size for t in set(pairs.values()))]
    return 4 * sum(sizes)


# ----------------------------------------------------------------------------------------- training
def initial_params(model: nn.Module, input_shape: tuple[int, ...], key: jax.Array) -> Any:
    """A model's initial parameters for inputs of `input_shape` (jitted init; the key is an explicit draw)."""
    init_model = models.outside_data_parallel(model)
    return jax.device_get(jax.jit(lambda k: init_model.init(k, jnp.zeros(input_shape, jnp.float32)))(key)["params"])


def training_pool(source: photos.PairSource, size: int, teacher: nn.Module, teacher_variables: Any,
                  maps: Sequence[str]) -> dict[str, Any]:
    """Items 0 ... size - 1 of `source` with the teacher's outputs on their inputs, computed once: {"input",
    "target", "teacher": T(input), "teacher_features": {name: f_T[name] for name in maps}}, float32 numpy with
    a leading axis of `size`; the teacher runs as in the train step (its compute dtype), jitted, POOL_BATCH
    pairs a pass on the default device (the last pass padded), with progress in the log."""
    items = [source[i] for i in range(size)]
    pool: dict[str, Any] = {k: np.stack([item[k] for item in items]) for k in ("input", "target")}
    model = models.outside_data_parallel(teacher)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False, return_features=True))
    host, start_time = parallel.to_host(teacher_variables), time.perf_counter()
    outputs, features = None, {}
    for start in range(0, size, POOL_BATCH):
        x = pool["input"][start:start + POOL_BATCH]
        done = start + len(x)
        out, feats = forward(host, np.concatenate([x, np.zeros((POOL_BATCH - len(x), *x.shape[1:]), x.dtype)]))
        if outputs is None:  # filled in place: the pool is never held twice
            outputs = np.empty((size, *out.shape[1:]), np.float32)
            features = {name: np.empty((size, *feats[name].shape[1:]), np.float32) for name in maps}
        outputs[start:done] = np.asarray(out[:len(x)])
        for name in maps:
            features[name][start:done] = np.asarray(feats[name][:len(x)])
        if done == size or (start // POOL_BATCH) % max(1, size // POOL_BATCH // 4) == 0:
            rate = done / (time.perf_counter() - start_time)
            logging.info("the teacher's outputs on the training pool: %d/%d pairs, %.1f pairs/s, ETA %.0f s", done,
                         size, rate, (size - done) / rate)
    pool["teacher"], pool["teacher_features"] = outputs, features
    return pool


def train_phase(phase: str, config: ml_collections.ConfigDict, workdir: pathlib.Path, model: nn.Module,
                initial: dict[str, Any], source: photos.PairSource | photos.PoolSource, mesh: Mesh, writer,
                budget: loop.StepBudget, kd: Distillation | None = None, teacher_variables: Any = None,
                model_state: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], bool]:
    """Trains one phase from the parameters `initial` ({"student": ..., ["adapters": ...]}) and `model_state`
    (with an adversary {"discriminator": ...}) on pairs of `source` (`kdjax.steps.loop.run`, checkpoints in
    `workdir/phase`); returns (the model's variables, finished)."""
    train_cfg = config.teacher.train if phase == "teacher" else config.student.train
    tx = optim.make_optimizer(train_cfg.optimizer, train_cfg.num_steps)
    state = parallel.replicate(TrainState.create({"params": initial, **(model_state or {})}, tx), mesh)
    step = make_train_step(model, tx, mesh, kd)
    constants = teacher_variables if kd is not None else {}
    batches = photos.PairBatches(source, train_cfg.batch_size, num_threads=config.data.num_threads)
    state, finished = run_phase(phase, config, workdir, state, lambda s, b: step(s, b, constants), (), train_cfg,
                                mesh, writer, budget, batches=batches.iterate)
    return {"params": state.params["student"]}, finished


def distillation(config: ml_collections.ConfigDict, student: nn.Module, teacher: nn.Module,
                 input_shape: tuple[int, ...], dtype: Any = jnp.float32) -> Distillation:
    """The student_kd phase's `Distillation` from `config.kd`."""
    pairs = feature_pairs(config.kd.pairs)
    return Distillation(teacher, config.kd.alpha, config.kd.w_feat, config.kd.w_fakd, pairs,
                        make_adapters(student, teacher, pairs, input_shape),
                        adversary(config.kd, config.data.crop, config.data.channels, config.student.train.num_steps,
                                  dtype))


# ----------------------------------------------------------------------------------------- evaluation
def baseline(x: np.ndarray, scale: int, channels: int) -> np.ndarray:
    """The plain answer without a model: the input's image channels, bicubic-upsampled by `scale` when > 1
    (`degradations.upsample_bicubic`); for inpainting the masked image, for enhancement the degraded one."""
    image = x[..., :channels]
    return degradations.upsample_bicubic(image, scale) if scale > 1 else np.asarray(image, np.float32)


def restorer(model: nn.Module) -> Callable[[Any, np.ndarray], jax.Array]:
    """The jitted forward pass `(variables, x) -> restored` in float32 (whatever the training compute dtype),
    outside the data-parallel step; compiled once per input size (the photographs differ in size)."""
    model = models.outside_data_parallel(model).clone(dtype=jnp.float32)
    return jax.jit(lambda v, x: model.apply(v, x, train=False))


def restore_all(fn: Callable[[Any, np.ndarray], jax.Array], variables: Any, pairs: Sequence[dict[str, np.ndarray]]
                ) -> list[np.ndarray]:
    """`fn`'s outputs (unclipped float32) for every evaluation pair's input, one photograph at a time on the
    default device."""
    host = parallel.to_host(variables)
    return [np.asarray(fn(host, p["input"])) for p in pairs]


def scores(outputs: Sequence[np.ndarray], targets: Sequence[np.ndarray], teacher: Sequence[np.ndarray] | None,
           shave: int) -> dict[str, float]:
    """Means over the photographs of PSNR and SSIM against the targets and, given the teacher's outputs, PSNR and
    L1 (mean |output - teacher output|, [-1, 1] units, unquantised) against those."""
    per_image = [restoration_metrics(o, t, shave=shave) for o, t in zip(outputs, targets)]
    out = {"psnr": float(np.mean([m["psnr"][0] for m in per_image])),
           "ssim": float(np.mean([m["ssim"][0] for m in per_image]))}
    if teacher is not None:
        out["psnr_vs_teacher"] = float(np.mean([restoration_metrics(o, t, shave=shave)["psnr"][0]
                                                for o, t in zip(outputs, teacher)]))
        out["l1_vs_teacher"] = float(np.mean([np.abs(o - t).mean() for o, t in zip(outputs, teacher)]))
    return out


def model_cost(model: nn.Module, variables: Any, scale: int) -> dict[str, float]:
    """Parameters, FLOPs per image (XLA's count, batch 1) and images/s (batch COST_BATCH) at outputs of
    COST_SIDE // scale * scale pixels a side."""
    model = models.outside_data_parallel(model)
    side, host = COST_SIDE // scale, parallel.to_host(variables)
    shape = (side, side, model.spec.in_channels)
    forward = lambda v, x: model.apply(v, x, train=False)
    flops = cost.flops_per_image(forward, host, np.zeros((1, *shape), np.float32), batch_size=1)
    speed = cost.images_per_second(forward, lambda b: (host, jnp.zeros((b, *shape))), COST_BATCH, warmup=1, iters=3)
    return {"params": cost.count_params(host), "flops_per_image": flops, "images_per_s": speed}


def crop_grid(pairs: Sequence[dict[str, np.ndarray]], columns: Mapping[str, Sequence[np.ndarray]], scale: int,
              channels: int) -> np.ndarray:
    """crops.png: for each of the first CROP_IMAGES photographs (rows) the same centred crop (at most CROP_SIDE
    output pixels a side, a multiple of the scale) of: the input (pixels repeated `scale` times), then each of
    `columns` (name -> outputs), then the ground truth; enlarged by pixel repetition to about 128 pixels."""
    shown = pairs[:CROP_IMAGES]
    side = min(CROP_SIDE, *(min(p["target"].shape[1:3]) for p in shown)) // scale * scale
    tiles = []
    for k, p in enumerate(shown):
        h, w = p["target"].shape[1:3]
        top, left = (h - side) // 2 // scale * scale, (w - side) // 2 // scale * scale
        cut = lambda a, r=1: a[0, top // r:(top + side) // r, left // r:(left + side) // r, :channels]
        low = cut(p["input"], scale)
        tiles.append(np.repeat(np.repeat(low, scale, axis=0), scale, axis=1))
        tiles += [cut(columns[name][k]) for name in columns] + [cut(p["target"])]
    grid = images.image_grid(images.to_uint8(np.stack(tiles)), columns=len(columns) + 2)
    zoom = max(1, 128 // side)
    return np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)


def restorers(trained: Mapping[str, tuple[nn.Module, Any]]) -> dict[str, Callable[[Any, np.ndarray], jax.Array]]:
    """`restorer` of each trained model; the two students share one (the same network, compiled once)."""
    fns = {"teacher": restorer(trained["teacher"][0])}
    fns["student_kd"] = fns["student_scratch"] = restorer(trained["student_kd"][0])
    return fns


def score_all(fns: Mapping[str, Callable], trained: Mapping[str, tuple[nn.Module, Any]],
              pairs: Sequence[dict[str, np.ndarray]], scale: int, channels: int
              ) -> tuple[dict[str, dict[str, float]], dict[str, list[np.ndarray]]]:
    """(`scores` by name, outputs by name) of the trained models and the baseline on `pairs`; every score but
    the teacher's also against the teacher's outputs."""
    shave = scale if scale > 1 else 0
    targets = [p["target"] for p in pairs]
    outputs = {phase: restore_all(fns[phase], variables, pairs) for phase, (_, variables) in trained.items()}
    outputs["baseline"] = [baseline(p["input"], scale, channels) for p in pairs]
    teacher = outputs["teacher"]
    rows = {name: scores(out, targets, None if name == "teacher" else teacher, shave) for name, out in outputs.items()}
    return rows, outputs


def evaluate(trained: Mapping[str, tuple[nn.Module, Any]], fns: Mapping[str, Callable], initial: Any,
             pairs: Sequence[dict[str, np.ndarray]], scale: int, channels: int) -> tuple[dict[str, Any], np.ndarray]:
    """(report rows by name, the crops.png grid) for the trained models (run by `fns`, `restorers`), the baseline
    and (scores only) the student at initialisation (`initial`: its variables)."""
    rows, outputs = score_all(fns, trained, pairs, scale, channels)
    rows["student_init"] = scores(restore_all(fns["student_kd"], initial, pairs), [p["target"] for p in pairs],
                                  outputs["teacher"], scale if scale > 1 else 0)
    rows["teacher"].update(model_cost(*trained["teacher"], scale))
    student_cost = model_cost(*trained["student_kd"], scale)  # the same network as student_scratch
    rows["student_kd"].update(student_cost)
    rows["student_scratch"].update(student_cost)
    columns = {name: outputs[name] for name in ("baseline", "student_scratch", "student_kd", "teacher")}
    return rows, crop_grid(pairs, columns, scale, channels)


# ----------------------------------------------------------------------------------------- the task
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any] | None:
    """Runs the phases and the evaluation; returns the report (None if stopped early)."""
    workdir = pathlib.Path(workdir)
    dtype = jnp.dtype(config.compute_dtype)
    mesh = parallel.make_mesh()
    writer = summaries.create_writer(workdir)
    budget = loop.StepBudget(config.stop_after_steps)
    name, params = degradation_of(config)
    channels, crop = config.data.channels, config.data.crop
    scale, extra = photos.degraded_shape(name, params, crop, channels)
    input_shape = (1, crop // scale, crop // scale, channels + extra)
    train_photos, validation_photos, test_photos = photos.load_splits(config.data)
    source = photos.PairSource(train_photos, crop, name, params, config.seed)

    # The teacher starts from fold_in(key, 0); every student phase from fold_in(key, 1), the same initialisation;
    # the adapters from fold_in(key, 2), the discriminator (with an adversarial term) from fold_in(key, 3).
    key = jax.random.key(config.seed)
    if config.teacher.checkpoint:
        teacher, teacher_vars, _ = bundles.load_model(config.teacher.checkpoint, "config.teacher.checkpoint", mesh,
                                                      dtype=dtype)
    else:
        teacher, kwargs = build(config.teacher, channels, scale, extra, dtype)
        initial = {"student": initial_params(teacher, input_shape, jax.random.fold_in(key, 0))}
        teacher_vars, finished = train_phase("teacher", config, workdir, teacher, initial, source, mesh, writer,
                                             budget)
        if not finished:
            return None
        bundles.save_model_bundle(workdir / "teacher" / "bundle", config.teacher.model, kwargs, teacher_vars)
    trained = {"teacher": (teacher, teacher_vars)}

    student, student_kwargs = build(config.student, channels, scale, extra, dtype)
    kd = distillation(config, student, teacher, input_shape, dtype)
    kd_state = ({"discriminator": init_discriminator(kd.adversary, channels, jax.random.fold_in(key, 3))}
                if kd.adversary is not None else None)
    student_init = initial_params(student, input_shape, jax.random.fold_in(key, 1))
    with_adapters = {"student": student_init}
    if kd.adapters is not None:
        with_adapters["adapters"] = jax.device_get(
            init_adapters(kd.adapters, student, input_shape, jax.random.fold_in(key, 2))["params"])
    sources, constants = {"student_kd": source, "student_scratch": source}, teacher_vars
    if config.data.train_pool:  # both students on one fixed pool; the teacher's outputs on it computed here, once
        pool = training_pool(source, config.data.train_pool, teacher, teacher_vars, sorted(set(kd.pairs.values())))
        sources = {"student_kd": photos.PoolSource(pool, config.seed),
                   "student_scratch": photos.PoolSource({k: pool[k] for k in ("input", "target")}, config.seed)}
        constants = {}
    for phase, phase_kd, initial, extra_state in (("student_kd", kd, with_adapters, kd_state),
                                                  ("student_scratch", None, {"student": student_init}, None)):
        variables, finished = train_phase(phase, config, workdir, student, initial, sources[phase], mesh, writer,
                                          budget, phase_kd, constants, extra_state)
        if not finished:
            return None
        trained[phase] = (student, variables)
        bundles.save_model_bundle(workdir / phase / "bundle", config.student.model, student_kwargs, variables)

    pairs = photos.eval_pairs(test_photos, name, params, scale, config.data.eval_max_side)
    fns = restorers(trained)  # compiled once per photograph size, for the test and the validation photographs
    rows, grid = evaluate(trained, fns, {"params": student_init}, pairs, scale, channels)
    out: dict[str, Any] = {
        "data": config.data.source, "channels": channels, "degradation": {"name": name, **params}, "scale": scale,
        "num_test_images": len(pairs), "test_image_sizes": [list(p["target"].shape[1:3]) for p in pairs],
        "eval_max_side": config.data.eval_max_side, "train_pool": config.data.train_pool,
        "kd": {"alpha": config.kd.alpha, "w_feat": config.kd.w_feat, "w_fakd": config.kd.w_fakd,
               "pairs": config.kd.pairs, "w_adv": config.kd.w_adv},
        "device": cost.device_name(), **rows}
    if validation_photos:  # the photographs to choose settings on: the same scores, no costs
        val_pairs = photos.eval_pairs(validation_photos, name, params, scale, config.data.eval_max_side)
        out["validation"] = score_all(fns, trained, val_pairs, scale, channels)[0]
        out["num_validation_images"] = len(val_pairs)
        out["validation_origin"] = photos.validation_origin(config.data, len(val_pairs))
    if jax.process_index() == 0:
        images.save_png(workdir / "crops.png", grid)
    scalars = {f"eval/{m}/{k}": v for m in rows for k, v in rows[m].items()}
    scalars.update({f"validation/{m}/{k}": v for m, r in out.get("validation", {}).items() for k, v in r.items()})
    writer.write_scalars(config.student.train.num_steps, scalars)
    writer.flush()
    report.write_report(workdir, "report", out, report_text(out))
    return out


def baseline_name(degradation: str, scale: int) -> str:
    """What the baseline row is: bicubic upsampling, the masked input, or the degraded input."""
    if scale > 1:
        return "bicubic"
    return "masked input" if degradation.endswith("inpainting") else "degraded input"


def report_text(out: Mapping[str, Any]) -> str:
    """The markdown report: the table, then what every number means."""
    fmt = lambda v, f: "-" if v is None else format(v, f)
    rows = []
    for name in ("baseline", "teacher", "student_kd", "student_scratch"):
        r = out[name]
        label = f"{name} ({baseline_name(out['degradation']['name'], out['scale'])})" if name == "baseline" else name
        rows.append([label, fmt(r["psnr"], ".2f"), fmt(r["ssim"], ".4f"), fmt(r.get("psnr_vs_teacher"), ".2f"),
                     fmt(r.get("l1_vs_teacher"), ".4f"), fmt(r.get("params"), ","),
                     fmt(None if "flops_per_image" not in r else r["flops_per_image"] / 1e6, ".1f"),
                     fmt(r.get("images_per_s"), ".1f")])
    header = ["model", "PSNR (dB)", "SSIM", "PSNR vs teacher", "L1 vs teacher", "parameters", "MFLOPs/image",
              "images/s"]
    scale, deg, kd = out["scale"], out["degradation"], out["kd"]
    side = COST_SIDE // scale * scale
    limit = f", centre-cropped to at most {out['eval_max_side']} pixels a side" if out["eval_max_side"] else ""
    where = ("on the Y channel (ITU-R BT.601)" if out["channels"] == 3 else "on the grey image") + (
        f", a border of {scale} pixels shaved" if scale > 1 else "")
    init = out["student_init"]
    return (report.markdown_table(header, rows)
            + f"\n\nDegradation {deg}; {out['num_test_images']} held-out {out['data']} photographs (whole{limit}; "
            f"sizes {out['test_image_sizes']}). PSNR and SSIM against the ground truth, means over the photographs, "
            f"of the 8-bit outputs (models run in float32) {where}. PSNR vs teacher: the same PSNR against the "
            "teacher's output; L1 vs teacher: mean |output - teacher's output| (images in [-1, 1], unquantised). "
            "FLOPs: XLA's count of one "
            f"forward pass at {side}x{side} outputs; images/s at that size, batch {COST_BATCH}, on {out['device']}. "
            f"student_kd: alpha = {kd['alpha']}, w_feat = {kd['w_feat']}, w_fakd = {kd['w_fakd']}, pairs "
            f"'{kd['pairs']}'" + (f", w_adv = {kd['w_adv']}" if kd.get("w_adv") else "")
            + (f"; both students trained on a fixed pool of {out['train_pool']} pairs, the teacher's outputs on it "
               "computed once" if out.get("train_pool") else "")
            + f". The student at initialisation: PSNR {init['psnr']:.2f} dB, L1 vs teacher "
            f"{init['l1_vs_teacher']:.4f}. crops.png columns: {', '.join(CROP_COLUMNS)}; rows: the first "
            f"{min(CROP_IMAGES, out['num_test_images'])} test photographs." + validation_text(out))


def validation_text(out: Mapping[str, Any]) -> str:
    """The report's sentence on the validation photographs (where settings are chosen), "" without them."""
    if "validation" not in out:
        return ""
    val = out["validation"]
    psnrs = ", ".join(f"{name} {val[name]['psnr']:.2f}" for name in ("baseline", "teacher", "student_kd",
                                                                      "student_scratch"))
    return (f" Validation ({out['num_validation_images']} photographs: {out['validation_origin']}; the ones "
            f"to choose settings on; same protocol): PSNR (dB) {psnrs}; `report.json` has every score under "
            "`validation`.")
