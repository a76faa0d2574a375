"""The demo's loss-weight plug-in (``pixel_weights`` in configs/training/demo_*.yaml; the library's plug-in
point is ``cascade_jax.training.pixel_weights``): a small object on a flat background is a few percent of the
pixels, so the plain MSE all but ignores it. Pixels far from their image's median colour (the background)
weigh ``object_weight``, those on the object's outline ``edge_weight`` (where a circle, a square and a
triangle of one box differ), the rest 1, normalised to mean 1 per sample.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

OBJECT_DISTANCE = 0.15  # RGB distance in [0, 1] from the image's median colour that marks an object pixel
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
    for name, value in (("object_weight", object_weight), ("edge_weight", edge_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value < math.inf:
            raise ValueError(f"{name}={value!r}: use a number >= 1 (1 gives those pixels no extra weight)")
    target = target.astype(jnp.float32)
    median_colour = median(target.reshape(target.shape[0], -1, target.shape[-1]), axis=1)[:, None, None, :]
    far = jnp.sqrt(jnp.sum(jnp.square(target - median_colour), axis=-1, keepdims=True)) > OBJECT_DISTANCE
    weights = jnp.where(far, object_weight, 1.0)
    if edge_weight != 1.0:
        weights = jnp.where(outline(far), edge_weight, weights)
    return weights / jnp.mean(weights, axis=(1, 2, 3), keepdims=True)
