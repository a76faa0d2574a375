"""Per-sample loss weights as functions of log-SNR (official ``gdf.P2LossWeight``,
``gdf.AdaptiveLossWeight``).

The adaptive weight is stateful in the official code (a tensor mutated after every step).
Here its state is an explicit pytree, :class:`AdaptiveLossWeightState`: a train step reads
weights from it and returns the updated state with the rest of the train state, so it is
jittable, shardable (it is tiny: replicate it) and checkpointed like everything else.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cascade_jax.diffusion.schedule import torch_linspace


def _shift_logsnr(logsnr, shift: float):
    """The official ``loss_shift``: weigh a shifted level as the unshifted one it stands for."""
    logsnr = jnp.asarray(logsnr, jnp.float32)
    return logsnr + 2 * math.log(shift) if shift != 1 else logsnr


def p2_loss_weight(logsnr, *, k: float = 1.0, gamma: float = 1.0, s: float = 1.0, shift: float = 1.0):
    """P2 weighting (k + SNR^s)^-γ; with the defaults, 1 / (1 + SNR)."""
    logsnr = _shift_logsnr(logsnr, shift)
    return (k + jnp.exp(logsnr * s)) ** -gamma


class AdaptiveLossWeightState(NamedTuple):
    """Running mean loss per log-SNR bucket; the weight of a sample is 1 / its bucket's loss."""

    bucket_ranges: jnp.ndarray  # (buckets - 1,) sorted bucket boundaries
    bucket_losses: jnp.ndarray  # (buckets,) EMA of the unweighted loss in each bucket


def adaptive_loss_weight_init(logsnr_range=(-10.0, 10.0), buckets: int = 300) -> AdaptiveLossWeightState:
    """Fresh state as the official constructor makes it: every bucket's loss starts at 1."""
    return AdaptiveLossWeightState(
        # torch's float32 linspace, so samples on a boundary land in the official bucket.
        bucket_ranges=jnp.asarray(torch_linspace(logsnr_range[0], logsnr_range[1], buckets - 1)),
        bucket_losses=jnp.ones((buckets,), jnp.float32),
    )


def adaptive_bucket_index(state: AdaptiveLossWeightState, logsnr):
    """Bucket of each log-SNR: ``torch.searchsorted`` (left side) over the boundaries."""
    # compare_all: a few hundred comparisons per sample and no loop; the default binary search is a while
    # loop, and a while loop leaves the TPU compiler's step-time estimate out (training/plan_estimate.py)
    return jnp.searchsorted(state.bucket_ranges, jnp.asarray(logsnr, jnp.float32), side="left", method="compare_all")


def adaptive_loss_weight(state: AdaptiveLossWeightState, logsnr, *, weight_range=(1e-7, 1e7),
                         shift: float = 1.0):
    """1 / (running loss of the sample's bucket), clamped to ``weight_range``."""
    index = adaptive_bucket_index(state, _shift_logsnr(logsnr, shift))
    return jnp.clip(1 / state.bucket_losses[index], *weight_range)


def adaptive_loss_weight_update(state: AdaptiveLossWeightState, logsnr, loss, *,
                                beta: float = 0.99) -> AdaptiveLossWeightState:
    """EMA of the per-sample *unweighted* ``loss`` into each sample's bucket; returns new state.

    Like the official in-place update, every sample in a bucket reads the old value and
    the last sample of the batch in that bucket wins (what ``tensor[idx] = ...`` does on
    the CPU). XLA leaves the winner of a duplicate-index scatter unspecified, so the
    earlier duplicates are dropped explicitly, which keeps the result deterministic.
    ``loss`` is treated as data: gradients do not flow into the state.
    """
    index = adaptive_bucket_index(state, logsnr)
    loss = jax.lax.stop_gradient(jnp.asarray(loss, jnp.float32)).reshape(index.shape)
    new = state.bucket_losses[index] * beta + loss * (1 - beta)
    later = jnp.arange(index.shape[0])[None, :] > jnp.arange(index.shape[0])[:, None]
    overwritten = jnp.any((index[None, :] == index[:, None]) & later, axis=1)
    buckets = state.bucket_losses.shape[0]
    target = jnp.where(overwritten, buckets, index)  # out of range: dropped by the scatter
    losses = state.bucket_losses.at[target].set(new, mode="drop")
    return state._replace(bucket_losses=losses)
