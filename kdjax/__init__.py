"""kdjax: knowledge distillation for image generators and classifiers in JAX/Flax."""

__version__ = "0.1.0"
