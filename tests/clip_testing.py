"""Helpers for the CLIP parity tests: randomised transformers models, saving, loading through the converter."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


def randomise_torch_model(model, seed: int = 0):
    """Every parameter drawn anew (LayerNorm weights around 1, biases small), then ``.eval()``.

    transformers' init leaves LayerNorm at weight 1 / bias 0, which would hide a swapped or
    missing LayerNorm; scales keep activations O(1) through a few layers.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise if name.endswith("bias") else noise)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(noise / np.sqrt(fan_in) if "embedding" not in name else 0.5 * noise)
    return model.eval()


def save_torch_model(model, path: Path) -> Path:
    """The model's state dict as a transformers-style ``model.safetensors`` (no position_ids buffers)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def load_converted(model_name: str, config: dict, weights: Path, tmp_path: Path):
    """Load through the real converter when it exists (helpers.load_fixture_model), else in memory.

    The fallback copies the safetensors file with weights.tree.load_torch_state_dict (strict),
    which checks the same names and shapes but not the Orbax round trip.
    """
    if importlib.util.find_spec("cascade_jax.weights.convert") is not None:
        from helpers import load_fixture_model

        print(f"loading {model_name} through cascade_jax.weights.convert")
        return load_fixture_model(model_name, config, weights, tmp_path)
    from flax import nnx
    from safetensors.numpy import load_file

    from cascade_jax.models.registry import model_class
    from cascade_jax.weights.tree import load_torch_state_dict

    print(f"loading {model_name} with weights.tree.load_torch_state_dict (no converter yet)")
    model = model_class(model_name)(**config, rngs=nnx.Rngs(0))
    load_torch_state_dict(model, load_file(str(weights)))
    return model
