"""Converted model directory -> official-format safetensors (the inverse of convert)."""

from __future__ import annotations

import numpy as np

from cascade_jax.weights.checkpoint import load_arrays, read_meta
from cascade_jax.models.registry import abstract_model
from cascade_jax.weights.dtypes import parse_dtype
from cascade_jax.weights.layout import ours_to_torch
from cascade_jax.weights.safetensors_io import write_safetensors
from cascade_jax.weights.tree import named_variables


def export_official(model_dir, out_file, dtype=None):
    """Write ``out_file`` with official key names and PyTorch layouts.

    Each tensor gets the dtype it had in the source file (so official -> convert -> export is
    bit-exact when no precision was lost), unless ``dtype`` forces one for floating tensors.
    """
    meta = read_meta(model_dir)
    layouts = {k: v.get_metadata()["torch_layout"]
               for k, v in named_variables(abstract_model(meta["model"], meta["config"])).items()}
    arrays = load_arrays(model_dir)
    source_dtypes = meta.get("source", {}).get("dtypes", {})
    forced = parse_dtype(dtype) if dtype is not None else None

    def out_dtype(key):
        stored = arrays[key].dtype
        if forced is not None and np.issubdtype(stored, np.floating):
            return forced
        return np.dtype(source_dtypes.get(key, stored))

    specs = [(k, out_dtype(k), ours_to_torch(arrays[k], layouts[k]).shape) for k in sorted(arrays)]
    write_safetensors(out_file, specs, lambda k: ours_to_torch(arrays[k], layouts[k]).astype(out_dtype(k)),
                      metadata={"format": "pt", "exported_by": "cascade_jax", "model": meta["model"]})
    return out_file
