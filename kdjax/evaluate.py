"""The evaluation report of generators: quality, diversity, fidelity to a reference, spectra and cost.

    python -m kdjax.evaluate --generator=teacher=runs/x/teacher/bundle --generator=student=runs/x/student/bundle \
        --judge=runs/x/judge/bundle --reference=teacher --data.source=digits --data.resolution=32 \
        --data.channels=1 [--split=test] [--num_samples=1000] [--batch_size=256] [--seed=0] --workdir=OUT
    python -m kdjax.evaluate --run=runs/x          # every runs/x/*/bundle generator; report in runs/x/eval

Every generator draws `num_samples` images from the same latents (batch b: z ~ N(0, 1) from
fold_in(key(seed), b), uniform labels when conditional, StyleGAN2 noise from the 'noise' stream, eval mode).
The judge classifier's features of those images and of all real images of the split give FID, KID,
precision/recall/density/coverage ('pool' features) and diversity (its feature maps; at most
`DIVERSITY_SAMPLES` images); each generator is compared with `reference` on identical latents (PSNR, SSIM,
L1, perceptual and spectral distance). Written to the workdir: eval.json, eval.md (one table),
spectra.png, samples.png (first 8 samples per model, one row each) and TensorBoard scalars.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kdjax import cost, summaries
from kdjax.data import to_model_range, to_uint8
from kdjax.evaluation import diversity, fid, fidelity, features, prdc, spectrum

DIVERSITY_SAMPLES = 256  # diversity needs all pairs: B^2 Gram entries per layer
GRID_SAMPLES = 8  # samples per model in samples.png
ModelAndVariables = tuple[Any, Any]


def generator_spec(model: Any) -> dict[str, int]:
    """z_dim, num_classes (0 = unconditional), resolution and channels of a DCGAN or StyleGAN2 generator."""
    get = lambda *names: next((int(getattr(model, n)) for n in names if hasattr(model, n)), None)
    return {"z_dim": get("z_dim"), "num_classes": get("num_classes", "c_dim") or 0,
            "resolution": get("resolution", "img_resolution"), "channels": get("img_channels")}


def batch_keys(seed: int, step: int) -> jax.Array:
    """Keys of batch `step`: (z, labels, noise), split from fold_in(key(seed), step)."""
    return jax.random.split(jax.random.fold_in(jax.random.key(seed), step), 3)


def latent_batch(seed: int, step: int, batch_size: int, z_dim: int, num_classes: int) -> dict[str, Any]:
    """Batch `step` of the shared latents: z (B, z_dim), labels (B,) if conditional, the step (B,)."""
    k_z, k_labels, _ = batch_keys(seed, step)
    batch = {"z": jax.random.normal(k_z, (batch_size, z_dim), jnp.float32),
             "step": jnp.full((batch_size,), step, jnp.int32)}
    if num_classes > 0:
        batch["labels"] = jax.random.randint(k_labels, (batch_size,), 0, num_classes)
    return batch


def sample_with_features(generator: ModelAndVariables, judge: ModelAndVariables, num_samples: int,
                         batch_size: int, seed: int, desc: str) -> dict[str, Any]:
    """Generates `num_samples` images on the shared latents; returns {"images", "feats": judge features}."""
    model, judge_model = generator[0], judge[0]
    spec = generator_spec(model)
    batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
    def fn(params, batch):
        rngs = {"noise": batch_keys(seed, batch["step"][0])[2]}  # noise of the batch (padding rows: row 0's)
        images = model.apply(params["g"], batch["z"], batch.get("labels"), train=False, rngs=rngs)
        _, feats = judge_model.apply(params["j"], images, train=False, return_features=True)
        return {"images": images, "feats": feats}

    source = lambda step: latent_batch(seed, step, batch_size, spec["z_dim"], spec["num_classes"])
    return features.extract_features(fn, source, batch_size, params={"g": generator[1], "j": judge[1]},
                                     num_samples=num_samples, out_dtype=None, desc=desc)


def generator_cost(model: Any, variables: Any, batch_sizes: Sequence[int] = (1, 64)) -> dict[str, float]:
    """params, flops_per_image (XLA's count at batch 8) and images_per_s_at_B of the eval-mode forward."""
    spec = generator_spec(model)

    def inputs(b: int) -> tuple[Any, ...]:
        z = jax.random.normal(jax.random.key(0), (b, spec["z_dim"]), jnp.float32)
        labels = jnp.arange(b, dtype=jnp.int32) % spec["num_classes"] if spec["num_classes"] else None
        return variables, z, labels

    forward = lambda v, z, labels: model.apply(v, z, labels, train=False, rngs={"noise": jax.random.key(1)})
    out = {"params": float(cost.count_params(variables)),
           "flops_per_image": cost.flops_per_image(forward, *inputs(8), batch_size=8)}
    for b in batch_sizes:
        out[f"images_per_s_at_{b}"] = cost.images_per_second(forward, inputs, b, warmup=2, iters=5)
    return out


def evaluate_generators(generators: Mapping[str, ModelAndVariables], judge: ModelAndVariables,
                        real_images: np.ndarray, *, reference: str | None, num_samples: int, batch_size: int,
                        seed: int, workdir: str | pathlib.Path, writer: Any = None,
                        timing_batch_sizes: Sequence[int] = (1, 64),
                        inception: ModelAndVariables | None = None) -> dict[str, Any]:
    """Evaluates generators against real images under a judge classifier; writes the report to `workdir`.

    Args:
      generators: name -> (module, variables) of each generator (DCGAN or StyleGAN2 interface).
      judge: (classifier module, variables); its 'pool' features embed images, its maps give distances.
      real_images: (N, H, W, C) real images in [-1, 1] (all images of the evaluation split).
      reference: the generator the others are compared with on identical latents (None: no fidelity).
      num_samples: images drawn per generator.
      batch_size: images per step over all devices (rounded up to a multiple of the device count).
      seed: seed of the latents, labels and noise (identical for every generator).
      workdir: where eval.json, eval.md, spectra.png and samples.png go.
      writer: a clu metric writer for the TensorBoard scalars (default: one on `workdir`).
      timing_batch_sizes: batch sizes of the images/s measurement.
      inception: optional (module, variables) whose `apply(variables, images)` gives (B, D) embeddings, normally
        the FID InceptionV3 (`kdjax.evaluation.inception`) with the user's weights file: adds `fid_inception`
        and `kid_inception_mean/std`, the figures comparable with papers (given enough samples).

    Returns:
      {name: {metric: value}, "num_samples", "num_real", "device", "judge_feature_dim", "eval_seconds"}.
    """
    start = time.perf_counter()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if reference is not None and reference not in generators:
        raise ValueError(f"reference={reference!r} is not one of the generators {sorted(generators)}.")
    judge_model, judge_vars = judge
    real_pool = features.extract_features(
        lambda p, x: judge_model.apply(p, x, train=False, return_features=True)[1]["pool"],
        np.asarray(real_images, np.float32), batch_size, params=judge_vars, desc="judge features of real images")
    spectra = {"real": spectrum.radial_power_spectrum(real_images)}
    embed = None
    if inception is not None:
        inception_model, inception_vars = inception
        embed = lambda images, desc: features.extract_features(
            lambda p, x: inception_model.apply(p, x), np.asarray(images, np.float32), batch_size,
            params=inception_vars, desc=desc)
        real_inception = embed(real_images, "Inception features of real images")
    samples: dict[str, dict[str, Any]] = {}
    results: dict[str, Any] = {}
    for name, (model, variables) in generators.items():
        out = sample_with_features((model, variables), judge, num_samples, batch_size, seed,
                                   desc=f"{name}: samples and judge features")
        samples[name] = out
        pool = out["feats"]["pool"].astype(np.float64)
        maps = {k: v[:DIVERSITY_SAMPLES] for k, v in out["feats"].items() if k != "pool"}
        spectra[name] = spectrum.radial_power_spectrum(out["images"])
        kid, pr = fid.kid(real_pool, pool, seed=seed), prdc.prdc(real_pool, pool)
        res = {"fid": fid.fid(real_pool, pool)["fid"], "kid_mean": kid["kid_mean"], "kid_std": kid["kid_std"],
               **{k: pr[k] for k in ("precision", "recall", "density", "coverage")},
               "diversity": diversity.diversity(maps)["diversity"],
               "diversity_num_samples": min(num_samples, DIVERSITY_SAMPLES)}
        if embed is not None:
            fake_inception = embed(out["images"], f"{name}: Inception features")
            kid_inc = fid.kid(real_inception, fake_inception, seed=seed)
            res.update({"fid_inception": fid.fid(real_inception, fake_inception)["fid"],
                        "kid_inception_mean": kid_inc["kid_mean"], "kid_inception_std": kid_inc["kid_std"]})
        res.update(generator_cost(model, variables, timing_batch_sizes))
        res["spectrum"] = spectra[name].tolist()
        results[name] = res
    if reference is not None:
        ref, ref_spec = samples[reference], spectra[reference]
        for name in generators:
            if name == reference:
                continue
            if generator_spec(generators[name][0])["z_dim"] != generator_spec(generators[reference][0])["z_dim"]:
                results[name]["fidelity_skipped"] = (
                    f"z_dim {generator_spec(generators[name][0])['z_dim']} differs from reference {reference!r}'s "
                    f"{generator_spec(generators[reference][0])['z_dim']}: no identical latents.")
                continue
            maps_of = lambda o: {k: v for k, v in o["feats"].items() if k != "pool"}
            fm = fidelity.fidelity_metrics(ref["images"], samples[name]["images"], maps_of(ref),
                                           maps_of(samples[name]), batch_size=batch_size)
            results[name].update({f"{k}_vs_reference": fm[k] for k in ("psnr", "ssim", "l1", "perceptual")})
            results[name]["spectral_distance_vs_reference"] = spectrum.spectral_distance(ref_spec, spectra[name])
    report = {**results, "num_samples": num_samples, "num_real": int(len(real_pool)), "reference": reference,
              "judge_feature_dim": int(real_pool.shape[1]), "device": cost.device_name(),
              "eval_seconds": time.perf_counter() - start}
    names = sorted(generators, key=lambda n: n != reference)  # the reference row first
    write_report(report, names, spectra, {n: s["images"][:GRID_SAMPLES] for n, s in samples.items()},
                 workdir, writer)
    return report


# Markdown columns: (header, metric key, format).
COLUMNS = (("FID", "fid", ".2f"), ("Inception FID", "fid_inception", ".2f"), ("KID", "kid_mean", ".4f"), ("prec", "precision", ".3f"),
           ("rec", "recall", ".3f"), ("dens", "density", ".3f"), ("cov", "coverage", ".3f"),
           ("div", "diversity", ".4f"), ("PSNR", "psnr_vs_reference", ".2f"), ("SSIM", "ssim_vs_reference", ".4f"),
           ("L1", "l1_vs_reference", ".4f"), ("perc", "perceptual_vs_reference", ".4f"),
           ("spec", "spectral_distance_vs_reference", ".4f"), ("params (M)", "params", ".3f"),
           ("MFLOPs/img", "flops_per_image", ".1f"), ("img/s @1", "images_per_s_at_1", ".1f"),
           ("img/s @64", "images_per_s_at_64", ".1f"))


def format_table(report: Mapping[str, Any], names: Sequence[str]) -> str:
    """One markdown table, models as rows, with the sample counts and device underneath."""
    scale = {"params": 1e-6, "flops_per_image": 1e-6}
    cell = lambda r, key, f: "-" if key not in r else format(r[key] * scale.get(key, 1.0), f)
    lines = ["| model | " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(cell(report[n], k, f) for _, k, f in COLUMNS) + " |" for n in names]
    lines.append(f"\n{report['num_samples']} samples per model, {report['num_real']} real images, judge features "
                 f"({report['judge_feature_dim']}-d; not comparable to Inception FID). Fidelity columns vs "
                 f"reference {report['reference']!r} on identical latents. Device: {report['device']}; "
                 f"evaluation took {report['eval_seconds']:.1f} s.")
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], names: Sequence[str], spectra: Mapping[str, np.ndarray],
                 grid_images: Mapping[str, np.ndarray], workdir: pathlib.Path, writer: Any = None) -> None:
    """Writes eval.json, eval.md, spectra.png, samples.png and TensorBoard scalars; prints the table."""
    (workdir / "eval.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    table = format_table(report, names)
    (workdir / "eval.md").write_text(table + "\n")
    print(table)
    spectrum.plot_spectra(spectra, workdir / "spectra.png")
    rows = np.concatenate([to_uint8(grid_images[n]) for n in names])
    summaries.save_png(workdir / "samples.png", summaries.image_grid(rows, columns=len(grid_images[names[0]])))
    own = writer is None
    writer = summaries.create_writer(workdir) if own else writer
    writer.write_scalars(0, {f"eval/{n}/{k}": v for n in names for k, v in report[n].items()
                             if isinstance(v, (int, float))})
    writer.close() if own else writer.flush()


# ------------------------------------------------------------------------------------------- command
def _check_judge(judge: Any, judge_vars: Any, resolution: int, channels: int, where: str) -> None:
    """Fails unless the judge accepts (resolution, resolution, channels) images and returns 'pool' features."""
    x = jax.ShapeDtypeStruct((1, resolution, resolution, channels), jnp.float32)
    try:
        _, feats = jax.eval_shape(lambda v, x: judge.apply(v, x, train=False, return_features=True), judge_vars, x)
    except Exception as e:  # Flax raises ScopeParamShapeError and friends on a channel mismatch
        raise ValueError(f"{where}: the judge does not accept the data's {resolution}x{resolution}x{channels} "
                         f"images ({type(e).__name__}: {str(e).splitlines()[0]}).") from e
    if "pool" not in feats:
        raise ValueError(f"{where}: the judge returns no 'pool' features (got {sorted(feats)}).")


def load_models(generator_dirs: Mapping[str, str], judge_dir: str, reference: str | None, resolution: int,
                channels: int) -> tuple[dict[str, ModelAndVariables], ModelAndVariables]:
    """Checks every bundle (paths, generator-ness, resolution, channels, reference) before loading any."""
    from kdjax import checkpoints, models

    if not generator_dirs:
        raise ValueError("--generator: no generators given (use --generator=NAME=BUNDLE_DIR or --run=DIR).")
    if reference is not None and reference not in generator_dirs:
        raise ValueError(f"--reference={reference!r} is not a generator name; names: {sorted(generator_dirs)}.")
    judge_meta = checkpoints.check_model_bundle(judge_dir, "--judge")
    if judge_meta["model"].endswith(("_generator", "_discriminator")):
        raise ValueError(f"--judge={judge_dir!r} holds a {judge_meta['model']!r}, not a classifier.")
    for name, d in generator_dirs.items():
        meta = checkpoints.check_model_bundle(d, f"--generator={name}")
        if not meta["model"].endswith("_generator"):
            raise ValueError(f"--generator={name}={d!r} holds a {meta['model']!r}, not a generator.")
        spec = generator_spec(models.build_model(meta["model"], **meta["kwargs"]))
        if (spec["resolution"], spec["channels"]) != (resolution, channels):
            raise ValueError(f"--generator={name}={d!r} makes {spec['resolution']}x{spec['resolution']}x"
                             f"{spec['channels']} images; the data is {resolution}x{resolution}x{channels} "
                             "(set --data.resolution / --data.channels).")
    meta, judge_vars = checkpoints.load_model_bundle(judge_dir, "--judge")
    judge = (models.build_model(meta["model"], **meta["kwargs"]), judge_vars)
    _check_judge(*judge, resolution, channels, f"--judge={judge_dir!r}")
    gens = {}
    for name, d in generator_dirs.items():
        meta, variables = checkpoints.load_model_bundle(d, f"--generator={name}")
        gens[name] = (models.build_model(meta["model"], **meta["kwargs"]), variables)
    return gens, judge


def resolve_run(run_dir: str) -> tuple[dict[str, str], str, dict[str, Any], str | None]:
    """--run=DIR: (generator bundle dirs by folder name, judge bundle dir, data block, reference)."""
    root = pathlib.Path(run_dir).expanduser()
    if not (root / "config.json").is_file():
        raise ValueError(f"--run={run_dir!r} is not a kdjax run workdir (no config.json).")
    data_block = json.loads((root / "config.json").read_text()).get("data")
    if not data_block:
        raise ValueError(f"--run={run_dir!r}: config.json has no 'data' block.")
    gens = {}
    for bundle in sorted(root.glob("*/bundle")):
        try:
            model = json.loads((bundle / "model.json").read_text())["model"]
        except (OSError, ValueError, KeyError):
            continue
        if model.endswith("_generator"):
            gens[bundle.parent.name] = str(bundle)
    if not gens:
        raise ValueError(f"--run={run_dir!r}: no DIR/*/bundle holds a generator.")
    judge = root / "judge" / "bundle"
    return gens, str(judge) if judge.is_dir() else "", data_block, "teacher" if "teacher" in gens else None


def main(argv: Sequence[str]) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    from kdjax.config_schema import data_config
    from kdjax.data import load_dataset

    flags.DEFINE_multi_string("generator", [], "NAME=BUNDLE_DIR of a generator to evaluate (repeatable).")
    flags.DEFINE_string("judge", "", "Model bundle of the judge classifier.")
    flags.DEFINE_string("reference", None, "Generator the others are compared with on identical latents.")
    flags.DEFINE_string("run", None, "A kdjax run workdir: evaluate its DIR/*/bundle generators.")
    flags.DEFINE_enum("split", "test", ["test", "train"], "Split whose images are the real set.")
    flags.DEFINE_integer("num_samples", 1000, "Images drawn per generator.")
    flags.DEFINE_integer("batch_size", 256, "Images per step over all devices.")
    flags.DEFINE_integer("seed", 0, "Seed of the latents, labels and noise.")
    flags.DEFINE_string("workdir", None, "Output folder (default with --run: DIR/eval).")
    flags.DEFINE_string("inception_weights", None, "pytorch-fid's pt_inception-2015-12-05 weights (.pth or .npz): "
                        "adds Inception FID/KID, comparable with papers.")
    config_flags.DEFINE_config_dict("data", data_config(), "The data block (kdjax.config_schema).")
    FLAGS = flags.FLAGS

    def run(_):
        try:
            gen_dirs, judge_dir, reference, data = {}, FLAGS.judge, FLAGS.reference, FLAGS.data
            if FLAGS.run:
                gen_dirs, run_judge, block, run_ref = resolve_run(FLAGS.run)
                data = data_config(**{k: v for k, v in block.items() if k in data_config()})
                given = {a.split("=", 1)[0][len("--data."):] for a in argv if a.startswith("--data.")}
                data.update({k: FLAGS.data[k] for k in given})
                judge_dir, reference = judge_dir or run_judge, reference or run_ref
            for item in FLAGS.generator:
                name, sep, d = item.partition("=")
                if not sep or not name or not d:
                    raise ValueError(f"--generator={item!r}: expected NAME=BUNDLE_DIR.")
                gen_dirs[name] = d
            if not judge_dir:
                raise ValueError("--judge: no judge bundle given (and no DIR/judge/bundle in --run).")
            workdir = FLAGS.workdir or (str(pathlib.Path(FLAGS.run) / "eval") if FLAGS.run else None)
            if not workdir:
                raise ValueError("--workdir is required without --run.")
            if FLAGS.num_samples < 4 or FLAGS.batch_size < 1:
                raise ValueError("--num_samples must be >= 4 (k-NN with k = 3) and --batch_size >= 1.")
            generators, judge = load_models(gen_dirs, judge_dir, reference, data.resolution, data.channels)
            dataset = load_dataset(data)
            inception_model = None
            if FLAGS.inception_weights:
                from kdjax.evaluation import inception as inception_lib

                if not pathlib.Path(FLAGS.inception_weights).is_file():
                    raise ValueError(f"--inception_weights={FLAGS.inception_weights!r} is not a file.")
                inception_model = (inception_lib.InceptionV3(),
                                   inception_lib.load_inception_variables(FLAGS.inception_weights))
        except Exception as e:  # CheckpointError, ValueError: a bad flag or path, before any compute
            print(f"kdjax.evaluate: error: {e}", file=sys.stderr)
            sys.exit(2)
        split = dataset.test if FLAGS.split == "test" else dataset.train
        real = to_model_range(np.stack([split[i]["image"] for i in range(len(split))]))
        logging.info("Evaluating %s on %d real %s images of %s.", sorted(generators), len(real), FLAGS.split,
                     dataset.name)
        evaluate_generators(generators, judge, real, reference=reference, num_samples=FLAGS.num_samples,
                            batch_size=FLAGS.batch_size, seed=FLAGS.seed, workdir=workdir, inception=inception_model)

    app.run(run, argv=argv)


if __name__ == "__main__":
    summaries.quiet_library_logs()
    main(sys.argv)
