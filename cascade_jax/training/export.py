"""Trained weights out: the generator (and its EMA) as a converted directory that ``load_model`` and
the pipelines read, and as official-format safetensors (``cascade_jax.weights.export``)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from cascade_jax import storage
from cascade_jax.models.unet import CascadeUNet
from cascade_jax.models.unet_stack import unstack_units
from cascade_jax.nn.params import named_variables
from cascade_jax.weights import checkpoint
from cascade_jax.weights.export import export_official


def generator_arrays(graphdef, params, frozen) -> dict[str, np.ndarray]:
    """The generator's ``{official key: host array}`` with ``params`` (trained or EMA) merged in."""
    modules = nnx.merge(graphdef, jax.device_get(params), jax.device_get(frozen))
    if isinstance(modules.generator, CascadeUNet):  # scan_blocks trained it stacked; official keys are per block
        unstack_units(modules.generator)
    return {k: np.asarray(v[...]) for k, v in named_variables(modules.generator).items()}


def export_generator(out_dir, model_name: str, config: dict, arrays: dict, *, safetensors_dtype="bfloat16",
                     overwrite: bool = True) -> tuple[Path, Path]:
    """Write ``out_dir`` (converted directory) and ``out_dir.safetensors`` (official names and layouts)."""
    out_dir = out_dir if storage.is_url(out_dir) else Path(out_dir)
    dtype = str(next(iter(arrays.values())).dtype) if arrays else "float32"
    meta = {"model": model_name, "config": config, "dtype": dtype, "source": {"path": "cascade_jax training"}}
    checkpoint.save(out_dir, meta, arrays, overwrite=overwrite)
    file = storage.with_suffix(out_dir, ".safetensors") if storage.is_url(out_dir) else out_dir.with_suffix(".safetensors")
    export_official(out_dir, file, dtype=safetensors_dtype)
    return out_dir, file
