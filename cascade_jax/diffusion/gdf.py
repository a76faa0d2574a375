"""The generic diffusion framework as one frozen config: which schedule, target, noise
conditioning and loss weight a model was trained with, plus ``diffuse`` / ``undiffuse``.

Defaults are Stable Cascade's Stage B and C (``train/train_b.py``, ``train/train_c.py``):
``CosineSchedule(clamp_range=[0.0001, 0.9999])``, ``VPScaler``, ``EpsilonTarget``,
``CosineTNoiseCond``, ``P2LossWeight`` (or ``AdaptiveLossWeight``). The config is hashable,
so it can be a static argument of ``jax.jit``; every method is a pure function of arrays.
Arrays are NHWC (batch first, channels last); all math is float32.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cascade_jax.diffusion import loss_weights, schedule
from cascade_jax.diffusion.noise_conditions import cosine_t_noise_cond
from cascade_jax.diffusion.scalers import per_sample, vp_scalers
from cascade_jax.diffusion.targets import get_target


class Diffused(NamedTuple):
    """What ``GDF.diffuse`` returns, in the official tuple order."""

    noised: jnp.ndarray  # a·x0 + b·ε, the network input
    epsilon: jnp.ndarray  # ε actually used (offset noise included)
    target: jnp.ndarray  # what the network should predict
    logsnr: jnp.ndarray  # (B,)
    noise_cond: jnp.ndarray  # (B,) the r fed to the network
    loss_weight: jnp.ndarray  # (B,)


@dataclasses.dataclass(frozen=True)
class GDF:
    target: str = "epsilon"  # epsilon | x0 | v
    cosine_s: float = schedule.COSINE_S
    clamp_range: tuple = schedule.CLAMP_RANGE
    loss_weight: str = "p2"  # p2 | adaptive (needs an AdaptiveLossWeightState)
    offset_noise: float = 0.0  # std of a per-(sample, channel) constant added to ε

    def __post_init__(self):
        get_target(self.target)  # fail early on an unknown name
        if self.loss_weight not in ("p2", "adaptive"):
            raise ValueError(f"GDF.loss_weight must be 'p2' or 'adaptive', got {self.loss_weight!r}")
        object.__setattr__(self, "clamp_range", tuple(float(v) for v in self.clamp_range))

    def logsnr(self, t, shift: float = 1.0):
        return schedule.cosine_logsnr(t, shift, s=self.cosine_s, clamp_range=self.clamp_range)

    def noise_cond(self, logsnr):
        return cosine_t_noise_cond(logsnr, s=self.cosine_s)

    def weight(self, logsnr, *, loss_shift: float = 1.0, loss_state=None):
        """Per-sample loss weight; ``loss_state`` is required for the adaptive weight."""
        if self.loss_weight == "p2":
            return loss_weights.p2_loss_weight(logsnr, shift=loss_shift)
        if loss_state is None:
            raise ValueError("GDF(loss_weight='adaptive') needs loss_state=AdaptiveLossWeightState "
                             "(adaptive_loss_weight_init() makes a fresh one)")
        return loss_weights.adaptive_loss_weight(loss_state, logsnr, shift=loss_shift)

    def diffuse(self, x0, epsilon=None, t=None, *, key=None, shift: float = 1.0, loss_shift: float = 1.0,
                offset=None, loss_state=None) -> Diffused:
        """Noise a clean batch ``x0`` (B, ..., C) with ``epsilon`` to levels ``t`` (B,) for a training
        step (argument order as the official ``diffuse``).

        ``t``, ``epsilon`` and (when ``offset_noise`` > 0) ``offset`` of shape (B, 1, .., 1, C)
        are drawn from ``key`` when not given, as the official ``diffuse`` draws them.
        """
        x0 = jnp.asarray(x0, jnp.float32)
        t, epsilon, offset = _draw_missing(key, x0, t, epsilon, offset, self.offset_noise > 0)
        if self.offset_noise > 0:
            epsilon = epsilon + offset * self.offset_noise
        logsnr = self.logsnr(jnp.broadcast_to(t, x0.shape[:1]), shift)
        a, b = (per_sample(v, x0.ndim) for v in vp_scalers(logsnr))
        target = get_target(self.target).target(x0, epsilon, a, b)
        return Diffused(x0 * a + epsilon * b, epsilon, target, logsnr, self.noise_cond(logsnr),
                        self.weight(logsnr, loss_shift=loss_shift, loss_state=loss_state))

    def undiffuse(self, x, logsnr, pred):
        """(predicted x0, predicted ε) from the noised ``x``, its log-SNR and the network output."""
        a, b = (per_sample(v, x.ndim) for v in vp_scalers(logsnr))
        target = get_target(self.target)
        return target.to_x0(x, pred, a, b), target.to_epsilon(x, pred, a, b)


def _draw_missing(key, x0, t, epsilon, offset, need_offset: bool):
    missing = [name for name, v in (("t", t), ("epsilon", epsilon)) if v is None]
    if need_offset and offset is None:
        missing.append("offset")
    if missing and key is None:
        raise ValueError(f"GDF.diffuse: pass {', '.join(missing)} or a key to draw them from")
    key_t, key_eps, key_offset = jax.random.split(key, 3) if missing else (None,) * 3
    if t is None:
        t = schedule.sample_train_t(key_t, x0.shape[0])
    if epsilon is None:
        epsilon = jax.random.normal(key_eps, x0.shape, jnp.float32)
    if need_offset and offset is None:
        # NHWC version of the official (B, C, 1, 1) offset: constant over the spatial axes.
        offset_shape = (x0.shape[0],) + (1,) * (x0.ndim - 2) + (x0.shape[-1],)
        offset = jax.random.normal(key_offset, offset_shape, jnp.float32)
    return jnp.asarray(t, jnp.float32), jnp.asarray(epsilon, jnp.float32), offset
