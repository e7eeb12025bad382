"""pytest --nbmake runs every notebook here top to bottom, each in its own kernel, in the tiny setting.

The kernels inherit this environment: KDJAX_NOTEBOOK_TINY=1 (each notebook shrinks its run to a tiny config),
the JAX CPU backend with 8 fake devices (the notebooks' data-parallel paths run sharded, as on a TPU's cores)
and the persistent compilation cache the tests use.
"""

import os
import pathlib

os.environ["KDJAX_NOTEBOOK_TINY"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
_cache = pathlib.Path(__file__).resolve().parent.parent / ".cache" / "jax"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_cache))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
