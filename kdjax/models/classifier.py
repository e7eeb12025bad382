"""Image classifiers: the classic-KD teacher (a small ResNet) and student (a small CNN).

The same modules serve as the *judge* of generated images: its logits feed the KL term of generator
distillation and its feature maps serve perceptual distances and FID/KID features.

Both return logits, or `(logits, features)` with `return_features=True`, where `features` holds the
NHWC map after each stage (`"stage1"`, `"stage2"`, ...) and the pooled vector `"pool"` (B, D) that
evaluation uses as the embedding.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm, identity or 1x1 projection shortcut."""

    features: int  # output channels
    stride: int  # 1, or 2 to halve the resolution
    dtype: jnp.dtype  # compute dtype
    bn_axis_name: str | None  # cross-device BatchNorm statistics under shard_map

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                         axis_name=self.bn_axis_name, dtype=self.dtype, name=name)
        y = nn.Conv(self.features, (3, 3), self.stride, use_bias=False, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(norm("bn1")(y))
        y = nn.Conv(self.features, (3, 3), 1, use_bias=False, dtype=self.dtype, name="conv2")(y)
        y = norm("bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), self.stride, use_bias=False, dtype=self.dtype,
                        name="proj")(x)
            x = norm("proj_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem, stages of basic blocks (stride 2 between stages), pool, linear."""

    num_classes: int = 10  # output logits
    widths: Sequence[int] = (16, 32, 64)  # channels of each stage
    blocks_per_stage: Sequence[int] = (1, 1, 1)  # basic blocks in each stage
    dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32
    bn_axis_name: str | None = None  # e.g. "data" inside a data-parallel step

    KIND: ClassVar[str] = "classifier"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"num_classes": "num_classes"}  # the input shape sets the rest
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ("bn_axis_name",)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
        if len(self.widths) != len(self.blocks_per_stage):
            raise ValueError(f"ResNet: widths {tuple(self.widths)} and blocks_per_stage "
                             f"{tuple(self.blocks_per_stage)} must have the same length.")
        features = {}
        x = x.astype(self.dtype)
        x = nn.Conv(self.widths[0], (3, 3), use_bias=False, dtype=self.dtype, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.bn_axis_name,
                                 dtype=self.dtype, name="stem_bn")(x))
        for i, (width, blocks) in enumerate(zip(self.widths, self.blocks_per_stage)):
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                x = _BasicBlock(width, stride, self.dtype, self.bn_axis_name, name=f"stage{i + 1}_block{j + 1}")(
                    x, train)
            features[f"stage{i + 1}"] = x
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features["pool"] = pooled
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(pooled)
        return (logits, features) if return_features else logits


class SmallCNN(nn.Module):
    """A plain CNN student: per stage a 3x3 conv + ReLU then 2x2 average pooling; pool, linear."""

    num_classes: int = 10  # output logits
    widths: Sequence[int] = (8, 16)  # channels of each conv stage
    use_batch_norm: bool = False  # BatchNorm after each conv
    dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32
    bn_axis_name: str | None = None  # e.g. "data" inside a data-parallel step

    KIND: ClassVar[str] = "classifier"
    DATA_FIELDS: ClassVar[dict[str, str]] = {"num_classes": "num_classes"}  # the input shape sets the rest
    DATA_PARALLEL_FIELDS: ClassVar[tuple[str, ...]] = ("bn_axis_name",)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
        features = {}
        x = x.astype(self.dtype)
        for i, width in enumerate(self.widths):
            x = nn.Conv(width, (3, 3), use_bias=not self.use_batch_norm, dtype=self.dtype, name=f"conv{i + 1}")(x)
            if self.use_batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.bn_axis_name,
                                 dtype=self.dtype, name=f"bn{i + 1}")(x)
            x = nn.relu(x)
            features[f"stage{i + 1}"] = x
            if i < len(self.widths) - 1:
                x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))  # keywords: jax2onnx patches it so
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features["pool"] = pooled
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(pooled)
        return (logits, features) if return_features else logits
