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


def make_gdf(adaptive: bool) -> GDF:
    return GDF(loss_weight="adaptive" if adaptive else "p2")


def denoising_loss(apply_fn, x0, t, epsilon, gdf: GDF, loss_state=None, weights=None):
    """(weighted mean loss, LossAux) of ``apply_fn(noised, noise_cond) -> prediction`` on clean ``x0``.

    ``weights`` (B, h, w, 1), mean 1 per sample (``pixel_weights.latent_weights``), weigh the squared error
    per latent position in the optimised loss; the logged per-sample loss stays the plain MSE."""
    d = gdf.diffuse(x0, epsilon, t, shift=1.0, loss_shift=1.0, loss_state=loss_state)
    pred = apply_fn(d.noised, d.noise_cond).astype(jnp.float32)
    axes = tuple(range(1, x0.ndim))
    squared = jnp.square(pred - d.target)
    per_sample = jnp.mean(squared, axis=axes)
    optimised = per_sample if weights is None else jnp.mean(squared * weights, axis=axes)
    return jnp.mean(optimised * d.loss_weight), LossAux(per_sample, d.logsnr)


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
