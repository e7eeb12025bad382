"""Bundles and independent references for the export tests: a class-conditional DCGAN generator with
non-trivial BatchNorm statistics, a tiny StyleGAN2 generator with noise, and a small CNN classifier, each
run through `model.apply` directly (not through kdjax.deploy) to give the outputs an export must match."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.models import build_model
from kdjax.models.bundles import save_model_bundle
from kdjax.pretrained.tiny import write_tiny_bundles

DCGAN = dict(z_dim=16, resolution=16, img_channels=1, num_classes=3, width=8, width_max=16)
CLASSIFIER_SHAPE = (16, 16, 1)


def write_bundles(root: pathlib.Path, upsample: str = "subpixel") -> dict[str, pathlib.Path]:
    """{"dcgan", "stylegan2", "classifier"}: bundle directories under `root`."""
    teacher, judge = write_tiny_bundles(root / "tiny")
    g = build_model("dcgan_generator", **DCGAN, upsample=upsample)
    variables = g.init(jax.random.key(3), jnp.zeros((2, DCGAN["z_dim"])), jnp.zeros((2,), jnp.int32))
    # Running statistics of real batches (not the init's (0, 1)), so the export must use them.
    z = jax.random.normal(jax.random.key(4), (64, DCGAN["z_dim"]))
    labels = jnp.arange(64) % DCGAN["num_classes"]
    update = jax.jit(lambda v: g.apply(v, z, labels, train=True, mutable=["batch_stats"])[1])
    for _ in range(40):
        variables = {**variables, **update(variables)}
    # A larger output layer than DCGAN's N(0, 0.02) init, so the images span [-1, 1] rather than about 0.
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v * 40.0 if path[0].key == "to_rgb" else v, variables["params"])
    variables = {**variables, "params": params}
    save_model_bundle(root / "dcgan", "dcgan_generator", {**DCGAN, "upsample": upsample}, variables)
    return {"dcgan": root / "dcgan", "stylegan2": teacher, "classifier": judge}


def reference(name: str, bundle: pathlib.Path, inputs: list[np.ndarray]) -> np.ndarray:
    """What the model in `bundle` computes on `inputs`, straight from Flax (StyleGAN2: constant noise)."""
    from kdjax.models.bundles import load_model

    model, variables, _ = load_model(bundle)
    if name == "stylegan2":
        out = model.apply(variables, inputs[0], noise_mode="const")
    elif name == "dcgan":
        out = model.apply(variables, inputs[0], inputs[1], train=False)
    else:
        out = model.apply(variables, inputs[0], train=False)
    return np.asarray(out)


def inputs_for(name: str, batch: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    if name == "classifier":
        return [rng.uniform(-1, 1, (batch, *CLASSIFIER_SHAPE)).astype(np.float32)]
    z_dim = DCGAN["z_dim"] if name == "dcgan" else 16
    z = [rng.standard_normal((batch, z_dim)).astype(np.float32)]
    return z + ([rng.integers(0, DCGAN["num_classes"], batch).astype(np.int32)] if name == "dcgan" else [])


def check_parity(runner, name: str, bundle: pathlib.Path, batches=(1, 8), seed: int = 0) -> None:
    """The exported model equals Flax on fresh inputs: generators (outputs in [-1, 1]) to 1e-5 absolute,
    the classifier's logits to 1e-5 relative to their scale."""
    for b in batches:
        inputs = inputs_for(name, b, seed + b)
        want = reference(name, bundle, inputs)
        got = runner(*inputs)
        assert got.shape == want.shape, (got.shape, want.shape)
        scale = 1.0 if name != "classifier" else max(1.0, float(np.abs(want).max()))
        assert np.abs(got - want).max() <= 1e-5 * scale, (name, b, np.abs(got - want).max())
        assert np.std(want) > 1e-3  # a non-trivial output (a constant would match too easily)
