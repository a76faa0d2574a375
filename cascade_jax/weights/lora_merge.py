"""Merge LoRA files into a converted Stage C directory, and convert LoRA files between formats.

Merging streams the stored arrays: only the adapted weights are recomputed (with the same code
as the run-time LoRA, so the merged directory samples exactly like the LoRA applied at run time),
everything else is written back untouched. The output is a normal converted directory
(``cascade_jax.load_model``), written atomically.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np

from cascade_jax.models.lora import adapted_weights, check_strength
from cascade_jax.weights.lora_weights import attach_lora
from cascade_jax.models.registry import abstract_model, load_config
from cascade_jax.weights import checkpoint
from cascade_jax.weights.lora_files import load_lora, model_config_of, save_lora


MERGEABLE = ("stage_c", "stage_b")  # the registry names of the two diffusion stages (any size)


def merge_loras_into_directory(model_dir, loras, out_dir, *, overwrite: bool = False):
    """``loras``: [(path, strength), ...]; writes ``out_dir`` and returns it. Each strength is checked (finite,
    within +-MAX_STRENGTH) before any work, and a merged weight that is not finite is never written."""
    loras = [(path, check_strength(f"LoRA {path} strength", strength)) for path, strength in loras]
    meta = checkpoint.read_meta(model_dir)
    if meta["model"] not in MERGEABLE:
        raise ValueError(f"{model_dir} holds {meta['model']!r}; LoRAs apply to a Stage C or Stage B directory "
                         "(a Stage B LoRA: an LCM-LoRA from stage b_lcm)")
    model = abstract_model(meta["model"], meta["config"])
    for i, (path, strength) in enumerate(loras):
        lora = load_lora(path, model)
        if lora.tokens is not None:
            warnings.warn(f"{path} also trains {len(lora.tokens.indices)} token rows of the text encoder; a Stage C "
                          "directory cannot hold them: sample with the LoRA file (--lora) to use its tokens")
        attach_lora(model, f"lora_{i}", lora, strength)
    arrays = checkpoint.load_arrays(model_dir)
    for key, weight in adapted_weights(model):
        weight.original.set_value(jnp.asarray(arrays[key]))
        arrays[key] = np.asarray(weight.compute())
        if not np.isfinite(arrays[key].astype(np.float32)).all():
            raise ValueError(f"merging {[f'{p}:{s:g}' for p, s in loras]} makes {key} overflow to NaN or inf; "
                             f"lower the strengths. Nothing was written to {out_dir}")
    out_meta = {k: v for k, v in meta.items() if k != "format_version"}
    out_meta["loras"] = [{"path": str(p), "strength": float(s)} for p, s in loras]
    checkpoint.save(out_dir, out_meta, arrays, overwrite=overwrite)
    return out_dir


def model_for_lora(lora_path, model_dir=None, config=None):
    """(abstract Stage C, {"model", "config"}) from a converted directory, a preset/config, or the
    file's own metadata (files written here record the model they were made for)."""
    if model_dir is not None:
        meta = checkpoint.read_meta(model_dir)
        name, kwargs = meta["model"], meta["config"]
    elif config is not None:
        name, kwargs = load_config(config)
        name = name or "stage_c"
    else:
        recorded = model_config_of(lora_path)
        if recorded is None:
            raise ValueError(f"{lora_path} does not record its model: pass --model DIR or --config PRESET "
                             "(stage_c for 3.6B, stage_c_lite for 1B)")
        name, kwargs = recorded["model"], recorded["config"]
    return abstract_model(name, kwargs), {"model": name, "config": kwargs}


def convert_lora_file(src, dst, fmt: str, *, model_dir=None, config=None):
    model, model_config = model_for_lora(src, model_dir, config)
    lora = load_lora(src, model)
    save_lora(dst, lora, fmt=fmt, model=model, model_config=model_config)
    return dst
