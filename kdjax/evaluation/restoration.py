"""Image-restoration metrics as the super-resolution literature reports them: PSNR and SSIM on the Y channel,
with a border of `scale` pixels shaved off (BasicSR's `calculate_psnr` / `calculate_ssim` with
`test_y_channel=True, crop_border=scale`; EDSR, RCAN, SwinIR, ... report these numbers).

Images come in as NHWC floats in [-1, 1] (the kdjax convention) and are first quantised to grey levels
0..255 (rounded, clipped), as a restored image is saved and measured as an 8-bit picture. PSNR and SSIM are
`kdjax.evaluation.fidelity.psnr` / `ssim` on the result with data range 255: SSIM's constants are then
(0.01 * 255)^2 and (0.03 * 255)^2 with an 11 x 11 Gaussian window of sigma 1.5 over the valid positions,
BasicSR's settings.
"""

from __future__ import annotations

import numpy as np

from kdjax.evaluation import fidelity

# ITU-R BT.601 luma for studio-swing YCbCr, as MATLAB's rgb2ycbcr: Y in [16, 235] for R, G, B in [0, 1].
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0


def rgb_to_y(x: np.ndarray) -> np.ndarray:
    """Y channel of RGB images (..., 3) with values in [0, 255] -> (..., 1) in [16, 235], not rounded.

    Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 for R, G, B in [0, 255], i.e. MATLAB's `rgb2ycbcr`
    (ITU-R BT.601, studio swing), BasicSR's `rgb2ycbcr(y_only=True)` (its `bgr2ycbcr` on BGR order) and
    scikit-image's `rgb2ycbcr(...)[..., 0]`. Not the full-range JPEG/PIL luma 0.299 R + 0.587 G + 0.114 B.
    """
    x = np.asarray(x, np.float64)
    r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
    return _Y_OFFSET + (_Y_WEIGHTS[0] * r + _Y_WEIGHTS[1] * g + _Y_WEIGHTS[2] * b) / 255.0


def shave(x: np.ndarray, n: int) -> np.ndarray:
    """x[:, n:H-n, n:W-n, :]: drops an n-pixel border of NHWC images (n = 0 keeps them whole)."""
    return _crop_border(x, n)


def _crop_border(x: np.ndarray, n: int) -> np.ndarray:
    """`shave`, under a name `restoration_metrics`' argument `shave` does not hide."""
    h, w = x.shape[1:3]
    if 2 * n >= min(h, w):
        raise ValueError(f"shave {n} leaves nothing of a {h} x {w} image.")
    return x[:, n:h - n, n:w - n, :]


def to_grey_levels(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> grey levels round((x + 1) 127.5) clipped to [0, 255], as float64."""
    return np.clip(np.round((np.asarray(x, np.float64) + 1.0) * 127.5), 0.0, 255.0)


def restoration_metrics(pred: np.ndarray, target: np.ndarray, shave: int = 0,
                        y_channel: bool = True) -> dict[str, np.ndarray]:
    """PSNR (dB) and SSIM per image, {"psnr": (B,), "ssim": (B,)}, of restored images against the originals.

    Args:
      pred, target: (B, H, W, C) images in [-1, 1], C = 1 or 3.
      shave: pixels dropped at every side before measuring (the super-resolution scale, by custom).
      y_channel: measure RGB images on their Y channel (`rgb_to_y`); grey images are measured as they are.

    The literature averages the per-image numbers over a test set.
    """
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"Expected two NHWC batches of equal shape, got {pred.shape} and {target.shape}.")
    a, b = to_grey_levels(pred), to_grey_levels(target)
    if y_channel and a.shape[-1] == 3:
        a, b = rgb_to_y(a), rgb_to_y(b)
    a, b = (_crop_border(t, shave).astype(np.float32) for t in (a, b))
    return {"psnr": np.asarray(fidelity.psnr(a, b, value_range=(0.0, 255.0))),
            "ssim": np.asarray(fidelity.ssim(a, b, value_range=(0.0, 255.0)))}
