"""Where the train state lives on the mesh: parameter shardings from their logical axes, the
optimizer moments sharded like their parameters, small things replicated.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cascade_jax.sharding import batch_sharding, logical_sharding
from cascade_jax.training.state import TrainState


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def variable_shardings(tree, mesh: Mesh, rules=None):
    """The same tree with each Variable's value replaced by its ``NamedSharding``."""
    return jax.tree.map(lambda v: v.replace(logical_sharding(v, mesh, rules)), tree, is_leaf=_is_variable)


def state_shardings(state: TrainState, tx, mesh: Mesh, rules=None) -> TrainState:
    params = variable_shardings(state.params, mesh, rules)
    rep = replicated(mesh)
    opt = optax.tree_map_params(tx, lambda _, sharding: sharding, state.opt_state, params,
                                transform_non_params=lambda _: rep, is_leaf=_is_variable)
    return TrainState(step=rep, params=params, opt_state=opt, ema=params if state.ema is not None else None,
                      loss_state=jax.tree.map(lambda _: rep, state.loss_state), rng=rep)


def batch_shardings(batch: dict, mesh: Mesh) -> dict:
    return {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def place(tree, shardings):
    """Host (or single-device) arrays -> global arrays with ``shardings``; every process passes the same values."""

    def put(x, sharding):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)
