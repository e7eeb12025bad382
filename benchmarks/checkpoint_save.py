"""Time one train-checkpoint save of a replicated state: as `TrainCheckpoints.save` writes it (numpy values) and
as Orbax's StandardSave of the replicated `jax.Array`s themselves (its replica-parallel write), in one run.

    python benchmarks/checkpoint_save.py [--devices=8] [--leaves=200] [--side=16] [--repeats=5]

The state is `leaves` float32 arrays of side x side, replicated over `devices` CPU devices (the test suite's 8
fake devices by default). Prints the median seconds per save (synchronous, to a temporary directory) of each way
and their ratio, and checks that both restore to the same values with the mesh's sharding.
"""

import argparse
import os
import sys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--leaves", type=int, default=200)
    p.add_argument("--side", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import pathlib
    import statistics
    import tempfile
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp

    from kdjax.core import parallel

    mesh = parallel.make_mesh()
    sharding = parallel.replicated(mesh)
    state = {f"w{i}": jax.device_put(jnp.full((args.side, args.side), float(i)), sharding) for i in range(args.leaves)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
    root = pathlib.Path(tempfile.mkdtemp())

    def time_saves(name, prepare):
        manager = ocp.CheckpointManager(root / name, options=ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=False), item_handlers=ocp.StandardCheckpointHandler())
        seconds = []
        for step in range(args.repeats):
            start = time.perf_counter()
            manager.save(step, args=ocp.args.StandardSave(prepare(state)), force=True)
            manager.wait_until_finished()
            seconds.append(time.perf_counter() - start)
        restored = manager.restore(args.repeats - 1, args=ocp.args.StandardRestore(abstract))
        for key, value in state.items():
            assert restored[key].sharding == sharding and np.array_equal(restored[key], value), key
        manager.close()
        return statistics.median(seconds)

    numpy_s = time_saves("numpy", parallel.to_host)
    arrays_s = time_saves("arrays", lambda s: s)
    print(f"{args.leaves} leaves of {args.side}x{args.side} float32 replicated over {jax.device_count()} "
          f"{jax.devices()[0].platform} devices, median of {args.repeats} saves: numpy values {numpy_s:.3f} s, "
          f"replicated jax.Arrays {arrays_s:.3f} s ({arrays_s / numpy_s:.1f}x)", file=sys.stdout)


if __name__ == "__main__":
    main()
