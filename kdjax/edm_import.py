"""Import an official NVlabs/edm network pickle (EDMPrecond around SongUNet or DhariwalUNet) as a kdjax denoiser
bundle.

    python -m kdjax.edm_import --pkl=edm-cifar10-32x32-cond-vp.pkl --out=/path/to/teacher [--network=ema]

`--pkl` may be a path or an http(s):// or file:// URL. Nothing in the file runs: it is read by a restricted
unpickler. The conversion is `kdjax.importers.edm`; the bundle holds an `edm_songunet` or `edm_dhariwalunet`
(`kdjax.models.edm_official`), which `kdjax.models.bundles.load_model` reads back. A bad path, URL or pickle
(hostile, truncated, corrupt, not an EDM network, an unsupported option, a tensor of the wrong shape) is exit
status 2 and exactly one `kdjax: error:` line on stderr, every non-printable character written as an escape.
"""

from __future__ import annotations

import argparse
import json

from kdjax.importers.edm import NetworkPickleError, import_pickle
from kdjax.importers.pickle_stream import escape


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kdjax.edm_import", description=__doc__.split("\n\n")[0])
    p.add_argument("--pkl", required=True, help="official NVlabs/edm network pickle: a path or an http(s)/file URL")
    p.add_argument("--out", required=True, help="output model bundle directory (model.json + Orbax variables/)")
    p.add_argument("--network", default="ema", help="which network of the pickle (default ema)")
    args = p.parse_args(argv)
    try:
        out = import_pickle(args.pkl, args.out, network=args.network)
    except (OSError, NetworkPickleError) as e:  # bad path/URL/pickle: one escaped line, no traceback
        p.exit(2, f"kdjax: error: {escape(str(e))}\n")
    meta = json.loads((out / "model.json").read_text())
    print(f"Wrote {out} ({meta['model']}, {meta['kwargs']}).")


if __name__ == "__main__":
    main()
