"""One training update as a pure function, and its jitted, sharded, donated form.

The global batch (B rows) is cut into ``grad_accum_steps`` micro-batches that a ``lax.scan``
runs one after another: gradients are summed and divided by the count (the official
``loss / grad_accum_steps`` before each backward), the adaptive loss buckets are updated after
every micro-batch (as the official forward pass does), then one clipped AdamW update and the
EMA follow. Micro-batch i takes rows i, i+k, i+2k, ... so each stays spread over every
device of the batch axes without moving data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cascade_jax.diffusion import adaptive_loss_weight_update
from cascade_jax.training.config import TrainConfig
from cascade_jax.training.optimizer import lr_schedule
from cascade_jax.training.state import TrainState, ema_update


def cast_floats(tree, dtype):
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def split_micro_batches(batch, accum: int):
    def split(x):
        if x.shape[0] % accum:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {accum} micro-batches")
        return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_loss_fn(task, cfg: TrainConfig, graphdef):
    def loss_fn(params, frozen, micro_batch, key, loss_state, ema=None):
        modules = nnx.merge(graphdef, cast_floats(params, cfg.compute_dtype), frozen)
        if not getattr(task, "uses_ema_target", False):
            return task.loss(modules, micro_batch, key, loss_state, cfg)
        # A task that learns against its own EMA (consistency distillation's target network) gets the models
        # with the EMA in place of the trained values (the trained values themselves without an EMA, as the
        # LCM-LoRA reference does), constant: no gradient flows through the target.
        source = params if ema is None else ema
        target = nnx.merge(graphdef, cast_floats(jax.lax.stop_gradient(source), cfg.compute_dtype), frozen)
        return task.loss(modules, micro_batch, key, loss_state, cfg, target=target)

    return loss_fn


def train_step(state: TrainState, frozen, batch, *, task, cfg: TrainConfig, graphdef, tx):
    accum = cfg.grad_accum_steps
    grad_fn = jax.value_and_grad(make_loss_fn(task, cfg, graphdef), has_aux=True)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def micro_step(carry, inputs):
        grads, loss_state = carry
        index, micro_batch = inputs
        (loss, aux), g = grad_fn(state.params, frozen, micro_batch, jax.random.fold_in(key, index), loss_state,
                                  state.ema)
        if loss_state is not None:
            loss_state = adaptive_loss_weight_update(loss_state, aux.logsnr, aux.per_sample_loss)
        return (jax.tree.map(jnp.add, grads, g), loss_state), (loss, jnp.mean(aux.per_sample_loss))

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    if accum == 1:
        # No scan for one micro-batch: XLA:CPU runs the convolutions of a loop body several times slower
        # than the same ops outside a loop (the demo's EfficientNet step: 2.9 s in a length-1 scan, 0.38 s
        # without; benchmarks/results/scan_overhead.md).
        (grads, loss_state), (weighted, raw) = micro_step((zeros, state.loss_state), (0, batch))
    else:
        (grads, loss_state), (weighted, raw) = jax.lax.scan(
            micro_step, (zeros, state.loss_state), (jnp.arange(accum), split_micro_batches(batch, accum)))
    grads = jax.tree.map(lambda g: g / accum, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(cfg, state.ema, state.params, params, state.step)
    metrics = {"loss": jnp.mean(raw), "loss_weighted": jnp.mean(weighted), "grad_norm": optax.tree.norm(grads),
               "lr": lr_schedule(cfg)(state.step)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, loss_state=loss_state)
    return new_state, metrics


def jit_train_step(task, cfg: TrainConfig, graphdef, tx, state_shardings, frozen_shardings, batch_shardings,
                   replicated):
    """The step compiled with explicit in/out shardings; the state argument is donated."""

    def step(state, frozen, batch):
        return train_step(state, frozen, batch, task=task, cfg=cfg, graphdef=graphdef, tx=tx)

    return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))
