"""Random models built fast, and the same weights seen by diffusers' PyTorch modules.

* :func:`fast_random_model` fills a model with the library's random-weight rules
  (``cascade_jax.models.random_init.random_value``: fan-in scaled weights, norm scales near 1,
  small biases/GRN/gammas) but draws from a pool of pre-drawn normals instead of a fresh
  float64 draw per element: 3.6B parameters take seconds instead of minutes. The values are
  as good as any for timing (finite, well scaled, no zeros or denormals).
* :func:`torch_state_dict` hands the *same memory* to PyTorch: on the CPU ``np.asarray`` of a
  JAX array is a zero-copy view, and the PyTorch layout is a transposed view of ours
  (linear ``(in, out)`` -> ``(out, in)``, q/k/v row blocks of the packed projection), so a
  diffusers model shares the JAX weights without a second copy (the full Stage C is 14.4 GB
  in float32; two copies do not fit a 24 GB machine). Convolution kernels are copied into
  PyTorch's contiguous OIHW (small: 3x3 depthwise, 1x1 and 2x2 kernels) because
  ``torch.conv2d`` would otherwise copy them on every call. On a GPU the sharing goes
  through DLPack.
* :func:`diffusers_unet_config` is the inverse of the library's
  ``official_config_from_diffusers`` (checked by a round trip).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.models.random_init import random_model
from cascade_jax.weights.layout import ours_to_torch
from cascade_jax.weights.tree import named_variables

_POOL_SIZE = 1 << 24  # 16M float32 normals (64 MB)
_pool_cache: dict[int, np.ndarray] = {}


class PooledGenerator:
    """Duck-types the two ``np.random.Generator`` methods ``random_value`` uses, serving slices of
    a fixed pool of standard normals at random offsets (a different slice for every tensor)."""

    def __init__(self, seed: int):
        if seed not in _pool_cache:
            _pool_cache.clear()
            _pool_cache[seed] = np.random.default_rng(seed).standard_normal(_POOL_SIZE, dtype=np.float32)
        self.pool = _pool_cache[seed]
        self.offsets = np.random.default_rng(seed + 1)

    def standard_normal(self, shape) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        start = int(self.offsets.integers(0, _POOL_SIZE))
        if n <= _POOL_SIZE - start:
            return self.pool[start:start + n].reshape(shape)
        return np.resize(np.roll(self.pool, -start), n).reshape(shape)  # longer than the pool: repeats

    def uniform(self, low, high, shape) -> np.ndarray:
        u = 0.5 * (1.0 + np.tanh(self.standard_normal(shape)))  # in (0, 1)
        return (low + (high - low) * u).astype(np.float32)


def fast_random_model(model_name: str, config: dict, seed: int = 0, dtype="float32") -> nnx.Module:
    """``cascade_jax.models.random_init.random_model`` (same value rules) with pooled draws."""
    return random_model(model_name, config, seed, dtype, rng=PooledGenerator(seed))


def param_count(model: nnx.Module) -> int:
    return sum(int(np.prod(v.shape)) for v in named_variables(model).values())


# ---- the same weights in PyTorch ----------------------------------------------------------------

def _torch_view(value: jax.Array):
    """A torch tensor over the memory of ``value`` (no copy)."""
    import torch
    if value.devices() and next(iter(value.devices())).platform == "cpu":
        array = np.asarray(value)  # zero-copy view of the JAX buffer (read-only)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "non-writable": the forward never writes weights
            if array.dtype == jnp.bfloat16:
                return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(array)
    return torch.from_dlpack(value)


def _to_torch_layout(tensor, layout: str):
    if layout == "same":
        return tensor
    if layout == "linear":
        return tensor.T
    if layout == "conv":  # HWIO -> OIHW, copied contiguous (see module docstring)
        return tensor.permute(3, 2, 0, 1).contiguous()
    if layout == "conv_transpose":  # flipped HWIO -> IOHW
        return tensor.flip(0, 1).permute(2, 3, 0, 1).contiguous()
    raise ValueError(f"unknown torch_layout {layout!r}")


def torch_state_dict(model: nnx.Module, share: bool = True) -> dict:
    """``{official key: torch tensor}`` in PyTorch layout; ``share``: views of the JAX memory
    (convolutions copied), else independent contiguous copies."""
    import torch
    out = {}
    for key, var in named_variables(model).items():
        layout = var.get_metadata()["torch_layout"]
        if share:
            out[key] = _to_torch_layout(_torch_view(var.get_value()), layout)
        else:
            array = ours_to_torch(np.asarray(var.get_value()), layout)
            out[key] = torch.from_numpy(np.ascontiguousarray(array))
    return out


def diffusers_unet_config(model_name: str, config: dict) -> dict:
    """diffusers ``StableCascadeUNet`` kwargs equivalent to an official StageB/StageC config."""
    from cascade_jax.weights.diffusers_unet import official_config_from_diffusers

    letters = {"C": "SDCascadeResBlock", "T": "SDCascadeTimestepBlock", "A": "SDCascadeAttnBlock"}
    out = {
        "in_channels": config["c_in"], "out_channels": config["c_out"],
        "timestep_ratio_embedding_dim": config["c_r"], "patch_size": config["patch_size"],
        "conditioning_dim": config["c_cond"], "block_out_channels": list(config["c_hidden"]),
        "num_attention_heads": list(config["nhead"]),
        "down_num_layers_per_block": list(config["blocks"][0]), "up_num_layers_per_block": list(config["blocks"][1]),
        "down_blocks_repeat_mappers": list(config["block_repeat"][0]),
        "up_blocks_repeat_mappers": list(config["block_repeat"][1]),
        "block_types_per_layer": [[letters[c] for c in level] for level in config["level_config"]],
        "clip_seq": config["c_clip_seq"], "kernel_size": config["kernel_size"], "dropout": list(config["dropout"]),
        "self_attn": config["self_attn"], "timestep_conditioning_type": list(config["t_conds"]),
    }
    if model_name == "stage_c":
        out.update(clip_text_in_channels=config["c_clip_text"],
                   clip_text_pooled_in_channels=config["c_clip_text_pooled"],
                   clip_image_in_channels=config["c_clip_img"], switch_level=list(config["switch_level"]))
    elif model_name == "stage_b":
        out.update(clip_text_pooled_in_channels=config["c_clip"], effnet_in_channels=config["c_effnet"],
                   pixel_mapper_in_channels=config["c_pixels"], switch_level=None)
    else:
        raise ValueError(f"{model_name!r} is not a StableCascadeUNet (stage_b or stage_c)")
    back = official_config_from_diffusers(out)
    mismatched = {k: (config[k], back.get(k)) for k in config
                  if _normalise(config[k]) != _normalise(back.get(k))}
    if mismatched:
        raise ValueError(f"diffusers config does not round-trip to the official config: {mismatched}")
    return out


def _normalise(value):
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def diffusers_unet(model_name: str, config: dict, model: nnx.Module, *, share: bool = True, device="cpu"):
    """diffusers ``StableCascadeUNet`` (eval mode) holding ``model``'s weights."""
    import torch
    from diffusers.loaders.single_file_utils import convert_stable_cascade_unet_single_file_to_diffusers
    from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet

    state = convert_stable_cascade_unet_single_file_to_diffusers(torch_state_dict(model, share))
    with torch.device("meta"):
        unet = StableCascadeUNet(**diffusers_unet_config(model_name, config))
    unet.load_state_dict(state, strict=True, assign=True)
    return unet.to(device).eval().requires_grad_(False)


def diffusers_stage_a(config: dict, model: nnx.Module, *, share: bool = True, device="cpu"):
    """diffusers ``PaellaVQModel`` (eval mode) holding a StageA's weights (codebook renamed)."""
    import torch
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel

    state = torch_state_dict(model, share)
    state["vquantizer.embedding.weight"] = state.pop("vquantizer.codebook.weight")
    with torch.device("meta"):
        vq = PaellaVQModel(levels=config["levels"], bottleneck_blocks=config["bottleneck_blocks"],
                           embed_dim=config["c_hidden"], latent_channels=config["c_latent"],
                           num_vq_embeddings=config["codebook_size"], scale_factor=config.get("scale_factor", 0.43))
    vq.load_state_dict(state, strict=True, assign=True)
    return vq.to(device).eval().requires_grad_(False)
