"""Export a model bundle for deployment: StableHLO, ONNX, TensorFlow SavedModel or TensorFlow Lite.

    python -m kdjax.export --bundle=DIR --format=stablehlo|onnx|savedmodel|tflite --out=PATH
        [--batch=N|dynamic] [--overwrite] [--input_shape=H,W,C] [--truncation_psi=PSI] [--tolerance=1e-4]

Any bundle kdjax writes (a distilled student, a teacher, a judge, an imported official pickle). The inputs
come from the bundle (a generator: `z` [, `labels`]; a classifier: `images`), a StyleGAN2 generator's
noise is fixed (`noise_mode='const'`). The export is loaded back in its runtime and checked against JAX
before it is moved to `--out`; a failure or an interruption leaves nothing there. ONNX and TFLite need
`pip install -e '.[export]'`. The procedure is `kdjax.deploy.export_bundle`; a bad argument is exit status 2
and one `kdjax: error:` line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Sequence

from kdjax.deploy import FORMATS, ExportError, export_bundle


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ExportError(f"--input_shape={text!r} is not H,W,C (three positive integers, e.g. 32,32,1).")
    return shape


def interrupt(signum, frame) -> None:
    """SIGTERM as KeyboardInterrupt, so that the staged export is cleaned up as for Ctrl-C."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kdjax.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="model bundle directory (model.json + variables/)")
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, help="output file (.jaxexport, .onnx, .tflite) or SavedModel directory")
    p.add_argument("--batch", default="dynamic", help="rows per call: N, or 'dynamic' (default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--input_shape", default=None, help="H,W,C of a classifier whose bundle does not record it")
    p.add_argument("--truncation_psi", type=float, default=None, help="a StyleGAN2 generator's truncation")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="parity check: max |exported - JAX| <= tolerance x max(1, max |JAX|)")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up notices (before it is imported)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        summary = export_bundle(args.bundle, args.format, args.out, args.batch, overwrite=args.overwrite,
                                input_shape=parse_shape(args.input_shape), truncation_psi=args.truncation_psi,
                                tolerance=args.tolerance)
    except ExportError as e:
        print(f"kdjax: error: {e}", file=sys.stderr)
        sys.exit(2)
    meta = summary["metadata"]
    errors = ", ".join(f"{e:.2g} at batch {n}" for n, e in summary["max_abs_error"].items())
    print(f"Wrote {summary['out']} ({summary['bytes'] / 1e6:.2f} MB, {args.format}, batch {meta['batch']}, "
          f"{summary['seconds']:.1f} s): {meta['model']} "
          f"{' + '.join(t['name'] for t in meta['inputs'])} -> {meta['outputs'][0]['name']}; "
          f"max |exported - JAX| = {errors}.")
    print(json.dumps({"inputs": meta["inputs"], "outputs": meta["outputs"], "converter": meta["converter"]}))


if __name__ == "__main__":
    main()
