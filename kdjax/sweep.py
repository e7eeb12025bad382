"""A comparison over seeds: every setting of a config, each run with N seeds, reported as mean +- std.

    python -m kdjax.sweep --config=configs/stylegan_to_dcgan.py --seeds=3 --vary adv=0,0.1,1
    python -m kdjax.sweep --config=configs/stylegan_to_dcgan.py:tiny --seeds=2 --vary adv=0,0.1 --vary kl=0,0.1 \
        --config.train.num_steps=200 --workdir=runs/sweep_terms
    python -m kdjax.sweep --config=configs/classifier_kd.py --seeds=3 --seed_offset=100 --vary kd.alpha=0.1,0.5
    python -m kdjax.sweep --config=configs/stylegan_to_dcgan.py --setting default= \
        --setting d_real=distill.d_real_data=True --setting kl=kl=0.1

Each `--vary FIELD=v1,v2,...` is one axis (FIELD a dotted config path or an alias the config file declares,
e.g. a distillation term's weight); each `--setting NAME=ITEMS` is one named setting (ITEMS the config items
it sets, `FIELD=VALUE,...`, possibly none); the settings are the named ones (or one "base") times the
product of the axes. Every run is the config file
loaded with the items `FIELD=value,...,seed=S` after the file's own argument (`kdjax.config.args`), plus the
`--config.FIELD=VALUE` flags given here, and trains in `WORKDIR/SETTING/seed_S` like any launch: a sweep
launched again resumes its unfinished runs from their checkpoints and skips the runs that have a report.
Seeds are `seed_offset + 0 .. seeds - 1`: choose settings on one seed set (e.g. `--seed_offset=100`) and
report on fresh seeds (the default 0, 1, 2), never on the figures used to choose.

Written to the workdir: `sweep.json` (per setting and figure: mean, std with ddof 1, n, the per-seed values),
`sweep.md` (a table of the main figures) and `sweep.png` (bars with error bars and the seeds' values). Every
config and flag is checked before any run starts; a bad one is one `kdjax: error:` line, exit status 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import re
import sys
import time
from typing import Any, Sequence

# Figures of the table and plot, by task (every numeric figure is in sweep.json whatever is chosen here).
DEFAULT_METRICS = {
    "distill": ["teacher/fid", "student_kd/fid", "student_scratch/fid", "teacher/kid", "student_kd/kid",
                "student_scratch/kid", "student_kd/kid_vs_teacher_dist", "ratios/kd_over_scratch_fid",
                "ratios/kd_over_scratch_kid", "ratios/kd_over_teacher_fid", "ratios/kd_over_teacher_kid"],
    "classifier_kd": ["teacher/accuracy", "student_kd/accuracy", "student_scratch/accuracy", "student_kd/ece",
                      "student_scratch/ece", "teacher/retrieval/recall@1", "student_kd/retrieval/recall@1",
                      "student_scratch/retrieval/recall@1"],
    "pixelcnn_kd": ["teacher/test_bits_per_dim", "student_kd/test_bits_per_dim", "student_seq/test_bits_per_dim",
                    "student_scratch/test_bits_per_dim", "teacher/fid", "student_kd/fid", "student_seq/fid",
                    "student_scratch/fid", "teacher/kid_mean", "student_kd/kid_mean", "student_seq/kid_mean",
                    "student_scratch/kid_mean"],
    "restoration_kd": ["baseline/psnr", "teacher/psnr", "student_kd/psnr", "student_scratch/psnr", "baseline/ssim",
                       "teacher/ssim", "student_kd/ssim", "student_scratch/ssim", "student_kd/psnr_vs_teacher",
                       "student_scratch/psnr_vs_teacher", "validation/student_kd/psnr",
                       "validation/student_scratch/psnr"],
    "vae_kd": ["teacher/psnr", "tiny_decoder_kd/psnr", "tiny_decoder_scratch/psnr", "tiny_encoder/psnr",
               "tiny_encoder_decoder/psnr", "teacher/ssim", "tiny_decoder_kd/ssim", "tiny_decoder_scratch/ssim",
               "tiny_decoder_kd/psnr_vs_teacher", "tiny_decoder_scratch/psnr_vs_teacher",
               "validation/tiny_decoder_kd/psnr", "validation/tiny_decoder_scratch/psnr"],
    "gan": ["steps"],
    "diffusion_distill": ["figures/*/fid", "figures/*/fid_vs_teacher"],
}


def parse_axis(text: str) -> tuple[str, list[str]]:
    """`FIELD=v1,v2,...` -> (FIELD, [v1, v2, ...]) (values kept as text; commas inside brackets kept)."""
    from kdjax.config.args import split_items

    field, sep, values = text.partition("=")
    items = split_items(values)
    if not sep or not field.strip() or not items:
        raise ValueError(f"--vary {text!r}: expected FIELD=v1,v2,... (a config field or alias and its values).")
    return field.strip(), items


def parse_setting(text: str) -> tuple[str, str]:
    """`NAME=ITEMS` -> (NAME, ITEMS); NAME in letters, digits, '_', '.', '-'."""
    name, sep, items = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"--setting {text!r}: expected NAME=ITEMS (NAME in letters, digits, '_', '.', '-'; "
                         "ITEMS the config items it sets, FIELD=VALUE,..., possibly none).")
    return name, items


def settings_of(axes: Sequence[tuple[str, list[str]]], named: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """{setting name: config items}: the named settings (or one "base") times the product of the axes."""
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"--setting: a name given twice in {names}.")
    base = dict(named) or {"base": ""}
    out = {}
    for (base_name, base_items), values in itertools.product(base.items(), itertools.product(*(v for _, v in axes))):
        items = [f"{field}={value}" for (field, _), value in zip(axes, values)]
        name = "_".join(([base_name] if named or not items else []) + items)
        out[re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name)] = ",".join(x for x in (base_items, *items) if x)
    return out


def plan(config_spec: str, settings: dict[str, str], overrides: Sequence[str], seeds: Sequence[int],
         workdir: pathlib.Path) -> list[dict[str, Any]]:
    """Every run of the sweep, its config loaded and checked (raises ValueError on any bad one)."""
    from kdjax import train

    path, _, base = config_spec.partition(":")
    runs = []
    for name, items in settings.items():
        for seed in seeds:
            arg = ",".join(x for x in (base, items, *overrides, f"seed={seed}") if x)
            config = train.load_config(f"{path}:{arg}")
            train.check_config(config)
            run_dir = workdir / name / f"seed_{seed}"
            recorded = run_dir / "sweep_run.txt"
            if recorded.is_file() and recorded.read_text().strip() != f"{path}:{arg}":
                raise ValueError(f"{run_dir} holds a run of {recorded.read_text().strip()!r}, not of {path}:{arg!r}; "
                                 "use another --workdir.")
            runs.append({"setting": name, "items": items, "seed": seed, "config": config, "spec": f"{path}:{arg}",
                         "workdir": run_dir})
    return runs


def run_all(runs: Sequence[dict[str, Any]]) -> None:
    """Runs (or resumes) every run without a report, in order, with progress and an ETA."""
    from kdjax import train

    todo = [r for r in runs if not (r["workdir"] / "report.json").is_file()]
    print(f"kdjax.sweep: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run.", flush=True)
    start = time.perf_counter()
    for i, r in enumerate(todo):
        print(f"kdjax.sweep: [{i + 1}/{len(todo)}] {r['setting']} seed {r['seed']} -> {r['workdir']}", flush=True)
        r["workdir"].mkdir(parents=True, exist_ok=True)
        (r["workdir"] / "sweep_run.txt").write_text(r["spec"] + "\n")
        if train.run_checked(r["config"], r["workdir"]) is None:
            raise SystemExit(f"kdjax.sweep: the run {r['workdir']} stopped early; launch the sweep again to resume.")
        elapsed = time.perf_counter() - start
        print(f"kdjax.sweep: {i + 1}/{len(todo)} done in {elapsed:.0f} s; ETA {elapsed / (i + 1) * (len(todo) - i - 1):.0f} s",
              flush=True)


def expand_metrics(metrics: Sequence[str], settings: dict[str, Any]) -> list[str]:
    """The figure paths of `metrics`, each a path or a shell-style pattern (`fnmatch`: "figures/*/fid") standing for
    every matching path any setting reports, in sorted order; a path no setting has stays (its cells show "-")."""
    import fnmatch

    known = sorted(set().union(*(s["metrics"] for s in settings.values())))
    out: list[str] = []
    for m in metrics:
        matches = fnmatch.filter(known, m) if any(c in m for c in "*?[") else [m]
        out += [x for x in matches if x not in out]
    return out


def summarise(runs: Sequence[dict[str, Any]], workdir: pathlib.Path, metrics: Sequence[str]) -> dict[str, Any]:
    """Aggregates the runs' reports per setting; writes sweep.json, sweep.md and sweep.png."""
    from kdjax.evaluation import aggregate

    settings: dict[str, Any] = {}
    for r in runs:
        s = settings.setdefault(r["setting"], {"items": r["items"], "seeds": [], "runs": [], "reports": []})
        s["seeds"].append(r["seed"])
        s["runs"].append(str(r["workdir"]))
        s["reports"].append(json.loads((r["workdir"] / "report.json").read_text()))
    for s in settings.values():
        s["metrics"], s["num_runs"] = aggregate.aggregate(s.pop("reports")), len(s["runs"])
    out = {"config": runs[0]["spec"].split(":")[0], "std": "sample standard deviation over seeds (ddof=1)",
           "settings": settings}
    (workdir / "sweep.json").write_text(json.dumps(out, indent=2))
    metrics = expand_metrics(metrics, settings)
    table = aggregate.sweep_table(settings, metrics)
    (workdir / "sweep.md").write_text(table + f"\n\nmean +- std (ddof 1) over seeds {runs[0]['seed']}.. of each "
                                      f"setting; every figure per seed in sweep.json.\n\n![sweep](sweep.png)\n")
    aggregate.plot_sweep(settings, metrics, workdir / "sweep.png")
    print(table)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(prog="python -m kdjax.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    parser.add_argument("--seeds", type=int, default=3, help="runs per setting (default 3)")
    parser.add_argument("--seed_offset", type=int, default=0, help="first seed (e.g. 100 for validation seeds)")
    parser.add_argument("--vary", action="append", default=[], metavar="FIELD=v1,v2", help="one axis (repeatable)")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=ITEMS",
                        help="one named setting (repeatable)")
    parser.add_argument("--workdir", default=None, help="default runs/sweep_NAME")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated figure paths or fnmatch patterns ('figures/*/fid') for the table")
    args, rest = parser.parse_known_args(argv)
    try:
        bad = [a for a in rest if not a.startswith("--config.") or "=" not in a]
        if bad:
            raise ValueError(f"unknown arguments {bad}; config fields are set with --config.FIELD=VALUE.")
        if args.seeds < 1:
            raise ValueError(f"--seeds={args.seeds} must be >= 1.")
        settings = settings_of([parse_axis(v) for v in args.vary], [parse_setting(v) for v in args.setting])
        overrides = [a[len("--config."):] for a in rest]
        stem = pathlib.Path(args.config.split(":")[0]).stem
        workdir = pathlib.Path(args.workdir or f"runs/sweep_{stem}")
        runs = plan(args.config, settings, overrides, range(args.seed_offset, args.seed_offset + args.seeds), workdir)
    except (ValueError, AttributeError, KeyError, TypeError, OSError) as e:
        print(f"kdjax: error: {e}", file=sys.stderr)
        sys.exit(2)
    workdir.mkdir(parents=True, exist_ok=True)
    run_all(runs)
    task = runs[0]["config"].task
    metrics = args.metrics.split(",") if args.metrics else DEFAULT_METRICS.get(task, [])
    return summarise(runs, workdir, metrics)


if __name__ == "__main__":
    from absl import logging as absl_logging

    from kdjax.core import summaries

    # Each run's progress (steps/s, ETA, metrics) as `launch.py` shows it: absl's INFO lines on stderr (without
    # absl.app, absl logs only warnings).
    absl_logging.use_absl_handler()
    absl_logging.set_verbosity(absl_logging.INFO)
    summaries.quiet_library_logs()
    main()
