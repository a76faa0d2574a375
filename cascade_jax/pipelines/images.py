"""Image conversions at the pipeline's edges (PIL / uint8 arrays <-> model inputs and outputs)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from PIL import Image

from cascade_jax.data.clip_preprocess import preprocess_images
from cascade_jax.pipelines.sizes import SIZE_MULTIPLE

# torchvision's ImageNet normalisation, which the official EfficientNet preprocessing uses.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def to_uint8(images) -> np.ndarray:
    """Model output in [0, 1] (B, H, W, 3) -> uint8, clamped as the official code does."""
    return np.asarray(jnp.round(jnp.clip(images.astype(jnp.float32), 0, 1) * 255)).astype(np.uint8)


def as_uint8_batch(images) -> np.ndarray:
    """A PIL image, a list of them, or uint8 arrays (H, W, 3)/(B, H, W, 3) -> (B, H, W, 3) uint8."""
    if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
        images = [images]
    arrays = [np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else np.asarray(im) for im in images]
    if not arrays:
        raise ValueError("no images given")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images in one call must share a size, got {sorted(shapes)}")
    batch = np.stack(arrays)
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images (H, W, 3), got {batch.dtype} {batch.shape[1:]}")
    return batch


def round_size(side: int) -> int:
    """The output side used for an input image side (down to a multiple of 8)."""
    return max(SIZE_MULTIPLE, side // SIZE_MULTIPLE * SIZE_MULTIPLE)


def effnet_pixels(images, size: tuple[int, int]) -> np.ndarray:
    """uint8 images -> ImageNet-normalised float32 NHWC at ``size`` (bilinear, antialiased)."""
    batch = as_uint8_batch(images)
    h, w = size
    resized = [np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR)) for im in batch]
    return ((np.stack(resized).astype(np.float32) / 255.0) - IMAGENET_MEAN) / IMAGENET_STD


def clip_pixels(images) -> np.ndarray:
    """uint8 images -> CLIP-L pixel values (B, 224, 224, 3), as CLIPImageProcessor makes them."""
    return preprocess_images(list(as_uint8_batch(images)))
