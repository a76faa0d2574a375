"""Classifier-free guidance as the official ``GDF.sample`` applies it.

The conditional and unconditional inputs go through the network as one batch
(cond first, then uncond), the two predictions are lerped by the guidance scale, and the
result is pulled back towards the conditional prediction's standard deviation by
``cfg_rho`` (0.7 by default), which counters the over-saturation large scales cause.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

# A guidance scale: a constant, (scale at t=1, scale at t=0) interpolated linearly in t,
# or any host-side function of t (a Python float in [0, 1]).
GuidanceScale = Union[float, Sequence[float], Callable[[float], float]]


def concat_conditions(conditions: dict, uncond_conditions: dict | None) -> dict:
    """Each condition array followed by its unconditional counterpart along the batch axis.

    ``uncond_conditions=None`` means zeros, the official default (Stable Cascade's
    pipelines pass the encoding of "" instead). ``None`` entries stay ``None``.
    """
    if uncond_conditions is None:
        uncond_conditions = jax.tree.map(jnp.zeros_like, conditions)
    if set(conditions) != set(uncond_conditions):
        raise ValueError(f"conditions {sorted(conditions)} and uncond_conditions "
                         f"{sorted(uncond_conditions)} must have the same keys")
    return {k: jax.tree.map(lambda c, u: jnp.concatenate([c, u.astype(c.dtype)], axis=0),
                            conditions[k], uncond_conditions[k])
            for k in conditions}


def torch_lerp(start, end, weight):
    """``torch.lerp`` with its rounding: from ``end`` when the weight is ≥ 0.5 (cfg ≥ 0.5)."""
    diff = end - start
    return jnp.where(jnp.abs(weight) < 0.5, start + weight * diff, end - diff * (1 - weight))


def _std(x, per_sample: bool):
    # torch.Tensor.std(): unbiased; the official code reduces over the whole batch.
    axes = tuple(range(1, x.ndim)) if per_sample else None
    return jnp.std(x, axis=axes, ddof=1, keepdims=True)


def apply_cfg(pred, pred_uncond, scale, cfg_rho: float = 0.7, *, std_per_sample: bool = False):
    """Guided prediction: lerp(uncond, cond, scale), then rescale by the std ratio.

    ``std_per_sample=False`` is the official global std over the whole (B, ...) batch,
    so one prompt's result depends on the rest of its batch; True takes the std of each
    sample on its own, which is batch-independent but not what the official code does.
    """
    pred_cfg = torch_lerp(pred_uncond, pred, scale)
    if cfg_rho <= 0:
        return pred_cfg
    std_pos, std_cfg = _std(pred, std_per_sample), _std(pred_cfg, std_per_sample)
    return cfg_rho * (pred_cfg * std_pos / (std_cfg + 1e-9)) + pred_cfg * (1 - cfg_rho)


def cfg_scales(cfg: GuidanceScale, r: np.ndarray) -> np.ndarray:
    """Per-step guidance scale (float32) at the step times ``r`` (host side, float64 math)."""
    r64 = np.asarray(r, np.float64)
    if callable(cfg):
        return np.array([float(cfg(float(t))) for t in r64], np.float32)
    if isinstance(cfg, (list, tuple)):
        if len(cfg) != 2:
            raise ValueError(f"cfg must be a float, a (scale at t=1, scale at t=0) pair or a callable, got {cfg!r}")
        return (cfg[0] * r64 + cfg[1] * (1 - r64)).astype(np.float32)
    return np.full(r64.shape, float(cfg), np.float32)


def cfg_active(r: np.ndarray, cfg_t_start: float | None, cfg_t_stop: float | None) -> np.ndarray:
    """Whether guidance runs at each step: t ≤ cfg_t_start and t ≥ cfg_t_stop (None: no bound)."""
    r64 = np.asarray(r, np.float64)
    active = np.ones(r64.shape, bool)
    if cfg_t_stop is not None:
        active &= r64 >= cfg_t_stop
    if cfg_t_start is not None:
        active &= r64 <= cfg_t_start
    return active
