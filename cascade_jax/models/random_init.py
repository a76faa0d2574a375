"""Fast random models for demos, tests and benchmarks without weights.

Constructing a model eagerly runs one small jitted RNG program per parameter shape, which
takes minutes on a CPU for a few hundred tensors. Here the model is built abstractly
(``nnx.eval_shape``, no memory) and every variable is then filled from one numpy generator:
fast, deterministic per seed, and every parameter non-trivial (no zero-initialised GRN or
gammas hiding mistakes). BatchNorm variances stay positive.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.models.registry import abstract_model
from cascade_jax.nn.params import named_variables


def _fan_in(shape, layout) -> int:
    if layout == "linear":
        return shape[0]
    if layout in ("conv", "conv_transpose"):
        return int(np.prod(shape[:-1]))
    return 1


def random_value(key: str, var, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
    shape, layout = tuple(var.shape), var.get_metadata()["torch_layout"]
    leaf = key.rsplit(".", 1)[-1]
    if not np.issubdtype(var.dtype, np.floating):
        return np.zeros(shape, var.dtype)
    if leaf == "running_var":
        return rng.uniform(0.5, 1.5, shape).astype(dtype)
    if layout in ("linear", "conv", "conv_transpose") or leaf == "in_proj_weight":
        return (rng.standard_normal(shape) / np.sqrt(_fan_in(shape, layout))).astype(dtype)
    if leaf == "weight" and len(shape) == 1:  # a norm's scale
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(dtype)
    return (0.05 * rng.standard_normal(shape)).astype(dtype)  # biases, GRN, gammas, embeddings


def random_model(model_name: str, config: dict, seed: int = 0, dtype="float32", rng=None) -> nnx.Module:
    """``model_name`` built from ``config`` with seeded random weights (float32 or bfloat16 params).

    ``rng`` replaces the numpy generator (anything with ``standard_normal``/``uniform``), e.g. a
    cheaper one for multi-billion-parameter benchmark models.
    """
    model = abstract_model(model_name, config)
    rng = np.random.default_rng(seed) if rng is None else rng
    for key, var in named_variables(model).items():
        value = random_value(key, var, rng)
        if isinstance(var, nnx.Param) and np.issubdtype(value.dtype, np.floating):
            value = value.astype(jnp.dtype(dtype))
        var.set_value(jnp.asarray(value))
    return model
