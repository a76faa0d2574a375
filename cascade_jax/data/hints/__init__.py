"""ControlNet hint filters (data-side; the models never import these).

Every filter takes float32 NHWC images in [0, 1] (or uint8) and returns the hint the released
ControlNet of that task was trained on, plus a preview where the official filter makes one.
"""

from cascade_jax.data.hints.canny import CANNY_CHANNELS, canny_hint
from cascade_jax.data.hints.identity import IDENTITY_CHANNELS, detect_faces, identity_hint
from cascade_jax.data.hints.inpainting import (INPAINTING_CHANNELS, inpainting_hint, random_shape_masks,
                                               saliency_mask)
from cascade_jax.data.hints.super_resolution import SUPER_RESOLUTION_CHANNELS, super_resolution_hint

# control name -> channels of its hint (the ControlNet's c_in)
HINT_CHANNELS = {"canny": CANNY_CHANNELS, "inpainting": INPAINTING_CHANNELS,
                 "super_resolution": SUPER_RESOLUTION_CHANNELS, "identity": IDENTITY_CHANNELS}

__all__ = ["HINT_CHANNELS", "canny_hint", "inpainting_hint", "saliency_mask", "random_shape_masks",
           "super_resolution_hint", "identity_hint", "detect_faces"]
