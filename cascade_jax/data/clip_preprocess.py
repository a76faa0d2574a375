"""CLIP image preprocessing, equal to transformers' ``CLIPImageProcessor`` on its PIL path.

Shorter side to 224 with PIL bicubic (the longer side ``int(224 * long / short)``), centre crop
224x224 (top/left offset ``(size - 224) // 2``), scale by 1/255 (in float64, then float32),
normalise with OpenAI CLIP's mean/std (in float32). Images with an alpha channel are composited
onto white first, as transformers does. PIL and numpy only: no torch at run time.

Output is NHWC float32, the layout :class:`cascade_jax.models.clip.CLIPVisionEncoder` takes.
transformers 5.x calls this backend ``CLIPImageProcessorPil``; its default ``CLIPImageProcessor``
(torchvision backend) and the official Stable Cascade code (torchvision ``Resize`` with
antialias on a float tensor) resize slightly differently (the former by at most 2/255 on a
few pixels of the test images).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image) -> Image.Image:
    """A PIL RGB image from a PIL image or a uint8 array (H, W), (H, W, 1|3|4); alpha over white."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image array has dtype {array.dtype}; pass uint8 (H, W, C) pixels or a PIL image")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array has shape {array.shape}; expected (H, W), or (H, W, C) with C in 1, 3, 4")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:  # transformers' numpy compositing: round(alpha * rgb + (1 - alpha) * 255)
        alpha = array[..., 3:4] / 255
        array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def resize_shortest_edge(image: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_height, new_width = (new_long, new_short) if width <= height else (new_short, new_long)
    return image.resize((new_width, new_height), resample=resample)


def center_crop(array: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """transformers' centre crop of an (H, W, C) array, zero-padding when it is too small."""
    height, width = array.shape[:2]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return array[top:top + crop_height, left:left + crop_width]
    new_height, new_width = max(crop_height, height), max(crop_width, width)
    padded = np.zeros((new_height, new_width) + array.shape[2:], array.dtype)
    top_pad, left_pad = -(-(new_height - height) // 2), -(-(new_width - width) // 2)
    padded[top_pad:top_pad + height, left_pad:left_pad + width] = array
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top):min(new_height, top + crop_height), max(0, left):min(new_width, left + crop_width)]


def preprocess_image(image, size: int = 224, crop_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """One image (PIL or uint8 array) -> CLIP pixel values, float32 (crop_size, crop_size, 3)."""
    resized = np.asarray(resize_shortest_edge(to_rgb(image), size))
    cropped = center_crop(resized, crop_size, crop_size)
    scaled = (cropped.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preprocess_images(images, size: int = 224, crop_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """A list of images (PIL or uint8 arrays, any sizes) -> NHWC float32 (B, crop_size, crop_size, 3)."""
    if isinstance(images, (Image.Image, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
        images = [images]
    return np.stack([preprocess_image(im, size, crop_size, mean, std) for im in images])
