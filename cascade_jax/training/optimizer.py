"""The official optimizer in optax: torch AdamW (wd 0.01, eps 1e-8), linear warm-up, torch's clipping.

Only the trainable parameters reach the optimizer (the task's filter splits them off before the
gradient), so frozen parts have neither gradients nor moments: no optax mask is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cascade_jax.training.config import TrainConfig


def lr_schedule(cfg: TrainConfig):
    """lr at update k (k previous updates) = lr · min(k / warmup_updates, 1).

    This is the official ``GradualWarmupScheduler(multiplier=1)`` as the trainer drives it: its
    constructor already steps once to epoch 0, so the first update runs with lr 0 (with the
    released ``warmup_updates: 1`` it only fills the Adam moments) and the second with the full lr.
    """
    if cfg.warmup_updates <= 0:
        return optax.constant_schedule(cfg.lr)
    return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_updates)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: scale by min(1, max_norm / (norm + 1e-6))."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    mu_dtype = jnp.dtype(cfg.moment_dtype) if cfg.moment_dtype else None
    adamw = optax.adamw(lr_schedule(cfg), b1=0.9, b2=0.999, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                        mu_dtype=mu_dtype)
    if cfg.grad_clip and cfg.grad_clip > 0:
        return optax.chain(clip_by_global_norm_torch(cfg.grad_clip), adamw)
    return adamw
