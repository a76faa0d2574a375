"""A converted model directory: ``cascade_model.json`` (model, config, dtypes) + ``weights/`` (Orbax).

Checkpoint arrays are keyed by official PyTorch names and stored in our layout, so a
directory can be restored straight into any sharding and exported back exactly.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from cascade_jax.models.registry import abstract_model
from cascade_jax.nn.params import named_variables
from cascade_jax.sharding import logical_sharding
from cascade_jax.weights.dtypes import parse_dtype

META_FILE = "cascade_model.json"
WEIGHTS_DIR = "weights"
FORMAT_VERSION = 1


def save(out_dir, meta: dict, arrays: dict, *, overwrite: bool = False):
    """Write the directory atomically: everything goes to a sibling temp folder, then one rename."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; remove it or pass overwrite=True (--overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _host_array_checkpointer().save(tmp / WEIGHTS_DIR, args=ocp.args.PyTreeSave(arrays))
        (tmp / META_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _host_array_checkpointer() -> ocp.Checkpointer:
    """A synchronous Orbax writer for numpy arrays that neither copies them nor compresses them.

    The default handler deep-copies every host array before an async save and zstd-compresses
    it, which made conversion hold ~2.7x the output in memory and take ~3x longer (see
    benchmarks/). The on-disk layout is the standard one: ``load_model`` restores it as usual.
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry))


def read_meta(model_dir) -> dict:
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a converted model directory (no {META_FILE}); "
                                "create one with convert/convert.py")
    return json.loads(path.read_text())


def _sharding_for(sharding, key, var):
    if sharding is None:
        return None
    if isinstance(sharding, jax.sharding.Mesh):
        return logical_sharding(var, sharding)
    if isinstance(sharding, jax.sharding.Sharding):
        return sharding
    return sharding(key, var)


def load_model(model_dir, dtype=None, sharding=None) -> nnx.Module:
    """Build the model saved in ``model_dir`` and restore its weights.

    ``dtype`` ('float32' / 'bfloat16') casts the parameters (BatchNorm statistics stay float32).
    ``sharding``: None (default device), one ``jax.sharding.Sharding`` for every array, a ``Mesh``
    (parameters placed by their logical axes, see ``cascade_jax.sharding``), or a callable
    ``(key, variable) -> Sharding``. Arrays are restored directly into that layout.
    """
    meta = read_meta(model_dir)
    model = abstract_model(meta["model"], meta["config"])
    variables = named_variables(model)
    param_dtype = parse_dtype(dtype or meta["dtype"])
    target = {}
    for key, var in variables.items():
        var_dtype = var.dtype
        if isinstance(var, nnx.Param) and jnp.issubdtype(var_dtype, jnp.floating):
            var_dtype = param_dtype
        target[key] = jax.ShapeDtypeStruct(var.shape, var_dtype, sharding=_sharding_for(sharding, key, var))
    restored = _restore(model_dir, target)
    for key, var in variables.items():
        value = restored[key]
        var.set_value(value if isinstance(value, jax.Array) else jnp.asarray(value))
    return model


def _restore(model_dir, target: dict) -> dict:
    path = Path(model_dir).resolve() / WEIGHTS_DIR
    stored = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    missing, extra = set(target) - set(stored), set(stored) - set(target)
    if missing or extra:
        raise ValueError(f"{path}: checkpoint does not match the model config; missing {sorted(missing)[:10]}, "
                         f"unexpected {sorted(extra)[:10]}")
    bad = [f"{k}: stored {tuple(stored[k].shape)}, model {t.shape}" for k, t in target.items()
           if tuple(stored[k].shape) != tuple(t.shape)]
    if bad:
        raise ValueError(f"{path}: shapes differ from the model config: {bad[:10]}")
    return ocp.StandardCheckpointer().restore(path, target)


def load_arrays(model_dir) -> dict[str, np.ndarray]:
    """All stored arrays as numpy, in their stored dtype (for export)."""
    path = Path(model_dir).resolve() / WEIGHTS_DIR
    stored = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    target = {k: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) for k, m in stored.items()}
    return {k: np.asarray(v) for k, v in ocp.StandardCheckpointer().restore(path, target).items()}
