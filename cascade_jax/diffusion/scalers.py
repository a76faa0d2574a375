"""Variance-preserving input scaler (official ``gdf.VPScaler``): x_t = a·x0 + b·ε, a² + b² = 1."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def vp_scalers(logsnr):
    """(a, b) with a² = sigmoid(logSNR) and b² = 1 − a², in float32."""
    a_squared = jax.nn.sigmoid(jnp.asarray(logsnr, jnp.float32))
    return jnp.sqrt(a_squared), jnp.sqrt(1 - a_squared)


def per_sample(v, ndim: int):
    """Reshape a (B,) or scalar coefficient to broadcast over a (B, ...) array of rank ``ndim``."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim)) if v.ndim == 1 else v
