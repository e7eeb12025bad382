"""Image conversions every layer shares: model range <-> uint8, grids of samples, PNG files."""

from __future__ import annotations

import math
import pathlib
from typing import Any

import numpy as np
from PIL import Image


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: Any) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255] (clipped), for image summaries and PNGs."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*H, columns*W, C) uint8 grid, 1-pixel gaps."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + 1) - 1, columns * (w + 1) - 1, c), np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, columns)
        grid[r * (h + 1): r * (h + 1) + h, q * (w + 1): q * (w + 1) + w] = image
    return grid


def save_png(path: str | pathlib.Path, image: np.ndarray) -> None:
    """Writes one HWC uint8 image (C = 1 or 3) as PNG, creating the folder."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
