"""The hint filters' image convention: float32 NHWC in [0, 1] (uint8 input is divided by 255)."""

from __future__ import annotations

import numpy as np


def as_float_images(images) -> np.ndarray:
    """(B, H, W, C) or (H, W, C) uint8 / float images -> float32 (B, H, W, C) in [0, 1]."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected images shaped (B, H, W, C) or (H, W, C), got {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1], got {x.dtype}")
    return x.astype(np.float32)
