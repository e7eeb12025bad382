"""The FID InceptionV3 in Flax Linen, and a loader for pytorch-fid's weights file.

The network that standard FID uses (Heusel et al.'s TensorFlow graph `inception-2015-12-05`, as ported by
pytorch-fid): torchvision's Inception3 layout with the FID patches,
- Mixed_5b/c/d (A), Mixed_6b-e (C) and Mixed_7b (E_1): the pool branch averages with
  count_include_pad=False (TensorFlow's average pool ignores the padding);
- Mixed_7c (E_2): the pool branch is a 3x3 max pool (stride 1, pad 1) instead of an average pool;
- BatchNorm eps 1e-3, convolutions without bias, fc with 1008 classes.
Features are the 2048-d global average pool after Mixed_7c.

Input: NHWC images in [-1, 1] (the kdjax convention), resized bilinearly to 299 x 299 (half-pixel
centres, no antialiasing: torch's `interpolate(mode="bilinear", align_corners=False)`). pytorch-fid takes
[0, 1] images, resizes, then maps them to [-1, 1]; resizing commutes with that affine map, so images in
[-1, 1] go in unchanged. (pytorch-fid's FIDs differ slightly from the TensorFlow original's resize.)

Weights: `load_inception_variables(path)` reads pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
(torch needed only for .pth) or an .npz with the same keys. The Flax modules carry the state-dict names
(`Mixed_5b.branch1x1.conv.weight` is params/Mixed_5b/branch1x1/conv/kernel), so every name maps
mechanically; missing, extra or mis-shaped keys fail loudly, listed by name.

Precision: on GPU, XLA may run float32 convolutions in TF32 (as cuDNN does for PyTorch by default); wrap the
call in `jax.default_matmul_precision("highest")` for full float32 features.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU; torch padding semantics."""
    features: int
    kernel_size: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3, stride 1, pad 1, padding excluded from the average (the FID patch)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    """Mixed_5b/c/d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1, 64+64+96+pool_features channels."""
    pool_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda name, f, k, p=0: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)
        b1 = conv("branch1x1", 64, 1)(x)
        b5 = conv("branch5x5_2", 64, 5, 2)(conv("branch5x5_1", 48, 1)(x))
        b3 = conv("branch3x3dbl_1", 64, 1)(x)
        b3 = conv("branch3x3dbl_3", 96, 3, 1)(conv("branch3x3dbl_2", 96, 3, 1)(b3))
        bp = conv("branch_pool", self.pool_features, 1)(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda name, f, k, s=1, p=0: BasicConv2d(f, k, s, p, dtype=self.dtype, name=name)
        b3 = conv("branch3x3", 384, 3, 2)(x)
        bd = conv("branch3x3dbl_1", 64, 1)(x)
        bd = conv("branch3x3dbl_3", 96, 3, 2)(conv("branch3x3dbl_2", 96, 3, 1, 1)(bd))
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b-e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1, 4 x 192 channels."""
    channels_7x7: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda name, f, k, p=0: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)
        c7 = self.channels_7x7
        k17, p17, k71, p71 = (1, 7), (0, 3), (7, 1), (3, 0)
        b1 = conv("branch1x1", 192, 1)(x)
        b7 = conv("branch7x7_1", c7, 1)(x)
        b7 = conv("branch7x7_3", 192, k71, p71)(conv("branch7x7_2", c7, k17, p17)(b7))
        bd = conv("branch7x7dbl_1", c7, 1)(x)
        bd = conv("branch7x7dbl_2", c7, k71, p71)(bd)
        bd = conv("branch7x7dbl_3", c7, k17, p17)(bd)
        bd = conv("branch7x7dbl_4", c7, k71, p71)(bd)
        bd = conv("branch7x7dbl_5", 192, k17, p17)(bd)
        bp = conv("branch_pool", 192, 1)(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda name, f, k, s=1, p=0: BasicConv2d(f, k, s, p, dtype=self.dtype, name=name)
        b3 = conv("branch3x3_2", 320, 3, 2)(conv("branch3x3_1", 192, 1)(x))
        b7 = conv("branch7x7x3_1", 192, 1)(x)
        b7 = conv("branch7x7x3_2", 192, (1, 7), 1, (0, 3))(b7)
        b7 = conv("branch7x7x3_3", 192, (7, 1), 1, (3, 0))(b7)
        b7 = conv("branch7x7x3_4", 192, 3, 2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1; 320+768+768+192 channels.

    `pool="avg"` (FIDInceptionE_1, count_include_pad=False) or `"max"` (FIDInceptionE_2).
    """
    pool: str = "avg"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda name, f, k, p=0: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)
        b1 = conv("branch1x1", 320, 1)(x)
        b3 = conv("branch3x3_1", 384, 1)(x)
        b3 = jnp.concatenate([conv("branch3x3_2a", 384, (1, 3), (0, 1))(b3),
                              conv("branch3x3_2b", 384, (3, 1), (1, 0))(b3)], axis=-1)
        bd = conv("branch3x3dbl_2", 384, 3, 1)(conv("branch3x3dbl_1", 448, 1)(x))
        bd = jnp.concatenate([conv("branch3x3dbl_3a", 384, (1, 3), (0, 1))(bd),
                              conv("branch3x3dbl_3b", 384, (3, 1), (1, 0))(bd)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        elif self.pool == "max":
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}.")
        bp = conv("branch_pool", 192, 1)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """FID InceptionV3. `__call__(x, return_logits=False)`: x (B, H, W, 3) in [-1, 1] (grayscale (B, H, W, 1)
    is repeated to RGB) -> pool features (B, 2048), or `(features, logits (B, 1008))`. Inference only
    (BatchNorm uses running statistics)."""
    resize_input: bool = True
    num_classes: int = 1008
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, return_logits: bool = False):
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"Expected (B, H, W, 3) or grayscale (B, H, W, 1) images, got {x.shape}.")
        x = jnp.broadcast_to(x, x.shape[:3] + (3,)).astype(self.dtype)  # grayscale -> RGB, as usual for FID
        if self.resize_input and x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
            x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)
        conv = lambda name, f, k, s=1, p=0: BasicConv2d(f, k, s, p, dtype=self.dtype, name=name)
        x = conv("Conv2d_1a_3x3", 32, 3, 2)(x)
        x = conv("Conv2d_2a_3x3", 32, 3)(x)
        x = conv("Conv2d_2b_3x3", 64, 3, 1, 1)(x)
        x = _max_pool_3x3_s2(x)
        x = conv("Conv2d_3b_1x1", 80, 1)(x)
        x = conv("Conv2d_4a_3x3", 192, 3)(x)
        x = _max_pool_3x3_s2(x)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, dtype=self.dtype, name=name)(x)
        x = InceptionB(dtype=self.dtype, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, dtype=self.dtype, name=name)(x)
        x = InceptionD(dtype=self.dtype, name="Mixed_7a")(x)
        x = InceptionE("avg", dtype=self.dtype, name="Mixed_7b")(x)
        x = InceptionE("max", dtype=self.dtype, name="Mixed_7c")(x)
        feats = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        # fc is part of the weights file; XLA drops it when only the features are used.
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(feats)
        return (feats, logits) if return_logits else feats


# Flax (collection, leaf) -> torch state-dict suffix, and how the array is laid out in torch.
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_IGNORED_SUFFIXES = ("num_batches_tracked",)  # BatchNorm step counters: not weights


def _to_flax_layout(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:  # conv (O, I, kh, kw) -> (kh, kw, I, O)
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 2:  # linear (out, in) -> (in, out)
        return value.T
    return value


def variable_shapes(model: InceptionV3 | None = None) -> dict[str, Any]:
    """Shapes of the model's variables ({'params': ..., 'batch_stats': ...}), without computing anything."""
    model = model if model is not None else InceptionV3()
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)


def torch_names(model: InceptionV3 | None = None) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """State-dict name -> (Flax variable path incl. collection, Flax shape), for every variable."""
    names = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variable_shapes(model))[0]:
        keys = tuple(k.key for k in path)
        collection, *modules, leaf_name = keys
        names[".".join([*modules, _LEAF_TO_TORCH[(collection, leaf_name)]])] = (keys, tuple(leaf.shape))
    return names


def convert_state_dict(state_dict: Mapping[str, Any], model: InceptionV3 | None = None) -> dict[str, Any]:
    """pytorch-fid state dict (name -> array) -> Flax variables {'params', 'batch_stats'} (float32).

    Raises:
      ValueError: naming every missing, unexpected or mis-shaped key.
    """
    expected = torch_names(model)
    given = {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
    missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {missing}")
    if extra:
        problems.append(f"{len(extra)} unexpected: {extra}")
    variables: dict[str, Any] = {}
    for name in sorted(set(expected) & set(given)):
        keys, flax_shape = expected[name]
        value = _to_flax_layout(given[name], keys[-1])
        if value.shape != flax_shape:
            problems.append(f"{name}: shape {given[name].shape} does not give {flax_shape}")
            continue
        node = variables
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = jnp.asarray(value, jnp.float32)
    if problems:
        raise ValueError("Inception weights do not match the FID InceptionV3: " + "; ".join(problems))
    return variables


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Reads a state dict from a torch .pth/.pt file (imports torch) or an .npz with the same keys."""
    path = pathlib.Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    if path.suffix in (".pth", ".pt"):
        import torch  # optional dependency, only for this format

        state = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v.detach().cpu().numpy() for k, v in state.items()}
    raise ValueError(f"Unknown weights format {path.suffix!r} of {path}; expected .pth, .pt or .npz.")


def load_inception_variables(path: str | pathlib.Path, model: InceptionV3 | None = None) -> dict[str, Any]:
    """Flax variables of the FID InceptionV3 from pytorch-fid's weights file (.pth) or an .npz copy."""
    return convert_state_dict(load_state_dict(path), model)

