"""Super-resolution hints (official ``SREffnetFilter``): EfficientNet latents of a low-resolution
image, nearest-upsampled 2×, 16 channels, for the ``large`` bottleneck.

Training makes the low-resolution image itself (nearest downscale by 0.5 of the training image);
at inference the user's image *is* the low-resolution one, and the output is twice its size
(the official notebook encodes it as is and upsamples the latents 2×).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from cascade_jax.data.hints.images import as_float_images
from cascade_jax.data.hints.resize import scale_nearest

SUPER_RESOLUTION_CHANNELS = 16
SCALE_FACTOR = 0.5

# torchvision's ImageNet normalisation (the official EfficientNet preprocessing).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def super_resolution_hint(images, effnet_encode: Callable, *, downscale: bool = True,
                          scale_factor: float = SCALE_FACTOR) -> tuple[np.ndarray, np.ndarray]:
    """``(hint (B, ⌈h/32⌉·2, ⌈w/32⌉·2, 16), preview (B, h·2, w·2, 3))`` where h, w is the low-resolution size.

    ``effnet_encode`` maps ImageNet-normalised NHWC pixels to EfficientNet latents (a jitted
    ``EfficientNetEncoder``). ``downscale=True`` (training) first makes the low-resolution image
    with a nearest downscale by ``scale_factor``; ``False`` (inference) takes ``images`` as it is.
    """
    x = as_float_images(images)
    low = scale_nearest(x, scale_factor) if downscale else x
    latents = np.asarray(effnet_encode((low - IMAGENET_MEAN) / IMAGENET_STD), np.float32)
    if latents.ndim != 4 or latents.shape[-1] != SUPER_RESOLUTION_CHANNELS:
        raise ValueError(f"effnet_encode returned {latents.shape}; expected (B, h, w, 16) EfficientNet latents")
    return scale_nearest(latents, 1 / scale_factor), scale_nearest(low, 1 / scale_factor)
