"""The variables of a model keyed by their official PyTorch checkpoint names."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.nn.params import named_variables, official_key  # noqa: F401  (defined with the layers)
from cascade_jax.weights.layout import torch_shape, torch_to_ours


def expected_torch_shapes(model: nnx.Module) -> dict[str, tuple]:
    """``{official key: PyTorch shape}``; works on ``nnx.eval_shape`` models (no memory used)."""
    return {k: torch_shape(tuple(v.shape), v.get_metadata()["torch_layout"])
            for k, v in named_variables(model).items()}


def load_torch_state_dict(model: nnx.Module, state_dict: dict, *, strict: bool = True):
    """Copy an in-memory official state dict (name -> array/tensor) into ``model`` in place.

    For tests and small models; files go through :mod:`cascade_jax.weights.convert`.
    """
    variables = named_variables(model)
    missing = sorted(set(variables) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(variables))
    if strict and (missing or unexpected):
        raise KeyError(f"state dict does not match the model: missing {missing[:20]}, unexpected {unexpected[:20]}")
    for key, var in variables.items():
        if key not in state_dict:
            continue
        value = state_dict[key]
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        value = torch_to_ours(value, var.get_metadata()["torch_layout"])
        if value.shape != var.shape:
            raise ValueError(f"{key}: checkpoint shape {value.shape} (after layout change) != model {var.shape}")
        var.set_value(jnp.asarray(value, dtype=var.dtype))
