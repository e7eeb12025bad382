"""pytest's environment for tests/ and notebooks/: the JAX CPU backend with 8 fake devices and a persistent
compilation cache.

XLA_FLAGS must be set before jax is first imported, which is why this lives in the root conftest.py (loaded
before any test module). Notebook kernels inherit the environment too.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# On CPU the persistent cache only stores entries with these two thresholds lowered (docs/stack.md).
_cache = pathlib.Path(__file__).resolve().parent / ".cache" / "jax"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_cache))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The test programs are tiny and XLA:CPU spends most of their time compiling: JAX's "disable most optimizations"
# (LLVM at -O0, no expensive passes) cut a cold run of tests/test_distill_job.py from 177 s to 138 s here. It
# changes no semantics; subprocesses and notebook kernels inherit it through the environment.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# pytest-xdist (`--dist=loadfile --no-loadscope-reorder`) hands test files to its workers in collection order, a
# file to whichever worker is free. The longest files go first, so that the last ones to finish are short and the
# workers end together. Seconds per file from a cold `pytest --durations=0` on the 2-core machine; a file not named
# keeps its place after these, and a stale entry only costs balance.
LONGEST_FIRST = (
    "tests/test_signals.py", "tests/test_distill_job.py", "tests/test_diffusion_distill_task.py",  # 155, 147, 99 s
    "tests/test_train.py", "tests/test_distribution_matching.py", "tests/test_parallel.py",  # 85, 77, 71 s
    "tests/test_edm_import.py", "tests/test_gan.py", "tests/test_export.py", "tests/test_robustness.py",  # 70-52 s
    "tests/test_vae_kd.py", "notebooks/import_pretrained_stylegan2.ipynb", "tests/test_safe_pickle.py",  # 49-41 s
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
