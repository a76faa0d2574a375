"""The train state (one pytree) and the official EMA semantics.

``TrainState`` holds everything that changes during training and is checkpointed: the update
count, the trainable parameters (float32 master copy), the optimizer state, the EMA of the
trainable parameters, the adaptive loss-weight buckets, and the RNG key. Frozen parameters and
the model structure (graphdef) live outside it: they never change and are not donated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from cascade_jax.training.config import TrainConfig


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32: optimizer updates done
    params: Any  # nnx.State of the trainable variables
    opt_state: Any
    ema: Any  # nnx.State like params, or None
    loss_state: Any  # AdaptiveLossWeightState or None
    rng: jax.Array  # raw uint32 key data (checkpointable as a plain array)


def init_state(cfg: TrainConfig, params, tx, loss_state=None) -> TrainState:
    ema = jax.tree.map(jnp.copy, params) if cfg.use_ema else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema=ema,
                      loss_state=loss_state, rng=jax.random.key_data(jax.random.key(cfg.seed)))


def ema_update(cfg: TrainConfig, ema, old_params, new_params, step):
    """The official EMA over the micro-iterations of update ``step`` (0-based).

    The official loop counts micro-iterations i = 1, 2, ...; after iteration i, when
    ``i % ema_iters == 0``, ``ema = ema·β + params·(1-β)`` with β = ema_beta once
    ``i > ema_start_iters`` and 0 before (a copy). The optimizer updates at the last
    micro-iteration of each update, so earlier ones blend the old parameters.
    """
    if ema is None:
        return None
    accum = cfg.grad_accum_steps
    for j in range(accum):
        i = step * accum + j + 1
        params = new_params if j == accum - 1 else old_params
        active = (i % cfg.ema_iters) == 0
        beta = jnp.where(i > cfg.ema_start_iters, jnp.float32(cfg.ema_beta), jnp.float32(0.0))
        ema = jax.tree.map(lambda e, p: jnp.where(active, e * beta + p.astype(e.dtype) * (1 - beta), e).astype(e.dtype),
                           ema, params)
    return ema
