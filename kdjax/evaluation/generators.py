"""The evaluation of generators: quality, diversity, fidelity to a reference, spectra and cost, one report.

Every generator draws `num_samples` images from the same latents (batch b: z ~ N(0, 1) from
fold_in(key(seed), b), uniform labels when conditional, StyleGAN2 noise from the 'noise' stream, eval mode).
The judge classifier's features of those images and of all real images give FID, KID,
precision/recall/density/coverage ('pool' features) and diversity (its feature maps; at most
`DIVERSITY_SAMPLES` images); each generator is compared with `reference` on identical latents (PSNR, SSIM,
L1, perceptual and spectral distance). Written to the workdir: eval.json, eval.md (one table),
spectra.png, samples.png (first 8 samples per model, one row each) and TensorBoard scalars.

Generators are read through the generator interface (`model.spec`, `kdjax.models.interface`). The command
line is `python -m kdjax.evaluate` (`kdjax/evaluate.py`).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.core.data import all_images
from kdjax.evaluation import cost, diversity, features, fid, fidelity, prdc, report, spectrum

DIVERSITY_SAMPLES = 256  # diversity needs all pairs: B^2 Gram entries per layer
TEACHER_SUFFIX = "_vs_teacher_dist"  # metrics against the teacher's own samples
TEACHER_SEED_OFFSET = 1_000_003  # the teacher-distribution latents: seed + this, apart from the shared ones
GRID_SAMPLES = 8  # samples per model in samples.png
ModelAndVariables = tuple[Any, Any]


REAL_SPLITS = ("all", "train", "test")


def real_set(dataset: Any, split: str) -> np.ndarray:
    """The real images a generator is scored against, (N, H, W, C) in [-1, 1]: "all" (train and held-out test
    together: the standard GAN protocol scores against the training distribution), "train" or "test"."""
    if split not in REAL_SPLITS:
        raise ValueError(f"real split {split!r}; valid: {list(REAL_SPLITS)}.")
    parts = {"all": (dataset.train, dataset.test), "train": (dataset.train,), "test": (dataset.test,)}[split]
    return np.concatenate([all_images(p) for p in parts])


def judge_pool(judge: ModelAndVariables, images: np.ndarray, batch_size: int) -> np.ndarray:
    """The judge's 'pool' features of images (N, D), float64."""
    judge_model, judge_vars = judge
    return features.extract_features(
        lambda p, x: judge_model.apply(p, x, train=False, return_features=True)[1]["pool"],
        np.asarray(images, np.float32), batch_size, params=judge_vars, desc="judge features of real images")


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
    spec = model.spec
    batch_size = -(-batch_size // jax.device_count()) * jax.device_count()

    def fn(params, batch):
        rngs = {"noise": batch_keys(seed, batch["step"][0])[2]}  # noise of the batch (padding rows: row 0's)
        images = model.apply(params["g"], batch["z"], batch.get("labels"), train=False, rngs=rngs)
        _, feats = judge_model.apply(params["j"], images, train=False, return_features=True)
        return {"images": images, "feats": feats}

    source = lambda step: latent_batch(seed, step, batch_size, spec.z_dim, spec.num_classes)
    return features.extract_features(fn, source, batch_size, params={"g": generator[1], "j": judge[1]},
                                     num_samples=num_samples, out_dtype=None, desc=desc)


def generator_cost(model: Any, variables: Any, batch_sizes: Sequence[int] = (1, 64)) -> dict[str, float]:
    """params, flops_per_image (XLA's count at batch 8) and images_per_s_at_B of the eval-mode forward."""
    spec = model.spec

    def inputs(b: int) -> tuple[Any, ...]:
        z = jax.random.normal(jax.random.key(0), (b, spec.z_dim), jnp.float32)
        labels = jnp.arange(b, dtype=jnp.int32) % spec.num_classes if spec.num_classes else None
        return variables, z, labels

    forward = lambda v, z, labels: model.apply(v, z, labels, train=False, rngs={"noise": jax.random.key(1)})
    out = {"params": float(cost.count_params(variables)),
           "flops_per_image": cost.flops_per_image(forward, *inputs(8), batch_size=8)}
    for b in batch_sizes:
        out[f"images_per_s_at_{b}"] = cost.images_per_second(forward, inputs, b, warmup=2, iters=5)
    return out


def quality_metrics(reference_pool: np.ndarray, sample: Mapping[str, Any], seed: int, suffix: str = ""
                    ) -> dict[str, Any]:
    """FID, KID and precision/recall/density/coverage of a sample's 'pool' features against a reference set's
    (real images, or the teacher's own samples); keys end in `suffix`."""
    pool = sample["feats"]["pool"].astype(np.float64)
    kid, pr = fid.kid(reference_pool, pool, seed=seed), prdc.prdc(reference_pool, pool)
    out = {"fid": fid.fid(reference_pool, pool)["fid"], "kid_mean": kid["kid_mean"], "kid_std": kid["kid_std"],
           **{k: pr[k] for k in ("precision", "recall", "density", "coverage")}}
    return {k + suffix: v for k, v in out.items()}


def diversity_metrics(sample: Mapping[str, Any], num_samples: int) -> dict[str, Any]:
    """The mean pairwise perceptual distance of the first `DIVERSITY_SAMPLES` samples."""
    maps = {k: v[:DIVERSITY_SAMPLES] for k, v in sample["feats"].items() if k != "pool"}
    return {"diversity": diversity.diversity(maps)["diversity"],
            "diversity_num_samples": min(num_samples, DIVERSITY_SAMPLES)}


def fidelity_to(reference: Mapping[str, Any], sample: Mapping[str, Any], ref_spectrum: np.ndarray,
                sample_spectrum: np.ndarray, batch_size: int) -> dict[str, float]:
    """PSNR, SSIM, L1, perceptual and spectral distance of `sample` to `reference` on identical latents."""
    maps_of = lambda o: {k: v for k, v in o["feats"].items() if k != "pool"}
    fm = fidelity.fidelity_metrics(reference["images"], sample["images"], maps_of(reference), maps_of(sample),
                                   batch_size=batch_size)
    out = {f"{k}_vs_reference": fm[k] for k in ("psnr", "ssim", "l1", "perceptual")}
    out["spectral_distance_vs_reference"] = spectrum.spectral_distance(ref_spectrum, sample_spectrum)
    return out


def embed(model: ModelAndVariables | None, images: np.ndarray, batch_size: int, desc: str) -> np.ndarray | None:
    """(N, D) embeddings `model.apply(variables, images)` of images (e.g. Inception features); None without a
    model."""
    if model is None:
        return None
    module, variables = model
    return features.extract_features(lambda p, x: module.apply(p, x), np.asarray(images, np.float32), batch_size,
                                     params=variables, desc=desc)


def fidelity_of(name: str, reference: str, generators: Mapping[str, ModelAndVariables],
                samples: Mapping[str, Any], spectra: Mapping[str, np.ndarray], batch_size: int) -> dict[str, Any]:
    """`fidelity_to` the reference for generator `name`, or why it is skipped (no identical latents)."""
    z_dim, ref_z_dim = generators[name][0].spec.z_dim, generators[reference][0].spec.z_dim
    if z_dim != ref_z_dim:
        return {"fidelity_skipped": f"z_dim {z_dim} differs from reference {reference!r}'s {ref_z_dim}: no "
                                    "identical latents."}
    return fidelity_to(samples[reference], samples[name], spectra[reference], spectra[name], batch_size)


def evaluate_generators(generators: Mapping[str, ModelAndVariables], judge: ModelAndVariables,
                        real_images: np.ndarray, *, reference: str | None, num_samples: int, batch_size: int,
                        seed: int, workdir: str, writer: Any = None, timing_batch_sizes: Sequence[int] = (1, 64),
                        inception: ModelAndVariables | None = None,
                        teacher_distribution: tuple[ModelAndVariables, int] | None = None) -> dict[str, Any]:
    """Evaluates generators against real images under a judge classifier; writes the report to `workdir`.

    Args:
      generators: name -> (module, variables) of each generator (any module with the generator interface).
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
      teacher_distribution: optional ((teacher module, variables), N): N samples of the teacher on latents of
        their own (seed + `TEACHER_SEED_OFFSET`) become a second reference set, so every generator also gets
        FID, KID and precision/recall/density/coverage against the teacher's distribution (keys ending in
        `TEACHER_SUFFIX`): how much of the teacher a student kept, free of the small-real-set bias. The
        teacher's own row there is the floor of those figures at `num_samples` against N.

    Returns:
      {name: {metric: value}, "num_samples", "num_real", "num_teacher_samples", "device", "judge_feature_dim",
       "eval_seconds"}.
    """
    start = time.perf_counter()
    if reference is not None and reference not in generators:
        raise ValueError(f"reference={reference!r} is not one of the generators {sorted(generators)}.")
    real_pool = judge_pool(judge, real_images, batch_size)
    spectra = {"real": spectrum.radial_power_spectrum(real_images)}
    real_inception = embed(inception, real_images, batch_size, "Inception features of real images")
    teacher_pool = None
    if teacher_distribution is not None:  # its own latents (seed + TEACHER_SEED_OFFSET), not the shared ones
        teacher_pool = sample_with_features(
            teacher_distribution[0], judge, teacher_distribution[1], batch_size, seed + TEACHER_SEED_OFFSET,
            desc="teacher distribution: samples and judge features")["feats"]["pool"].astype(np.float64)
    samples: dict[str, dict[str, Any]] = {}
    results: dict[str, Any] = {}
    for name, (model, variables) in generators.items():
        samples[name] = sample_with_features((model, variables), judge, num_samples, batch_size, seed,
                                             desc=f"{name}: samples and judge features")
        spectra[name] = spectrum.radial_power_spectrum(samples[name]["images"])
        res = {**quality_metrics(real_pool, samples[name], seed), **diversity_metrics(samples[name], num_samples)}
        if teacher_pool is not None:
            res.update(quality_metrics(teacher_pool, samples[name], seed, TEACHER_SUFFIX))
        if inception is not None:
            fake_inception = embed(inception, samples[name]["images"], batch_size, f"{name}: Inception features")
            kid_inc = fid.kid(real_inception, fake_inception, seed=seed)
            res.update({"fid_inception": fid.fid(real_inception, fake_inception)["fid"],
                        "kid_inception_mean": kid_inc["kid_mean"], "kid_inception_std": kid_inc["kid_std"]})
        res.update(generator_cost(model, variables, timing_batch_sizes))
        res["spectrum"] = spectra[name].tolist()
        results[name] = res
    if reference is not None:
        for name in generators:
            if name != reference:
                results[name].update(fidelity_of(name, reference, generators, samples, spectra, batch_size))
    out = {**results, "num_samples": num_samples, "num_real": int(len(real_pool)),
           "num_teacher_samples": 0 if teacher_pool is None else int(len(teacher_pool)), "reference": reference,
           "judge_feature_dim": int(real_pool.shape[1]), "device": cost.device_name(),
           "eval_seconds": time.perf_counter() - start}
    names = sorted(generators, key=lambda n: n != reference)  # the reference row first
    report.write_report(workdir, "eval", out, format_table(out, names), sort_keys=True)
    report.write_figures(workdir, names, spectra, {n: s["images"][:GRID_SAMPLES] for n, s in samples.items()})
    report.write_scalars(workdir, {f"eval/{n}/{k}": v for n in names for k, v in out[n].items()}, writer)
    return out


# Markdown columns: (header, metric key, format, scale).
COLUMNS = (("FID", "fid", ".2f", 1), ("Inception FID", "fid_inception", ".2f", 1), ("KID", "kid_mean", ".4f", 1),
           ("FID vs T", "fid" + TEACHER_SUFFIX, ".2f", 1), ("KID vs T", "kid_mean" + TEACHER_SUFFIX, ".4f", 1),
           ("rec vs T", "recall" + TEACHER_SUFFIX, ".3f", 1),
           ("prec", "precision", ".3f", 1), ("rec", "recall", ".3f", 1), ("dens", "density", ".3f", 1),
           ("cov", "coverage", ".3f", 1), ("div", "diversity", ".4f", 1), ("PSNR", "psnr_vs_reference", ".2f", 1),
           ("SSIM", "ssim_vs_reference", ".4f", 1), ("L1", "l1_vs_reference", ".4f", 1),
           ("perc", "perceptual_vs_reference", ".4f", 1), ("spec", "spectral_distance_vs_reference", ".4f", 1),
           ("params (M)", "params", ".3f", 1e-6), ("MFLOPs/img", "flops_per_image", ".1f", 1e-6),
           ("img/s @1", "images_per_s_at_1", ".1f", 1), ("img/s @64", "images_per_s_at_64", ".1f", 1))


def format_table(out: Mapping[str, Any], names: Sequence[str]) -> str:
    """One markdown table, models as rows, with the sample counts and device underneath."""
    rows = [[n] + [report.cell(out[n].get(k), f, scale) for _, k, f, scale in COLUMNS] for n in names]
    return (report.markdown_table(["model"] + [h for h, *_ in COLUMNS], rows)
            + f"\n\n{out['num_samples']} samples per model, {out['num_real']} real images"
            + (f", {out['num_teacher_samples']} teacher samples (the 'vs T' columns)" if out["num_teacher_samples"] else "")
            + ", judge features "
            f"({out['judge_feature_dim']}-d; not comparable to Inception FID). Fidelity columns vs "
            f"reference {out['reference']!r} on identical latents. Device: {out['device']}; "
            f"evaluation took {out['eval_seconds']:.1f} s.")
