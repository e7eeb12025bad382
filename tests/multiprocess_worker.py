"""Runs the tiny classic-KD config in one process of a (possibly) multi-process JAX job.

    python multiprocess_worker.py WORKDIR COORDINATOR NUM_PROCESSES PROCESS_ID

COORDINATOR "" means a single process. Used by tests/test_parallel.py, which compares the exported
bundles and reports of a 2-process run and a 1-process run after the workers exit.
"""

import pathlib
import sys

import jax

workdir, coordinator, num_processes, process_id = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)

from kdjax import train  # noqa: E402

root = pathlib.Path(__file__).resolve().parent.parent
config = train.load_config(f"{root / 'configs' / 'classifier_kd.py'}:tiny")
config.async_checkpoints = False
train.train_and_evaluate(config, workdir)
print("worker done", jax.process_index(), jax.process_count(), jax.device_count())
