"""The evaluation command: generators (model bundles) against real data under a judge, one report.

    python -m kdjax.evaluate --generator=teacher=runs/x/teacher/bundle --generator=student=runs/x/student/bundle \
        --judge=runs/x/judge/bundle --reference=teacher --data.source=digits --data.resolution=32 \
        --data.channels=1 [--split=test] [--num_samples=1000] [--batch_size=256] [--seed=0] --workdir=OUT
    python -m kdjax.evaluate --run=runs/x          # every runs/x/*/bundle generator; report in runs/x/eval

What is measured and written: `kdjax.evaluation.generators`. Bad flags or bundles fail with one
`kdjax: error:` line before any compute.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from absl import logging

from kdjax import models
from kdjax.core import summaries
from kdjax.models import bundles
from kdjax.evaluation.generators import ModelAndVariables, evaluate_generators, real_set


def check_judge(judge: Any, judge_vars: Any, resolution: int, channels: int, where: str) -> None:
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
    if not generator_dirs:
        raise ValueError("--generator: no generators given (use --generator=NAME=BUNDLE_DIR or --run=DIR).")
    if reference is not None and reference not in generator_dirs:
        raise ValueError(f"--reference={reference!r} is not a generator name; names: {sorted(generator_dirs)}.")
    bundles.check_model_bundle(judge_dir, "--judge", kind="classifier")
    for name, d in generator_dirs.items():
        meta = bundles.check_model_bundle(d, f"--generator={name}", kind="generator")
        spec = models.build_model(meta["model"], **meta["kwargs"]).spec
        if (spec.resolution, spec.channels) != (resolution, channels):
            raise ValueError(f"--generator={name}={d!r} makes {spec.resolution}x{spec.resolution}x"
                             f"{spec.channels} images; the data is {resolution}x{resolution}x{channels} "
                             "(set --data.resolution / --data.channels).")
    judge_model, judge_vars, _ = bundles.load_model(judge_dir, "--judge")
    check_judge(judge_model, judge_vars, resolution, channels, f"--judge={judge_dir!r}")
    gens = {}
    for name, d in generator_dirs.items():
        model, variables, _ = bundles.load_model(d, f"--generator={name}")
        gens[name] = (model, variables)
    return gens, (judge_model, judge_vars)


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


def define_flags() -> Any:
    """The command's flags (absl), defined once per process; returns absl's FLAGS."""
    from absl import flags
    from ml_collections import config_flags

    from kdjax.config import data_config

    flags.DEFINE_multi_string("generator", [], "NAME=BUNDLE_DIR of a generator to evaluate (repeatable).")
    flags.DEFINE_string("judge", "", "Model bundle of the judge classifier.")
    flags.DEFINE_string("reference", None, "Generator the others are compared with on identical latents.")
    flags.DEFINE_string("run", None, "A kdjax run workdir: evaluate its DIR/*/bundle generators.")
    flags.DEFINE_enum("split", "all", ["all", "test", "train"], "The real set: every image of the dataset (all), "
                      "or one split.")
    flags.DEFINE_integer("teacher_samples", 0, "With --reference: this many samples of the reference generator "
                         "(on latents of their own) are a second reference set ('vs teacher dist' figures); 0 = off.")
    flags.DEFINE_integer("num_samples", 1000, "Images drawn per generator.")
    flags.DEFINE_integer("batch_size", 256, "Images per step over all devices.")
    flags.DEFINE_integer("seed", 0, "Seed of the latents, labels and noise.")
    flags.DEFINE_string("workdir", None, "Output folder (default with --run: DIR/eval).")
    flags.DEFINE_string("inception_weights", None, "pytorch-fid's pt_inception-2015-12-05 weights (.pth or .npz): "
                        "adds Inception FID/KID, comparable with papers.")
    config_flags.DEFINE_config_dict("data", data_config(), "The data block (kdjax.config.data_config).")
    return flags.FLAGS


def resolve(flags_: Any, argv: Sequence[str]) -> dict[str, Any]:
    """Every input of the evaluation from the flags, each checked and loaded before any compute: generators,
    judge, reference, data block, workdir and the optional Inception network. Raises on bad input."""
    from kdjax.config import data_config

    gen_dirs, judge_dir, reference, data = {}, flags_.judge, flags_.reference, flags_.data
    if flags_.run:
        gen_dirs, run_judge, block, run_ref = resolve_run(flags_.run)
        data = data_config(**{k: v for k, v in block.items() if k in data_config()})
        given = {a.split("=", 1)[0][len("--data."):] for a in argv if a.startswith("--data.")}
        data.update({k: flags_.data[k] for k in given})
        judge_dir, reference = judge_dir or run_judge, reference or run_ref
    for item in flags_.generator:
        name, sep, d = item.partition("=")
        if not sep or not name or not d:
            raise ValueError(f"--generator={item!r}: expected NAME=BUNDLE_DIR.")
        gen_dirs[name] = d
    if not judge_dir:
        raise ValueError("--judge: no judge bundle given (and no DIR/judge/bundle in --run).")
    workdir = flags_.workdir or (str(pathlib.Path(flags_.run) / "eval") if flags_.run else None)
    if not workdir:
        raise ValueError("--workdir is required without --run.")
    if flags_.num_samples < 4 or flags_.batch_size < 1 or 0 < flags_.teacher_samples < 4:
        raise ValueError("--num_samples (and --teacher_samples unless 0) must be >= 4 (k-NN with k = 3) and "
                         "--batch_size >= 1.")
    if flags_.teacher_samples and reference is None:
        raise ValueError("--teacher_samples needs --reference (the generator whose samples are the reference set).")
    generators, judge = load_models(gen_dirs, judge_dir, reference, data.resolution, data.channels)
    inception_model = None
    if flags_.inception_weights:
        from kdjax.evaluation import inception as inception_lib

        if not pathlib.Path(flags_.inception_weights).is_file():
            raise ValueError(f"--inception_weights={flags_.inception_weights!r} is not a file.")
        inception_model = (inception_lib.InceptionV3(), inception_lib.load_inception_variables(flags_.inception_weights))
    return {"generators": generators, "judge": judge, "reference": reference, "data": data, "workdir": workdir,
            "inception": inception_model}


def main(argv: Sequence[str]) -> None:
    from absl import app

    from kdjax.core.data import load_dataset

    flags_ = define_flags()

    def run(_):
        try:
            inputs = resolve(flags_, argv)
            dataset = load_dataset(inputs["data"])
        except Exception as e:  # CheckpointError, ValueError: a bad flag or path, before any compute
            print(f"kdjax: error: {e}", file=sys.stderr)
            sys.exit(2)
        real = real_set(dataset, flags_.split)
        logging.info("Evaluating %s on %d real images (%s) of %s.", sorted(inputs["generators"]), len(real),
                     flags_.split, dataset.name)
        reference = inputs["reference"]
        teacher = ((inputs["generators"][reference], flags_.teacher_samples)
                   if reference is not None and flags_.teacher_samples else None)
        evaluate_generators(inputs["generators"], inputs["judge"], real, reference=reference,
                            num_samples=flags_.num_samples, batch_size=flags_.batch_size, seed=flags_.seed,
                            workdir=inputs["workdir"], inception=inputs["inception"], teacher_distribution=teacher)

    app.run(run, argv=argv)


if __name__ == "__main__":
    summaries.quiet_library_logs()
    main(sys.argv)
