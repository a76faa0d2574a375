"""PyTorch's resampling, reproduced in numpy for the hint filters (NHWC, float32).

The official filters call ``F.interpolate`` (bilinear with ``align_corners=False`` and no
antialias; nearest with torch's floor index rule) and torchvision's ``gaussian_blur``. A canny
hint truncates ``x·255`` to uint8, so the float32 rounding of the resize decides some pixels:
the bilinear weights and the order of the multiply-adds follow torch's CPU kernel (bit-exact on
the canny path's sizes; on some other widths torch's vectorised loop rounds differently, ≤ 1 ulp).
"""

from __future__ import annotations

import numpy as np


def _bilinear_axis(size_in: int, size_out: int):
    """(i0, i1, w0, w1) per output index: torch's ``area_pixel_compute_source_index`` rule."""
    # torch computes scale·(dst + 0.5) − 0.5 as one fused multiply-add on the float32 scale: the
    # product and the subtraction are exact in float64, then rounded once to float32.
    scale = np.float64(np.float32(size_in / size_out))
    src = ((np.arange(size_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(src.astype(np.int64), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``F.interpolate(x, size, mode='bilinear', align_corners=False)`` on NHWC float32."""
    x = np.asarray(x, np.float32)
    (h, w), (ho, wo) = x.shape[1:3], size
    if (h, w) == (ho, wo):
        return x.copy()
    hi0, hi1, hw0, hw1 = _bilinear_axis(h, ho)
    wi0, wi1, ww0, ww1 = _bilinear_axis(w, wo)
    ww0, ww1 = ww0[None, None, :, None], ww1[None, None, :, None]
    hw0, hw1 = hw0[None, :, None, None], hw1[None, :, None, None]
    top = _lerp_fma(ww0, x[:, hi0][:, :, wi0], ww1, x[:, hi0][:, :, wi1])
    bottom = _lerp_fma(ww0, x[:, hi1][:, :, wi0], ww1, x[:, hi1][:, :, wi1])
    return _lerp_fma(hw0, top, hw1, bottom)


def _lerp_fma(w0, a, w1, b):
    """float32 ``w0·a + w1·b`` rounded as torch's vectorised CPU kernel does: fma(w0, a, round(w1·b))."""
    second = (w1 * b).astype(np.float32)
    return (w0.astype(np.float64) * a + second).astype(np.float32)


def resize_nearest(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``F.interpolate(x, size, mode='nearest')``: source index floor(dst · in/out)."""
    x = np.asarray(x)
    (h, w), (ho, wo) = x.shape[1:3], size
    return x[:, _nearest_index(h, ho, np.float32(h / ho))][:, :, _nearest_index(w, wo, np.float32(w / wo))]


def scale_nearest(x: np.ndarray, factor: float) -> np.ndarray:
    """``F.interpolate(x, scale_factor=factor, mode='nearest')``: size floor(in·factor), index floor(dst / factor)."""
    x = np.asarray(x)
    h, w = x.shape[1:3]
    ho, wo = int(np.floor(h * factor)), int(np.floor(w * factor))
    if ho < 1 or wo < 1:
        raise ValueError(f"scaling a {h}x{w} image by {factor} leaves no pixels")
    scale = np.float32(1 / factor)
    return x[:, _nearest_index(h, ho, scale)][:, :, _nearest_index(w, wo, scale)]


def _nearest_index(size_in: int, size_out: int, scale: np.float32) -> np.ndarray:
    # floor(dst · scale) with the product rounded to float32 first, as torch's kernel computes it.
    product = np.arange(size_out, dtype=np.float32) * scale
    return np.minimum(np.floor(product).astype(np.int64), size_in - 1)


def gaussian_blur(x: np.ndarray, kernel_size: int) -> np.ndarray:
    """torchvision ``gaussian_blur(x, kernel_size)`` on NHWC: its default sigma
    0.3·((k−1)/2 − 1) + 0.8, separable, reflect padding (edge not repeated)."""
    from scipy.ndimage import convolve1d

    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"gaussian_blur: kernel_size must be odd and positive, got {kernel_size}")
    sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8
    half = (kernel_size - 1) / 2
    taps = np.exp(-0.5 * (np.linspace(-half, half, kernel_size) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    x = np.asarray(x, np.float32)
    # scipy's 'mirror' is torch's 'reflect' (the edge sample is not repeated).
    return convolve1d(convolve1d(x, taps, axis=1, mode="mirror"), taps, axis=2, mode="mirror")
