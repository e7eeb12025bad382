"""kdjax's command line: train and evaluate what a config describes.

    python launch.py --config=configs/NAME.py [--config.a.b=value ...] [--workdir=DIR]

The workdir defaults to runs/NAME; launching the same command again resumes from its last checkpoint.
Multi-host (TPU pods, GPU clusters): pass --distributed to call `jax.distributed.initialize()` (which
reads the coordinator from the TPU/SLURM/Open MPI environment) or give --coordinator_address,
--num_processes and --process_id explicitly.
"""

import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/NAME.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and reports go (default: runs/NAME).")
flags.DEFINE_bool("distributed", False, "Initialise JAX's multi-controller runtime (jax.distributed).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for jax.distributed.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for jax.distributed.")
flags.DEFINE_integer("process_id", None, "This process's index, for jax.distributed.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def parse_flags(argv):
    """absl's flag parsing, with bad config overrides reported in one line instead of a traceback."""
    try:
        return FLAGS(argv)
    except Exception as e:  # ml_collections raises KeyError/AttributeError/TypeError/ValueError/FlagsError
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        reason = str(e).strip().strip('"')
        if isinstance(e, (KeyError, AttributeError)):
            what = f"the config has no field {reason} (a typo, or a block this config does not have)"
        else:
            what = f"{type(e).__name__}: {reason}"
        print(f"kdjax: error: bad config override in {overrides}: {what}. Overrides must name an existing "
              "field of the config file, with a value of that field's type.", file=sys.stderr)
        sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import jax

    if FLAGS.distributed or FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from kdjax import train
    from kdjax.core import summaries

    summaries.quiet_library_logs()

    config_path = flags.FLAGS["config"].config_filename
    workdir = FLAGS.workdir or str(pathlib.Path("runs") / pathlib.Path(config_path.split(":")[0]).stem)
    logging.info("kdjax: %s on %d %s device(s), %d process(es); workdir %s", config_path, jax.device_count(),
                 jax.devices()[0].platform, jax.process_count(), workdir)
    try:
        train.check_config(FLAGS.config)
    except ValueError as e:  # bad input: one clear line, no traceback, before any compute
        print(f"kdjax: error: {e}", file=sys.stderr)
        sys.exit(2)
    train.run_checked(FLAGS.config, workdir)  # already checked above


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
