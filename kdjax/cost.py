"""Parameters, FLOPs/image and images/s of one registered model on the current device.

    python -m kdjax.cost dcgan_generator resolution=32 upsample=transpose dtype=bfloat16
    python -m kdjax.cost stylegan2_generator --batch-sizes=1,64
    python -m kdjax.cost cnn --input-shape=32,32,3 --no-timing

Fields are `name=value` (Python literals; a bare word is a string). The measurement is
`kdjax.evaluation.cost.summary`; what XLA counts is described there.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import jax.numpy as jnp

from kdjax.config.args import parse_value
from kdjax.evaluation.cost import format_table, summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kdjax.cost",
        description="Parameters, FLOPs/image and images/s of a registered model on the current device.")
    parser.add_argument("model", help="registry name, e.g. dcgan_generator, stylegan2_generator")
    parser.add_argument("fields", nargs="*", metavar="field=value", help="model fields (Python literals)")
    parser.add_argument("--batch-sizes", default="1,64", help="comma-separated batch sizes to time")
    parser.add_argument("--no-timing", action="store_true", help="only params and FLOPs (no runs)")
    parser.add_argument("--input-shape", default=None, help="H,W,C for models whose fields do not say it")
    args = parser.parse_args(argv)
    kwargs = {}
    for item in args.fields:
        if "=" not in item:
            parser.error(f"expected field=value, got {item!r}")
        k, v = item.split("=", 1)
        k, v = k.strip(), parse_value(v.strip())
        kwargs[k] = jnp.dtype(v) if k == "dtype" or k.endswith("_dtype") else v  # dtype=bfloat16
    shape = tuple(int(s) for s in args.input_shape.split(",")) if args.input_shape else None
    try:
        s = summary(args.model, batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                    timed=not args.no_timing, input_shape=shape, **kwargs)
    except ValueError as e:  # unknown model or field, undeterminable input shape
        parser.error(str(e))
    desc = " ".join(f"{k}={v!r}" for k, v in kwargs.items())
    print(f"{args.model} {desc}".strip())
    print(format_table([s]))


if __name__ == "__main__":
    main(sys.argv[1:])
