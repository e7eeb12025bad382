"""The tests run on the JAX CPU backend with 8 fake devices (set up in the repository's root conftest.py)."""

import jax

assert jax.device_count() == 8, f"tests expect 8 fake CPU devices, got {jax.devices()}"
