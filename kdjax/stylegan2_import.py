"""Import an official StyleGAN2 network pickle (stylegan2-ada-pytorch, stylegan3) as a kdjax teacher bundle.

    python -m kdjax.stylegan2_import --pkl=network-snapshot.pkl --out=/path/to/teacher
        [--network=G_ema] [--conv_clamp=256]

`--pkl` may be a path or an http(s):// or file:// URL. Nothing in the file runs: it is read by a restricted
unpickler. The conversion is `kdjax.importers.stylegan2`; a bad path, URL or pickle (hostile, truncated,
corrupt, or not a StyleGAN2 generator) is exit status 2 and exactly one `kdjax: error:` line on stderr, in
which every non-printable character (CR, LF, terminal escapes) is written as a backslash escape.
"""

from __future__ import annotations

import argparse
import json

from kdjax.importers.pickle_stream import escape
from kdjax.importers.stylegan2 import NetworkPickleError, import_pickle


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kdjax.stylegan2_import", description=__doc__.split("\n\n")[0])
    p.add_argument("--pkl", required=True,
                   help="official network pickle (stylegan2-ada-pytorch/stylegan3): a path or an http(s)/file URL")
    p.add_argument("--out", required=True, help="output model bundle directory (model.json + Orbax variables/)")
    p.add_argument("--network", default="G_ema", help="which network of the pickle (default G_ema)")
    p.add_argument("--conv_clamp", type=float, default=None,
                   help="override conv_clamp (needed when the pickle has no init_kwargs)")
    args = p.parse_args(argv)
    try:
        out = import_pickle(args.pkl, args.out, network=args.network, conv_clamp=args.conv_clamp)
    except (OSError, NetworkPickleError) as e:  # bad path/URL/pickle: one escaped line, no traceback
        p.exit(2, f"kdjax: error: {escape(str(e))}\n")
    meta = json.loads((out / "model.json").read_text())
    print(f"Wrote {out} ({meta['kwargs']}).")


if __name__ == "__main__":
    main()
