"""The official GDF training loss and the noise / image helpers the stage tasks share.

``denoising_loss`` is ``train_c.py``/``train_b.py``'s forward pass after conditioning:
``diffuse(x0, shift=1, loss_shift=1)`` on a cosine schedule (VP scaler, epsilon target, noise
condition t), per-sample MSE over the latent, weighted by P2 or the adaptive buckets, averaged.
All diffusion math is float32; the network runs in whatever dtype its parameters have.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cascade_jax.diffusion import GDF, sample_train_t
from cascade_jax.training.task import LossAux

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


OBJECT_DISTANCE = 0.15  # RGB distance in [0, 1] from the image's median colour that marks an object pixel


def make_gdf(adaptive: bool) -> GDF:
    return GDF(loss_weight="adaptive" if adaptive else "p2")


def denoising_loss(apply_fn, x0, t, epsilon, gdf: GDF, loss_state=None, weights=None):
    """(weighted mean loss, LossAux) of ``apply_fn(noised, noise_cond) -> prediction`` on clean ``x0``.

    ``weights`` (B, h, w, 1), mean 1 per sample (``latent_object_weights``), weigh the squared error
    per latent position in the optimised loss; the logged per-sample loss stays the plain MSE."""
    d = gdf.diffuse(x0, epsilon, t, shift=1.0, loss_shift=1.0, loss_state=loss_state)
    pred = apply_fn(d.noised, d.noise_cond).astype(jnp.float32)
    axes = tuple(range(1, x0.ndim))
    squared = jnp.square(pred - d.target)
    per_sample = jnp.mean(squared, axis=axes)
    optimised = per_sample if weights is None else jnp.mean(squared * weights, axis=axes)
    return jnp.mean(optimised * d.loss_weight), LossAux(per_sample, d.logsnr)


OUTLINE_RADIUS = 2  # pixels: an object pixel this close to the background (or the reverse) is on the outline


def outline(far):
    """(B, H, W, 1) bool: the pixels within ``OUTLINE_RADIUS`` of the boundary of the boolean mask ``far``
    (its dilation minus its erosion): where a circle, a square and a triangle of one box differ."""
    mask = far.astype(jnp.float32)
    return _square_max(mask) != -_square_max(-mask)


def _square_max(x):
    """The maximum over the (2 * OUTLINE_RADIUS + 1)-pixel square around each pixel (edges padded with -inf), as a
    row pass then a column pass: the same values as the square window, with 2k instead of k^2 comparisons."""
    size = 2 * OUTLINE_RADIUS + 1
    for window in ((1, size, 1, 1), (1, 1, size, 1)):
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, (1, 1, 1, 1), "SAME")
    return x


def median(x, axis: int):
    """``jnp.median(x, axis)`` of finite float32 values, bit for bit, without sorting: XLA:CPU's sort made the
    median a seventh of the demo Stage B's training step (one core, a 16x128x128x3 batch, side by side in one
    process: 125 ms sorted, 18 ms here). The two middle order statistics are found by bisection on the
    values' order-preserving integer keys, one counting pass per key bit."""
    x = jnp.moveaxis(x.astype(jnp.float32), axis, -1)  # reduce along the contiguous axis
    n = x.shape[-1]
    keys = _sortable_keys(x)
    lo_key = _kth_smallest_key(keys, (n - 1) // 2)
    lo = _float_from_key(lo_key)
    if n % 2:
        return lo[..., 0]
    # the upper middle value: lo again if more than n/2 keys are <= lo, else the next larger key
    not_above = jnp.sum(keys <= lo_key, axis=-1, keepdims=True, dtype=jnp.int32)
    next_key = jnp.min(jnp.where(keys > lo_key, keys, jnp.uint32(0xFFFFFFFF)), axis=-1, keepdims=True)
    hi = jnp.where(not_above > n // 2, lo, _float_from_key(next_key))
    return ((lo + hi) * jnp.float32(0.5))[..., 0]  # jnp.median's "midpoint" formula


def _sortable_keys(x):
    """float32 -> uint32 with the same order: negative values' bits inverted, positive ones' sign bit set."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _float_from_key(key):
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _kth_smallest_key(keys, k: int):
    """The k-th smallest (0-based) key along the last axis, built from the top bit down: a bit stays set while
    at most k keys lie below the candidate."""
    result = jnp.zeros((*keys.shape[:-1], 1), jnp.uint32)
    for bit in range(31, -1, -1):
        candidate = result | jnp.uint32(1 << bit)
        below = jnp.sum(keys < candidate, axis=-1, keepdims=True, dtype=jnp.int32)
        result = jnp.where(below <= k, candidate, result)
    return result


def object_weights(target, object_weight: float, edge_weight: float = 1.0):
    """(B, H, W, 1) pixel weights: ``object_weight`` where the target is far from its image's median colour
    (the background, for a small object on a flat ground), ``edge_weight`` on that object's ``outline``
    (when not 1), 1 elsewhere; normalised to mean 1 per sample."""
    target = target.astype(jnp.float32)
    median_colour = median(target.reshape(target.shape[0], -1, target.shape[-1]), axis=1)[:, None, None, :]
    far = jnp.sqrt(jnp.sum(jnp.square(target - median_colour), axis=-1, keepdims=True)) > OBJECT_DISTANCE
    weights = jnp.where(far, object_weight, 1.0)
    if edge_weight != 1.0:
        weights = jnp.where(outline(far), edge_weight, weights)
    return weights / jnp.mean(weights, axis=(1, 2, 3), keepdims=True)


def latent_object_weights(images01, latent_hw, object_weight: float, edge_weight: float = 1.0):
    """``object_weights`` of images in [0, 1] averaged over each latent position's pixels (the image
    side must be a multiple of the latent side) and renormalised: (B, h, w, 1), mean 1 per sample."""
    b, height, width, _ = images01.shape
    h, w = latent_hw
    if height % h or width % w:
        raise ValueError(f"object weights: image {height}x{width} is not a multiple of the latent {h}x{w}")
    pixels = object_weights(images01, object_weight, edge_weight)
    pooled = pixels.reshape(b, h, height // h, w, width // w, 1).mean(axis=(2, 4))
    return jax.lax.stop_gradient(pooled / jnp.mean(pooled, axis=(1, 2, 3), keepdims=True))


def denoising_weights(images, latent_hw, object_weight: float, edge_weight: float = 1.0):
    """``denoising_loss``'s ``weights`` for a batch of uint8 ``images``: None for plain MSE (weight 1)."""
    if object_weight == 1.0 and edge_weight == 1.0:
        return None
    return latent_object_weights(images_to_unit(images), latent_hw, object_weight, edge_weight)


def draw_t_and_noise(key, shape):
    key_t, key_eps = jax.random.split(key)
    return sample_train_t(key_t, shape[0]), jax.random.normal(key_eps, shape, jnp.float32)


def images_to_unit(images):
    """uint8 (B, H, W, 3) -> float32 in [0, 1] (torchvision ``ToTensor``)."""
    return images.astype(jnp.float32) / 255.0


def effnet_normalize(images01):
    return (images01 - IMAGENET_MEAN) / IMAGENET_STD


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """torch ``interpolate(mode='nearest')`` source index of each output index."""
    return np.minimum(np.floor(np.arange(size_out) * (size_in / size_out)).astype(np.int64), size_in - 1)


def resize_nearest(x, size):
    """NHWC nearest resize with torch's index rule (numpy or jax arrays)."""
    rows, cols = nearest_indices(x.shape[1], size[0]), nearest_indices(x.shape[2], size[1])
    return x[:, rows][:, :, cols]


def pyramid_noise(key, epsilon, size_range=(1, 16), levels: int = 10):
    """The official ``train_b._pyramid_noise`` in NHWC: octaves of nearest-upsampled noise, renormalised.

    As the official code does, both octave sides come from the height (``size(-2)`` twice), so
    for a non-square latent the octave grids are square; kept for parity.
    """
    height = epsilon.shape[1]
    multipliers = [1.0]
    keys = jax.random.split(key, levels)
    for i in range(1, levels):
        m = 0.75 ** i
        h = w = height // (2 ** i)
        if size_range is None or size_range[0] <= h <= size_range[1] or size_range[0] <= w <= size_range[1]:
            offset = jax.random.normal(keys[i], (epsilon.shape[0], h, w, epsilon.shape[-1]), jnp.float32)
            epsilon = epsilon + resize_nearest(offset, epsilon.shape[1:3]) * m
            multipliers.append(m)
        if h <= 1 or w <= 1:
            break
    return epsilon / float(sum(m ** 2 for m in multipliers)) ** 0.5
