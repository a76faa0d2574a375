"""Inpainting / outpainting hints (official ``InpaintFilter``): masked image + mask, 4 channels.

The hint is the image with the masked pixels set to 1 (white), followed by the mask
(1 = generate here). Masks come from, in order of preference:

* the user (``inpainting_hint(images, mask)``), e.g. drawn in an editor;
* a saliency network, as the official filter does: ``saliency > threshold`` (threshold drawn
  in [0.04, 0.4] when not given), inverted for outpainting (p 0.4 when not given), nearest-
  upsampled, Gaussian blur of kernel 141, then > 0.5. The official net is ported
  (``cascade_jax.models.saliency``); its weights (the PyTorch pickle
  ``modules/cnet_modules/inpainting/saliency_model.pt`` of the StableCascade repository) are not
  included: re-save them as safetensors and pass ``pipelines.controlnet.saliency_function(path)``
  (or any ``saliency_fn``);
* random shapes (:func:`random_shape_masks`), for training without a saliency net, smoothed and
  inverted the same way.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from cascade_jax.data.hints.images import as_float_images
from cascade_jax.data.hints.resize import gaussian_blur, resize_nearest

INPAINTING_CHANNELS = 4
THRESHOLD_RANGE = (0.04, 0.4)
P_OUTPAINT = 0.4
BLUR_KERNEL = 141
SALIENCY_SHORT_SIDE = 240

SALIENCY_MISSING = (
    "automatic inpainting masks need a saliency network: the official weights are the PyTorch pickle "
    "modules/cnet_modules/inpainting/saliency_model.pt of the StableCascade repository, not included and never "
    "unpickled here. Re-save its state dict as .safetensors and pass saliency_function(path) (--saliency), pass a "
    "mask instead (inpainting_hint(images, mask) / --mask), or any saliency_fn mapping (B, h, w, 3) images in "
    "[0, 1] to (B, h', w', 1) saliency in [0, 1].")


def as_mask(mask, shape: tuple[int, int, int]) -> np.ndarray:
    """A mask (B, H, W), (B, H, W, 1), (H, W) or (H, W, 1/3) of bools/0-1/0-255 -> bool (B, H, W, 1)."""
    m = np.asarray(mask)
    if m.ndim == 2 or (m.ndim == 3 and m.shape[-1] in (1, 3) and m.shape[:2] == tuple(shape[1:3])):
        m = m[None]
    if m.ndim == 4:
        m = m[..., :1] if m.shape[-1] in (1, 3) else m
    elif m.ndim == 3:
        m = m[..., None]
    if m.shape[1:3] != tuple(shape[1:3]) or m.shape[0] not in (1, shape[0]):
        raise ValueError(f"mask of shape {np.shape(mask)} does not fit images of {shape[1]}x{shape[2]} "
                         f"(batch {shape[0]}); give one (H, W) mask or one per image")
    threshold = 127 if m.dtype == np.uint8 else 0.5
    return np.broadcast_to(m > threshold if m.dtype != bool else m, (shape[0], *shape[1:3], 1)).copy()


def inpainting_hint(images, mask) -> np.ndarray:
    """(B, H, W, 4): images with masked pixels set to 1, then the mask as 0/1."""
    x = as_float_images(images)
    m = as_mask(mask, x.shape[:3])
    return np.concatenate([np.where(m, np.float32(1), x), m.astype(np.float32)], axis=-1)


def smooth_mask(mask: np.ndarray, kernel: int = BLUR_KERNEL) -> np.ndarray:
    """The official smoothing of a hard mask: Gaussian blur (kernel 141) then > 0.5."""
    return gaussian_blur(mask.astype(np.float32), kernel) > 0.5


def _outpaint_flags(rng: np.random.Generator, batch: int, outpaint, p_outpaint: float) -> np.ndarray:
    if outpaint is None:
        return rng.random(batch) < p_outpaint
    return np.broadcast_to(np.asarray(outpaint, bool), (batch,))


def saliency_mask(images, saliency_fn: Callable | None, *, threshold: float | None = None, outpaint=None,
                  rng: np.random.Generator | None = None, p_outpaint: float = P_OUTPAINT) -> np.ndarray:
    """The official automatic mask (B, H, W, 1) bool from ``saliency_fn`` (see the module docstring)."""
    if saliency_fn is None:
        raise RuntimeError(SALIENCY_MISSING)
    x = as_float_images(images)
    rng = np.random.default_rng() if rng is None else rng
    threshold = rng.uniform(*THRESHOLD_RANGE) if threshold is None else threshold
    h, w = x.shape[1:3]
    # torchvision resize(x, 240): the short side becomes 240, the long side int(240 * long / short).
    long_side = int(SALIENCY_SHORT_SIDE * max(h, w) / min(h, w))
    small = _resize_antialiased(x, (SALIENCY_SHORT_SIDE, long_side) if h <= w else (long_side, SALIENCY_SHORT_SIDE))
    salient = np.asarray(saliency_fn(small)) > threshold
    flip = _outpaint_flags(rng, x.shape[0], outpaint, p_outpaint)
    salient = np.where(flip[:, None, None, None], ~salient, salient)
    return smooth_mask(resize_nearest(salient.astype(np.float32), (h, w)))


def _resize_antialiased(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    # torchvision resize(antialias=True) ~ PIL's bilinear with support scaling; PIL per channel in float mode.
    from PIL import Image

    out = np.empty((x.shape[0], *size, x.shape[-1]), np.float32)
    for b in range(x.shape[0]):
        for c in range(x.shape[-1]):
            out[b, :, :, c] = np.asarray(Image.fromarray(x[b, :, :, c]).resize(size[::-1], Image.BILINEAR))
    return out


def random_shape_masks(rng: np.random.Generator, batch: int, height: int, width: int, *, max_shapes: int = 4,
                       outpaint=None, p_outpaint: float = P_OUTPAINT, kernel: int = BLUR_KERNEL) -> np.ndarray:
    """Training masks without a saliency net: unions of 1..max_shapes random ellipses and rectangles
    (each 10-60% of a side), inverted for outpainting with p 0.4, smoothed as the official masks."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    masks = np.zeros((batch, height, width, 1), bool)
    for b in range(batch):
        for _ in range(rng.integers(1, max_shapes + 1)):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(0.05, 0.3) * height, rng.uniform(0.05, 0.3) * width
            if rng.random() < 0.5:
                shape = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            else:
                shape = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            masks[b, :, :, 0] |= shape
    flip = _outpaint_flags(rng, batch, outpaint, p_outpaint)
    masks = np.where(flip[:, None, None, None], ~masks, masks)
    return smooth_mask(masks, kernel)
