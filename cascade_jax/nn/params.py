"""Parameter helpers: every weight records how it maps to its PyTorch tensor.

Each parameter is an ``nnx.Param`` (or ``BatchStat``) carrying two pieces of metadata:

* ``torch_layout``: how the PyTorch tensor is laid out relative to ours
  ('conv': OIHW <-> HWIO, 'conv_transpose': IOHW <-> flipped HWIO, 'linear': (out, in) <-> (in, out),
  'same': identical). The weight converters read it, so no model needs a hand-written key map
  for the official format: the official key is the module path joined with dots.
* ``axes``: logical axis names used by ``cascade_jax.sharding`` to place the parameter on a mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class BatchStat(nnx.Variable):
    """Running statistics of BatchNorm: loaded from checkpoints, never trained."""


def param(rngs: nnx.Rngs | None, shape, *, torch_layout: str, axes: tuple, init="normal", dtype=jnp.float32):
    """A parameter initialised with small random values (or zeros/ones), tagged with its layout.

    Random init everywhere (rather than PyTorch's zero init of GRN/gammas) keeps tiny test models
    from hiding bugs; real weights always come from a checkpoint.
    """
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else int(shape[0])
        value = jax.random.normal(rngs.params(), shape, dtype) / np.sqrt(max(fan_in, 1))
    return nnx.Param(value, torch_layout=torch_layout, axes=axes)


def official_key(path) -> str:
    """The official PyTorch checkpoint name of the variable at nnx ``path``: the module path joined with dots."""
    return ".".join(str(p) for p in path)


def named_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """``{official key: variable}`` for every parameter and BatchNorm statistic of ``model``."""
    return {official_key(path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Variable))}


def batch_stat(shape, value: float, *, dtype=jnp.float32):
    return BatchStat(jnp.full(shape, value, dtype), torch_layout="same", axes=("norm",) * len(shape))
