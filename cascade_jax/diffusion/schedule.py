"""Cosine log-SNR schedule with the resolution ``shift`` (official ``gdf.CosineSchedule``).

Noise levels are written as log-SNR = log(a² / b²) of the noised sample ``a·x0 + b·ε``.
Everything here is float32 whatever the model dtype: the schedule sets the inputs of the
timestep embedding, and bf16 there is badly off (r·10000 at r = 1 is 9984 in bf16).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

COSINE_S = 0.008
CLAMP_RANGE = (0.0001, 0.9999)


def _cosine_logsnr_unshifted(t, s: float, clamp_range):
    """log-SNR of the improved-DDPM cosine schedule; ᾱ clamped so t=0 and t=1 stay finite."""
    t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 1.0)
    s = jnp.float32(s)
    min_var = jnp.cos(s / (1 + s) * jnp.pi * 0.5) ** 2  # ᾱ(0) before normalisation
    var = jnp.clip(jnp.cos((s + t) / (1 + s) * jnp.pi * 0.5), 0.0, 1.0) ** 2 / min_var
    var = jnp.clip(var, *clamp_range)
    return jnp.log(var / (1 - var))


def cosine_logsnr_limits(s: float = COSINE_S, clamp_range=CLAMP_RANGE):
    """(min, max) log-SNR of the unshifted schedule, i.e. at t=1 and t=0."""
    limits = _cosine_logsnr_unshifted(jnp.array([1.0, 0.0]), s, clamp_range)
    return limits[0], limits[1]


def cosine_logsnr(t, shift: float = 1.0, *, s: float = COSINE_S, clamp_range=CLAMP_RANGE):
    """log-SNR at ``t`` ∈ [0, 1] (1 = pure noise), float32, same shape as ``t``.

    ``shift`` > 1 moves every level towards more noise by 2·ln(shift) (Simple Diffusion's
    resolution shift: a larger latent needs more noise to destroy the same information).
    The official schedule clamps the shifted value back into the *unshifted* range, so the
    first step of a shifted schedule is still exactly the t=1 level.
    """
    logsnr = _cosine_logsnr_unshifted(t, s, clamp_range)
    if shift != 1:
        # A Python float is weakly typed: the result stays float32 even with x64 enabled.
        logsnr = logsnr + 2 * math.log(1 / shift)
    low, high = cosine_logsnr_limits(s, clamp_range)
    return jnp.clip(logsnr, low, high)


def sample_train_t(key, batch_size: int):
    """Training noise levels as the official schedule draws them: uniform on [0.001, 1]."""
    u = jax.random.uniform(key, (batch_size,), jnp.float32)
    return jnp.clip((1 - u) + 0.001, 0.001, 1.0)


def torch_linspace(start: float, end: float, num: int) -> np.ndarray:
    """float32 ``torch.linspace(start, end, num)`` on the host (the sampler's t grid).

    torch fills the first half forward from ``start`` and the second half backward from
    ``end``; ``np.linspace`` rounds differently. This is torch's scalar path: exact for
    grids shorter than a CPU vector (the 6-step fixture), within 1 ulp (6e-8) otherwise,
    where torch's vectorised fill depends on the CPU's vector width.
    """
    if num < 1:
        raise ValueError(f"torch_linspace: num must be >= 1, got {num}")
    start32, end32 = np.float32(start), np.float32(end)
    if num == 1:
        return np.array([start32], np.float32)
    step = np.float32((end32 - start32) / np.float32(num - 1))
    idx = np.arange(num)
    forward = start32 + step * idx.astype(np.float32)
    backward = end32 - step * (num - 1 - idx).astype(np.float32)
    return np.where(idx < num // 2, forward, backward).astype(np.float32)

