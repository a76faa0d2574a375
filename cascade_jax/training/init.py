"""Training from scratch: Stage B / Stage C initialised as the official constructors do.

Official rules (``StageC.__init__`` / ``StageB.__init__`` "WEIGHT INIT"): xavier-uniform weights
and zero biases for every Conv2d/Linear; normal(0.02) for the condition mappers; xavier with gain
0.02 for the input embedding; a zero output conv; the last channel-MLP layer of every
ResBlock/FeedForwardBlock scaled by sqrt(1 / sum(blocks[0])); zero TimestepBlock mappers. What
those rules do not touch keeps torch's own init: attention in_proj xavier / zero bias,
ConvTranspose2d kaiming-uniform(a=√5), GlobalResponseNorm gamma/beta zeros.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from cascade_jax.nn.params import named_variables
from cascade_jax.weights.layout import torch_shape, torch_to_ours

CONDITION_MAPPERS = {
    "stage_c": ("clip_txt_mapper.weight", "clip_txt_pooled_mapper.weight", "clip_img_mapper.weight"),
    "stage_b": ("clip_mapper.weight", "effnet_mapper.0.weight", "effnet_mapper.2.weight", "pixels_mapper.0.weight",
                "pixels_mapper.2.weight"),
}
_TIMESTEP_MAPPER = re.compile(r"^(down|up)_blocks\.\d+\.\d+\.mapper(_\w+)?\.weight$")
_MLP_OUT = re.compile(r"^(down|up)_blocks\.\d+\.\d+\.channelwise\.4\.weight$")


def _fans(shape) -> tuple[int, int]:
    """torch's ``_calculate_fan_in_and_fan_out`` of a torch-layout weight."""
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def _xavier(rng, shape, gain=1.0):
    fan_in, fan_out = _fans(shape)
    bound = gain * np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, shape)


def _torch_value(model_name, key, shape, layout, rng, mlp_scale):
    """The initial value of one tensor, in torch layout."""
    leaf = key.rsplit(".", 1)[-1]
    if key in CONDITION_MAPPERS[model_name]:
        return rng.normal(0.0, 0.02, shape)
    if key == "embedding.1.weight":
        return _xavier(rng, shape, gain=0.02)
    if key == "clf.1.weight" or _TIMESTEP_MAPPER.match(key):
        return np.zeros(shape)
    if layout == "conv_transpose":
        fan_in = shape[1] * int(np.prod(shape[2:]))  # torch's fan-in of a transposed conv weight
        return rng.uniform(-1, 1, shape) / np.sqrt(fan_in) if leaf in ("weight", "bias") else np.zeros(shape)
    if leaf == "in_proj_weight" or (leaf == "weight" and layout in ("linear", "conv")):
        value = _xavier(rng, shape)
        return value * mlp_scale if _MLP_OUT.match(key) else value
    return np.zeros(shape)  # biases, in_proj_bias, GRN gamma/beta


def official_init(model, model_name: str, config: dict, seed: int = 0):
    """Overwrite every parameter of a Stage B/C ``model`` with the official initialisation (in place)."""
    if model_name not in CONDITION_MAPPERS:
        raise ValueError(f"official init is defined for {sorted(CONDITION_MAPPERS)}, not {model_name!r}")
    rng = np.random.default_rng(seed)
    mlp_scale = np.sqrt(1.0 / sum(config["blocks"][0]))
    for key, var in named_variables(model).items():
        layout = var.get_metadata()["torch_layout"]
        shape = torch_shape(tuple(var.shape), layout)
        value = _torch_value(model_name, key, shape, layout, rng, mlp_scale)
        var.set_value(jnp.asarray(torch_to_ours(np.asarray(value, np.float32), layout), dtype=var.dtype))
    return model
