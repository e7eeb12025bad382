"""kdjax's command line: train and evaluate what a config describes.

    python launch.py --config=configs/NAME.py [--config.a.b=value ...] [--workdir=DIR]

The workdir defaults to runs/NAME; launching the same command again resumes from its last checkpoint.
A bad input or environment (config, bundle, data, workdir in use or not writable, full disk) ends the
launch with one line `kdjax: error: ...` on stderr and exit status 2 (`--verbosity=1` also logs the
traceback). SIGTERM, SIGINT and SIGUSR1 stop a training phase after the current step with a checkpoint of
it and exit status 0 (`kdjax.core.signals`); the same command resumes. A second one stops at once (exit
status 130 for a second Ctrl-C). A process that may run on 1 CPU only gets PJRT_NPROC=2 (`pin_cpu_threads`).
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
HERE = pathlib.Path(__file__).resolve().parent
# Errors that are about the input or the environment (bad config or bundle, unreadable data, workdir in use or
# not writable, disk full, NaN metrics): reported in one line with exit status 2. Anything else is a bug and
# keeps its traceback.
RUN_ERRORS = (ValueError, OSError, FloatingPointError)


def fail(message: str) -> None:
    """Ends the launch with exit status 2 and one line on stderr (whitespace collapsed: library messages span
    lines)."""
    print(f"kdjax: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def error_text(e: BaseException) -> str:
    """An exception's message on one line; a message that embeds a traceback (config_flags re-raises a config
    file's error with the formatted traceback in its text) is cut to its last line, the original error."""
    text = str(e).strip().strip('"')
    if "Traceback (most recent call last)" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
    return " ".join(text.split())


def parse_flags(argv):
    """absl's flag parsing, with a bad --config or override reported in one line instead of a traceback."""
    try:
        return FLAGS(argv)
    except Exception as e:  # ml_collections raises KeyError/AttributeError/TypeError/ValueError/FlagsError
        fail(flag_error(argv, e))


def flag_error(argv, e: Exception) -> str:
    """What went wrong while parsing `argv`: the config file itself, or one of the --config.* overrides."""
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
    reason = error_text(e)
    if spec is None:
        return f"{reason.rstrip('.')}. Pass --config=configs/NAME.py[:ARG]."
    if not pathlib.Path(spec.split(":")[0]).expanduser().is_file():
        return f"--config={spec}: there is no such config file; expected --config=PATH.py[:ARG]."
    if not overrides or isinstance(e, (SyntaxError, ImportError, NameError)):
        return f"--config={spec}: the config file does not load ({type(e).__name__}: {reason})."
    if isinstance(e, (KeyError, AttributeError)):
        what = f"the config has no field {reason} (a typo, or a block this config does not have)"
    else:
        what = f"{type(e).__name__}: {reason}"
    return (f"bad config override in {overrides}: {what}. Overrides must name an existing field of the config "
            "file, with a value of that field's type.")


def load_flag_config(spec: str):
    """The config `--config` names; one error line for a missing file or one that does not load."""
    path = pathlib.Path(spec.split(":")[0]).expanduser()
    if not path.is_file():
        shipped = sorted(str(p.relative_to(HERE)) for p in (HERE / "configs").glob("*.py"))
        fail(f"--config={spec}: there is no config file {str(path)!r}; expected --config=PATH.py[:ARG], e.g. one of "
             f"{shipped} (relative to {str(HERE)!r}).")
    try:
        config = FLAGS.config
        config.task  # config_flags defers a load error to the first access
    except Exception as e:  # the file is the user's Python: SyntaxError, NameError, a bad :ARG, ...
        fail(f"--config={spec}: the config file does not load ({type(e).__name__}: {error_text(e)}).")
    return config


def pin_cpu_threads() -> None:
    """Gives XLA:CPU an intra-op thread pool of at least 2 threads, before jax is imported.

    XLA sizes that pool from PJRT_NPROC (else NPROC, else the CPUs this process may run on), and with a pool
    of 1 it sums large reductions (BatchNorm statistics, loss means) in another order than with 2 or more.
    Measured on the project machine: the classic-KD run under `taskset -c 0` ends with other weights than on
    its 2 CPUs, while PJRT_NPROC=2 under `taskset -c 0` and PJRT_NPROC=16 on 2 CPUs give the 2-CPU weights
    bitwise (single large sums: pools of 2, 3, 4, 16 and 64 agree, 1 differs). So a 1-CPU process gets
    PJRT_NPROC=2 and a run does not depend on how many CPUs a machine shows. An explicit PJRT_NPROC or NPROC
    is kept.
    """
    if "PJRT_NPROC" not in os.environ and "NPROC" not in os.environ and len(os.sched_getaffinity(0)) < 2:
        os.environ["PJRT_NPROC"] = "2"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    pin_cpu_threads()
    config_path = flags.FLAGS["config"].config_filename
    config = load_flag_config(config_path)
    import jax

    if FLAGS.distributed or FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from kdjax import train
    from kdjax.core import summaries

    summaries.quiet_library_logs()
    workdir = FLAGS.workdir or str(pathlib.Path("runs") / pathlib.Path(config_path.split(":")[0]).stem)
    logging.info("kdjax: %s on %d %s device(s), %d process(es); workdir %s", config_path, jax.device_count(),
                 jax.devices()[0].platform, jax.process_count(), workdir)
    try:
        train.check_config(config)  # bad input: one clear line, no traceback, before any compute
        train.run_checked(config, workdir)  # None when a phase stopped early; the loop's warning says so
    except RUN_ERRORS as e:
        logging.debug("kdjax: the error's traceback", exc_info=True)  # shown with --verbosity=1
        fail(str(e))
    except KeyboardInterrupt:  # a second Ctrl-C means now: do not wait for library threads (a save in flight)
        print("kdjax: error: interrupted (a second Ctrl-C, or one outside a training step); the checkpoints "
              "written so far are kept: launch the same command again to resume.", file=sys.stderr, flush=True)
        os._exit(130)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
