"""Canny edges, the hint of the released ``canny`` ControlNet (official ``CannyFilter``).

Images are resized (bilinear, no antialias) to 224×224, truncated to uint8, passed to
``cv2.Canny(img, 100, 200)`` (OpenCV takes the strongest gradient over the RGB channels), scaled
to [0, 1] and resized back: a soft 1-channel edge map. OpenCV (the headless wheel) is an optional
dependency: ``pip install cascade-jax[controlnet]``.
"""

from __future__ import annotations

import numpy as np

from cascade_jax.data.hints.images import as_float_images
from cascade_jax.data.hints.resize import resize_bilinear

CANNY_CHANNELS = 1


def _cv2():
    try:
        import cv2
    except ImportError as e:
        raise ImportError("the canny hint needs OpenCV: pip install opencv-python-headless "
                          "(or pip install 'cascade-jax[controlnet]')") from e
    return cv2


def canny_hint(images, resize: int | None = 224, low: int = 100, high: int = 200) -> np.ndarray:
    """(B, H, W, 3) images in [0, 1] (or uint8) -> (B, H, W, 1) float32 edge map in [0, 1]."""
    cv2 = _cv2()
    x = as_float_images(images)
    if x.shape[-1] != 3:
        raise ValueError(f"canny_hint expects RGB images, got {x.shape[-1]} channels")
    size = x.shape[1:3]
    small = resize_bilinear(x, (resize, resize)) if resize is not None else x
    # The official ``x.mul(255)...astype(np.uint8)`` truncates (and wraps outside [0, 1]; clip first).
    pixels = (np.clip(small, 0, 1) * np.float32(255)).astype(np.uint8)
    edges = np.stack([cv2.Canny(np.ascontiguousarray(p), low, high) for p in pixels])
    edges = edges[..., None].astype(np.float32) / np.float32(255)
    return resize_bilinear(edges, size) if resize is not None else edges
