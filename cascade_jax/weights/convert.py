"""PyTorch safetensors -> converted model directory (config + Orbax checkpoint).

Strict: every tensor the model needs must be in the file with the right shape, and every
tensor in the file must be used; otherwise nothing is written and the error lists them.
Streaming: source tensors are memory-mapped and converted one at a time, so peak memory is
about the size of the output.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from cascade_jax import storage
from cascade_jax.models.registry import abstract_model
from cascade_jax.models.structure import describe_unet
from cascade_jax.weights import checkpoint
from cascade_jax.weights.dtypes import parse_dtype  # noqa: F401  (also imported from here)
from cascade_jax.weights.formats import detect_format
from cascade_jax.weights.layout import torch_shape, torch_to_ours
from cascade_jax.weights.model_configs import resolve_config
from cascade_jax.weights.sources import open_source
from cascade_jax.weights.tree import named_variables



class ConversionError(ValueError):
    """The checkpoint does not fit the model; the message lists every offending tensor."""


def _describe(items, limit=25) -> str:
    items = sorted(items)
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return "\n    " + "\n    ".join(items[:limit]) + more


def _check_plan(model_name, src, fmt, plan, variables, reader):
    expected = {k: torch_shape(tuple(v.shape), v.get_metadata()["torch_layout"]) for k, v in variables.items()}
    used = {s for recipe in plan.values() for s in recipe.sources}
    missing = set(expected) - set(plan)
    unexpected = (set(plan) - set(expected)) | (set(reader.keys()) - used)
    misshaped = [f"{k}: file {reader.shape(k)}, model expects {expected[k]}" for k, r in plan.items()
                 if k in expected and r.sources == (k,) and reader.shape(k) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors the model needs are missing:{_describe(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors are not used by the model:{_describe(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} tensors have the wrong shape:{_describe(misshaped)}")
    if problems:
        raise ConversionError(
            f"{src} ({fmt.name} format) does not match model {model_name!r} with this config:\n  "
            + "\n  ".join(problems) + _structures(plan, expected, reader)
            + "\nCheck --model and --config (the config must describe the checkpoint's sizes).")
    return expected


def _structures(plan, expected, reader) -> str:
    """Both sides' ResBlocks and widths per level (U-Nets), so a size mismatch reads at a glance."""
    in_file = describe_unet({k: reader.shape(r.sources[0]) for k, r in plan.items() if len(r.sources) == 1})
    in_config = describe_unet(expected)
    if not in_file or not in_config or in_file == in_config:
        return ""
    return f"\n  the file: {in_file}\n  the config: {in_config}"


def check_source(model_name: str, config, src, fmt: str | None = None):
    """Check from the file's header alone (no tensor read) that ``src`` fits ``model_name`` with ``config``:
    a :class:`ConversionError` listing every offending tensor, or (reader, config, variables, format, plan,
    expected torch shapes) for the conversion."""
    reader = open_source(src)
    config = resolve_config(model_name, config, src)
    variables = named_variables(abstract_model(model_name, config))
    keys = set(reader.keys())
    source_format = detect_format(model_name, keys, fmt)
    plan = source_format.plan(keys)
    expected = _check_plan(model_name, src, source_format, plan, variables, reader)
    return reader, config, variables, source_format, plan, expected


def convert_checkpoint(model_name: str, config, src, out_dir, *, dtype="float32", fmt: str | None = None,
                       overwrite: bool = False):
    """Convert ``src`` (official or diffusers safetensors) into ``out_dir``; returns ``out_dir``.

    ``config`` is a dict of constructor arguments, a preset name or a YAML/JSON file.
    """
    target_dtype = parse_dtype(dtype)
    checkpoint.check_output(out_dir, overwrite=overwrite)
    origin, src = src, storage.local_copy(src)  # a file or folder in a bucket is converted from a local copy
    reader, config, variables, source_format, plan, expected = check_source(model_name, config, src, fmt)

    arrays, source_dtypes = {}, {}
    for key, var in variables.items():
        recipe = plan[key]
        torch_value = recipe.combine([reader.get(s) for s in recipe.sources])
        if tuple(torch_value.shape) != expected[key]:
            raise ConversionError(f"{src}: {key} assembled from {recipe.sources} has shape "
                                  f"{tuple(torch_value.shape)}, model expects {expected[key]}")
        value = torch_to_ours(np.asarray(torch_value), var.get_metadata()["torch_layout"])
        if np.issubdtype(var.dtype, np.floating):
            out_dtype = target_dtype if isinstance(var, nnx.Param) else np.float32
        else:
            out_dtype = var.dtype
        arrays[key] = value.astype(out_dtype, order="C")  # a C-ordered copy, never a view of the mmap
        for source in recipe.sources:
            reader.release(source)
        source_dtypes[key] = str(reader.dtype(recipe.sources[0]))
    meta = {"model": model_name, "config": config, "dtype": target_dtype.name,
            "source": {"path": str(origin), "format": source_format.name, "dtypes": source_dtypes}}
    checkpoint.save(out_dir, meta, arrays, overwrite=overwrite)
    return out_dir
