"""Teacher vs student latency after export: JAX (jit), onnxruntime and LiteRT (TFLite), side by side.

    python benchmarks/export_latency.py [--teacher=DIR] [--student=DIR] [--batches=1,64] [--repeats=30]

Both generators are exported (`kdjax.deploy.export_bundle`, parity-checked) to ONNX and TFLite at each fixed
batch size, then timed in one process, call by call, teacher and student alternating so that both see the
same machine load: median milliseconds per call over `--repeats` calls after 3 warm-up calls. The speed-up
(teacher / student) is set against the FLOPs ratio (XLA's count per image): the target is a speed-up of at
least FLOPs ratio / 3 in every runtime. Default teacher: the shipped digits StyleGAN2; default student: the
main job's DCGAN generator (configs/stylegan_to_dcgan.py) with random weights (latency does not depend on
the weights' values). All runtimes use every core (JAX's and onnxruntime's defaults; LiteRT is given
os.cpu_count() threads).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from kdjax import deploy, models
from kdjax.deploy import signature as signatures
from kdjax.evaluation.cost import device_name, flops_per_image
from kdjax.models.bundles import load_model_bundle, save_model_bundle

ROOT = pathlib.Path(__file__).resolve().parent.parent
STUDENT_KWARGS = dict(width=24, width_max=128)  # configs/stylegan_to_dcgan.py's student


def default_student(teacher: str, out: pathlib.Path) -> str:
    meta, _ = load_model_bundle(teacher, "--teacher")
    spec = models.build_model(meta["model"], **meta["kwargs"]).spec
    kwargs = dict(z_dim=spec.z_dim, resolution=spec.resolution, img_channels=spec.channels,
                  num_classes=spec.num_classes, **STUDENT_KWARGS)
    g = models.build_model("dcgan_generator", **kwargs)
    save_model_bundle(out, "dcgan_generator", kwargs, g.init(jax.random.key(0), jnp.zeros((1, spec.z_dim))))
    return str(out)


def timed_pair(calls: dict[str, callable], repeats: int) -> dict[str, float]:
    """{name: median ms per call}, the calls alternating."""
    for fn in calls.values():
        for _ in range(3):
            fn()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=str(ROOT / "kdjax/pretrained/digits32/teacher"))
    p.add_argument("--student", default=None, help="a generator bundle (default: see the docstring)")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="kdjax_export_latency_"))
    bundles = {"teacher": args.teacher, "student": args.student or default_student(args.teacher, work / "student")}
    sigs = {role: signatures.from_bundle(path) for role, path in bundles.items()}
    threads = os.cpu_count() or 1
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        inputs = {role: signatures.example_inputs(sig, batch) for role, sig in sigs.items()}
        flops = {role: flops_per_image(sig.fn, *inputs[role], batch_size=batch) for role, sig in sigs.items()}
        runners = {"jax (jit)": {role: jax.jit(sig.fn) for role, sig in sigs.items()}}
        for fmt, runtime, kw in (("onnx", "onnxruntime", {}), ("tflite", "litert", {"threads": threads})):
            runners[runtime] = {}
            for role, path in bundles.items():
                out = work / f"{role}_{batch}{deploy.FORMATS[fmt].extension}"
                deploy.export_bundle(path, fmt, str(out), batch, overwrite=True)
                runners[runtime][role] = deploy.load(out, **kw)
        for runtime, by_role in runners.items():
            calls = {role: (lambda fn=fn, x=inputs[role]: jax.block_until_ready(fn(*x)))
                     for role, fn in by_role.items()}
            ms = timed_pair(calls, args.repeats)
            ratio = flops["teacher"] / flops["student"]
            speedup = ms["teacher"] / ms["student"]
            rows.append(dict(runtime=runtime, batch=batch, teacher_ms=ms["teacher"], student_ms=ms["student"],
                             speedup=speedup, flops_ratio=ratio, target=ratio / 3, met=speedup >= ratio / 3,
                             teacher_mflops=flops["teacher"] / 1e6, student_mflops=flops["student"] / 1e6))
            print(f"  {runtime:12s} batch {batch:3d}: teacher {ms['teacher']:8.2f} ms, student {ms['student']:7.2f} "
                  f"ms, speed-up {speedup:5.2f}x", file=sys.stderr, flush=True)
    print(f"machine: {device_name()}; jax {jax.__version__}; {args.repeats} timed calls per cell (median)")
    print(f"teacher {bundles['teacher']} ({rows[0]['teacher_mflops']:.1f} MFLOPs/image), student "
          f"{args.student or 'dcgan_generator ' + str(STUDENT_KWARGS) + ' (random weights)'} "
          f"({rows[0]['student_mflops']:.1f} MFLOPs/image)\n")
    print("| runtime | batch | teacher ms/call | student ms/call | speed-up | FLOPs ratio | target (ratio/3) | met |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['runtime']} | {r['batch']} | {r['teacher_ms']:.2f} | {r['student_ms']:.2f} | "
              f"{r['speedup']:.2f}x | {r['flops_ratio']:.2f} | {r['target']:.2f} | {'yes' if r['met'] else 'NO'} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
