"""Synthetic degradations for image-to-image tasks: the model input made from a clean image.

Every function takes float images (B, H, W, C) in [-1, 1] (the kdjax convention) and returns float32; every
random choice comes from an explicit `np.random.Generator`. Pure numpy, with PIL where PIL is the natural
implementation (drawing strokes, JPEG coding).

- super-resolution: `downsample` (bicubic with antialiasing, PIL's kernel) and `upsample_bicubic` (the
  "bicubic" baseline);
- inpainting: `box_mask`, `stroke_mask` (1 = missing), `apply_mask`, `inpainting_input` (image + mask channel);
- enhancement: `gaussian_noise`, `gaussian_blur`, `jpeg`.

`DEGRADATIONS` names them for a config (`config.degradation.name` and its parameters): `check_degradation`
validates a name and its parameters before any compute, `degrade` applies one.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SCALES = (2, 3, 4)  # super-resolution factors


# ----------------------------------------------------------------------------------------- resizing
def _keys_cubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel: (a+2)|t|^3 - (a+3)|t|^2 + 1 on |t| < 1,
    a(|t|^3 - 5|t|^2 + 8|t| - 4) on 1 <= |t| < 2, else 0."""
    t = np.abs(t)
    inner = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    outer = (((t - 5.0) * t + 8.0) * t - 4.0) * a
    return np.where(t < 1.0, inner, np.where(t < 2.0, outer, 0.0))


def bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """The (out_size, in_size) matrix of PIL's bicubic resampling along one axis (Pillow's Resample.c).

    Output pixel i has centre c_i = (i + 0.5) s in input coordinates, s = in_size / out_size; input pixel j
    gets the weight K((j + 0.5 - c_i) / f), K the Keys cubic with a = -0.5 and f = max(s, 1): when shrinking
    the kernel is stretched by the factor (support 2 s, the antialiasing). Input pixels outside the image
    are dropped and each row is renormalised to sum 1 (PIL's border handling). MATLAB's `imresize` uses the
    same kernel and centres but mirrors the image at its borders instead.
    """
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    centres = (np.arange(out_size) + 0.5) * scale
    w = _keys_cubic((np.arange(in_size)[None, :] + 0.5 - centres[:, None]) / stretch)
    return w / w.sum(axis=1, keepdims=True)


def resize_bicubic(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, H, W, C) -> (B, height, width, C) by separable bicubic resampling (`bicubic_weights`), clipped to
    [-1, 1] (bicubic overshoots at edges; PIL clips to [0, 255] likewise). Computed in float64, without the
    8-bit intermediate image PIL rounds to between its horizontal and vertical passes."""
    x = np.asarray(x, np.float64)
    out = np.einsum("oh,bhwc->bowc", bicubic_weights(x.shape[1], height), x)
    out = np.einsum("pw,bowc->bopc", bicubic_weights(x.shape[2], width), out)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def downsample(x: np.ndarray, scale: int) -> np.ndarray:
    """The low-resolution image of super-resolution: (B, H, W, C) -> (B, H/scale, W/scale, C), bicubic with
    antialiasing, as PIL's `Image.resize(..., Image.BICUBIC)` (see `bicubic_weights`)."""
    _, h, w, _ = x.shape
    if h % scale or w % scale:
        raise ValueError(f"downsample: scale {scale} does not divide the image size {h} x {w}.")
    return resize_bicubic(x, h // scale, w // scale)


def upsample_bicubic(x: np.ndarray, scale: int) -> np.ndarray:
    """The "bicubic" baseline of super-resolution: (B, h, w, C) -> (B, h*scale, w*scale, C), PIL's bicubic."""
    _, h, w, _ = x.shape
    return resize_bicubic(x, h * scale, w * scale)


# ----------------------------------------------------------------------------------------- inpainting masks
def box_mask(shape: tuple[int, int, int], rng: np.random.Generator, num_boxes: int = 1,
             min_size: float = 0.25, max_size: float = 0.5) -> np.ndarray:
    """(B, H, W, 1) float32 masks of `num_boxes` random rectangles each (1 = missing).

    Each rectangle's height and width are uniform integers in [round(min_size * side), round(max_size * side)]
    and its position uniform over the places where it fits; one box covers between min_size^2 and
    max_size^2 of the image (up to rounding), overlapping boxes less than their sum.
    """
    b, h, w = shape
    mask = np.zeros((b, h, w, 1), np.float32)
    for i in range(b):
        for _ in range(num_boxes):
            bh = int(rng.integers(max(1, round(min_size * h)), max(1, round(max_size * h)) + 1))
            bw = int(rng.integers(max(1, round(min_size * w)), max(1, round(max_size * w)) + 1))
            top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            mask[i, top:top + bh, left:left + bw] = 1.0
    return mask


def _one_stroke_mask(h: int, w: int, rng: np.random.Generator, num_strokes: int, max_vertices: int,
                     max_length: float, min_width: float, max_width: float) -> np.ndarray:
    """One (H, W) free-form mask drawn with PIL (DeepFill v2's algorithm; see `stroke_mask`)."""
    side = min(h, w)
    image = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, num_strokes + 1))):
        x0, y0 = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        for v in range(int(rng.integers(1, max_vertices + 1))):
            angle = float(rng.uniform(0, 2 * math.pi))
            length = float(rng.uniform(0, max_length * side))
            width = max(1, round(float(rng.uniform(min_width, max_width)) * side))
            x1 = float(np.clip(x0 + length * math.sin(angle), 0, w - 1))
            y1 = float(np.clip(y0 + length * math.cos(angle), 0, h - 1))
            draw.line([(x0, y0), (x1, y1)], fill=255, width=width)
            r = width / 2  # round joints, as DeepFill's cv2.circle at every vertex
            draw.ellipse([x1 - r, y1 - r, x1 + r, y1 + r], fill=255)
            if v == 0:
                draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=255)
            x0, y0 = x1, y1
    mask = np.asarray(image) > 0
    if rng.uniform() > 0.5:
        mask = mask[:, ::-1]
    if rng.uniform() > 0.5:
        mask = mask[::-1, :]
    return mask


def stroke_mask(shape: tuple[int, int, int], rng: np.random.Generator, num_strokes: int = 4,
                max_vertices: int = 8, max_length: float = 0.4, min_width: float = 0.05,
                max_width: float = 0.15) -> np.ndarray:
    """(B, H, W, 1) float32 free-form masks (1 = missing), the random strokes of DeepFill v2 (Yu et al. 2019).

    Per image: 1..num_strokes strokes, each a random walk from a uniform start point through
    1..max_vertices segments, each segment of uniform direction, length uniform in [0, max_length * side]
    and brush width uniform in [min_width, max_width] * side (side = min(H, W)), drawn as a thick line with
    round joints; end points are clipped to the image; then a random left-right and up-down flip. With the
    defaults a 64 x 64 mask covers 18% of the image on average (5th-95th percentile 4%-35%, measured).
    """
    b, h, w = shape
    masks = [_one_stroke_mask(h, w, rng, num_strokes, max_vertices, max_length, min_width, max_width)
             for _ in range(b)]
    return np.stack(masks)[..., None].astype(np.float32)


def apply_mask(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """x (1 - mask): missing pixels (mask 1) become 0, mid-grey in [-1, 1]."""
    return (np.asarray(x, np.float32) * (1.0 - mask)).astype(np.float32)


def inpainting_input(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The inpainting model's input: the masked image with the mask as one more channel, (B, H, W, C + 1)."""
    return np.concatenate([apply_mask(x, mask), np.asarray(mask, np.float32)], axis=-1)


# ----------------------------------------------------------------------------------------- enhancement
def gaussian_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """x + n, n ~ N(0, (2 sigma / 255)^2) per pixel and channel, clipped to [-1, 1]: `sigma` in grey levels
    of [0, 255] images (the denoising literature's sigma = 15, 25, 50), scaled to the [-1, 1] range."""
    noise = rng.standard_normal(np.shape(x)) * (2.0 * sigma / 255.0)
    return np.clip(np.asarray(x, np.float64) + noise, -1.0, 1.0).astype(np.float32)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over H and W: taps exp(-t^2 / (2 sigma^2)), t = -r..r, r = int(4 sigma + 0.5),
    normalised to sum 1, with the image mirrored at its borders (d c b a | a b c d): the same as
    `scipy.ndimage.gaussian_filter(x, (0, sigma, sigma, 0))` (truncate 4, mode 'reflect')."""
    radius = int(4.0 * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (t / sigma) ** 2)
    taps /= taps.sum()
    out = np.asarray(x, np.float64)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        n = out.shape[axis]
        out = sum(taps[k] * np.take(padded, np.arange(k, k + n), axis=axis) for k in range(2 * radius + 1))
    return out.astype(np.float32)


def jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    """JPEG coding artefacts: each image rounded to uint8, encoded by PIL at `quality` (1..100, PIL's default
    4:2:0 chroma subsampling for RGB) in memory, decoded, mapped back to [-1, 1]."""
    x = np.asarray(x)
    out = np.empty(x.shape, np.float32)
    for i, image in enumerate(x):
        pixels = np.clip(np.round((image + 1.0) * 127.5), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), np.float32)
        out[i] = (decoded.reshape(image.shape) / 127.5 - 1.0)
    return out


# ----------------------------------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class Degradation:
    """A named degradation: `apply(x, rng, **params)` -> the model input; `defaults` its parameters;
    `check(params, sizes)` returns the problems of a parameter set for images of side lengths `sizes`."""

    apply: Callable[..., np.ndarray]
    defaults: Mapping[str, Any]
    check: Callable[[Mapping[str, Any], tuple[int, ...]], list[str]]


def _check_scale(p: Mapping[str, Any], sizes: tuple[int, ...]) -> list[str]:
    if p["scale"] not in SCALES:
        return [f"config.degradation.scale={p['scale']!r} is not a super-resolution factor; valid: {list(SCALES)}"]
    bad = [s for s in sizes if s % p["scale"]]
    if not bad:
        return []
    return [(f"config.degradation.scale={p['scale']} does not divide the crop size {bad[0]}; use a crop size "
             f"that is a multiple of {p['scale']}")]


def _check_box(p: Mapping[str, Any], sizes: tuple[int, ...]) -> list[str]:
    out = [] if isinstance(p["num_boxes"], int) and p["num_boxes"] >= 1 else [
        f"config.degradation.num_boxes={p['num_boxes']!r} must be an integer >= 1"]
    if not 0.0 < p["min_size"] <= p["max_size"] <= 1.0:
        out.append(f"config.degradation.min_size={p['min_size']!r}, max_size={p['max_size']!r} must satisfy "
                   "0 < min_size <= max_size <= 1 (fractions of the image side)")
    return out


def _check_strokes(p: Mapping[str, Any], sizes: tuple[int, ...]) -> list[str]:
    out = [f"config.degradation.{k}={p[k]!r} must be an integer >= 1" for k in ("num_strokes", "max_vertices")
           if not (isinstance(p[k], int) and p[k] >= 1)]
    if not 0.0 < p["max_length"] <= 1.0:
        out.append(f"config.degradation.max_length={p['max_length']!r} must be in (0, 1] (a fraction of the side)")
    if not 0.0 < p["min_width"] <= p["max_width"] <= 1.0:
        out.append(f"config.degradation.min_width={p['min_width']!r}, max_width={p['max_width']!r} must "
                   "satisfy 0 < min_width <= max_width <= 1 (fractions of the side)")
    return out


def _check_sigma(p: Mapping[str, Any], sizes: tuple[int, ...]) -> list[str]:
    ok = isinstance(p["sigma"], (int, float)) and 0.0 < p["sigma"] <= 255.0
    return [] if ok else [f"config.degradation.sigma={p['sigma']!r} must be in (0, 255] (grey levels)"]


def _check_blur(p: Mapping[str, Any], sizes: tuple[int, ...]) -> list[str]:
    ok = isinstance(p["sigma"], (int, float)) and p["sigma"] > 0.0
    return [] if ok else [f"config.degradation.sigma={p['sigma']!r} must be a positive number of pixels"]


def _check_quality(p: Mapping[str, Any], sizes: tuple[int, ...]) -> list[str]:
    ok = isinstance(p["quality"], int) and 1 <= p["quality"] <= 100
    return [] if ok else [f"config.degradation.quality={p['quality']!r} must be an integer in [1, 100]"]


def _keyword_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """The parameters of `fn` that have defaults, with them (the mask functions' tunable settings)."""
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


DEGRADATIONS: dict[str, Degradation] = {
    "downsample": Degradation(lambda x, rng, scale: downsample(x, scale), {"scale": 4}, _check_scale),
    "box_inpainting": Degradation(
        lambda x, rng, **p: inpainting_input(x, box_mask(x.shape[:3], rng, **p)),
        _keyword_defaults(box_mask), _check_box),
    "stroke_inpainting": Degradation(
        lambda x, rng, **p: inpainting_input(x, stroke_mask(x.shape[:3], rng, **p)),
        _keyword_defaults(stroke_mask), _check_strokes),
    "noise": Degradation(lambda x, rng, sigma: gaussian_noise(x, sigma, rng), {"sigma": 25.0}, _check_sigma),
    "blur": Degradation(lambda x, rng, sigma: gaussian_blur(x, sigma), {"sigma": 1.5}, _check_blur),
    "jpeg": Degradation(lambda x, rng, quality: jpeg(x, quality), {"quality": 30}, _check_quality),
}


def _params(name: str, params: Mapping[str, Any], sizes: tuple[int, ...]) -> dict[str, Any]:
    """The defaults of `name` updated by `params`, validated; raises ValueError naming every problem."""
    if name not in DEGRADATIONS:
        raise ValueError(f"config.degradation.name={name!r} is not a degradation; valid: {sorted(DEGRADATIONS)}.")
    spec = DEGRADATIONS[name]
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        raise ValueError(f"config.degradation: {unknown} are not parameters of {name!r}; valid: "
                         f"{sorted(spec.defaults)}.")
    merged = {**spec.defaults, **params}
    problems = spec.check(merged, sizes)
    if problems:
        raise ValueError(f"config.degradation.name={name!r}: " + "; ".join(problems) + ".")
    return merged


def check_degradation(name: str, params: Mapping[str, Any], crop: int) -> None:
    """Validates a degradation name and its parameters for square crops of side `crop`, before any compute;
    raises ValueError naming the bad field and the valid values."""
    _params(name, params, (crop,))


def degrade(name: str, x: np.ndarray, rng: np.random.Generator, **params: Any) -> np.ndarray:
    """The model input of degradation `name` applied to clean images x (B, H, W, C) in [-1, 1], with
    `params` over its defaults; random choices from `rng`."""
    return DEGRADATIONS[name].apply(x, rng, **_params(name, params, tuple(x.shape[1:3])))
