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

# The heaviest test files first (seconds of worker time in a CI run, most first), the rest in their usual order.
# With `--dist=loadfile` and `--no-loadscope-reorder` (pyproject.toml), pytest-xdist hands out whole files in this
# order, so the workers end on short files instead of one worker running a long file alone at the end. Only the
# suite's wall time depends on this list; a file missing from it runs after the ones named.
HEAVY_FIRST = ("test_distill_job.py", "test_train.py", "test_signals.py", "test_robustness.py", "test_gan.py",
               "test_export.py", "test_parallel.py", "test_vqvae_prior_kd.py", "test_pixelcnn_kd.py",
               "test_safe_pickle.py", "test_pixelcnn.py", "test_distill.py", "test_sweep.py", "test_vae_kd.py",
               "test_stylegan2.py", "import_pretrained_stylegan2.ipynb", "test_restoration_kd.py",
               "test_diffusion_teacher.py", "test_diffusion_distill.py", "test_distribution_matching.py",
               "test_dcgan.py", "test_evaluate.py", "test_stylegan2_import.py", "distill_stylegan_to_dcgan.ipynb",
               "test_export_onnx.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: within a file, the file's order
