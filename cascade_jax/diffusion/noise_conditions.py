"""Noise conditioning: the scalar ``r`` the network is fed (official ``gdf.CosineTNoiseCond``).

The cosine schedule inverted: the t whose *unclamped, unshifted* cosine schedule has this
log-SNR. It differs from the sampler's t wherever the schedule is clamped (t=1 gives
0.99358, not 1.0) or shifted (with shift 2, t=0.833 is fed as 0.915).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cascade_jax.diffusion.schedule import COSINE_S


def cosine_t_noise_cond(logsnr, *, s: float = COSINE_S, shift: float = 1.0):
    """r ∈ [0, 1] from log-SNR, float32. ``shift`` (default 1, as Stable Cascade trains)
    would add 2·ln(shift) first, undoing a schedule shift."""
    logsnr = jnp.asarray(logsnr, jnp.float32)
    if shift != 1:
        logsnr = logsnr + 2 * math.log(shift)
    s = jnp.float32(s)
    min_var = jnp.cos(s / (1 + s) * jnp.pi * 0.5) ** 2
    var = jnp.clip(jax.nn.sigmoid(logsnr), 0.0, 1.0)
    t = (jnp.arccos(jnp.sqrt(var * min_var)) / (jnp.pi * 0.5)) * (1 + s) - s
    return jnp.clip(t, 0.0, 1.0)
