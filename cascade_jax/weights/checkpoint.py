"""A converted model directory: ``cascade_model.json`` (model, config, dtypes) + ``weights/`` (Orbax).

Checkpoint arrays are keyed by official PyTorch names and stored in our layout, so a
directory can be restored straight into any sharding and exported back exactly.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from cascade_jax import storage
from cascade_jax.models.registry import abstract_model
from cascade_jax.nn.params import named_variables
from cascade_jax.sharding import logical_sharding, make_mesh
from cascade_jax.storage import atomic
from cascade_jax.weights.dtypes import parse_dtype

META_FILE = "cascade_model.json"
WEIGHTS_DIR = "weights"
# 2: per-tensor checksums in the metadata. Version 1 directories still load (unverified).
FORMAT_VERSION = 2


class CheckpointError(ValueError):
    """A converted model directory that cannot be read as written (damaged, incomplete or too new)."""


def save(out_dir, meta: dict, arrays: dict, *, overwrite: bool = False):
    """Write the directory atomically: everything goes to a hidden sibling, then one rename.

    ``overwrite`` replaces only a directory this project wrote (it holds ``cascade_model.json`` and
    nothing foreign); the old one is renamed aside before the new one takes its place, then removed.
    A per-tensor CRC32 goes into the metadata; :func:`load_model` checks it. ``out_dir`` may be a gs:// URL
    (see :func:`_save_remote`).
    """
    if storage.is_url(out_dir):
        return _save_remote(out_dir, meta, arrays, overwrite=overwrite)
    out_dir = check_output(out_dir, overwrite=overwrite)
    meta = {"format_version": FORMAT_VERSION, **meta, "checksums": {k: checksum(v) for k, v in arrays.items()}}
    with atomic.replacing(out_dir, fsync=True) as tmp:
        tmp.mkdir()
        checkpointer = _host_array_checkpointer()
        try:
            checkpointer.save(tmp / WEIGHTS_DIR, args=ocp.args.PyTreeSave(arrays))
        finally:
            checkpointer.close()  # its writer threads stop before the cleanup
        meta["file_sizes"] = _file_sizes(tmp / WEIGHTS_DIR)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))


def check_output(out_dir, *, overwrite: bool, advice: str | None = None) -> Path:
    """``out_dir`` resolved, or a clear error now (before minutes of work) if it cannot be written.

    ``advice`` replaces the convert-specific advice (its --output / --overwrite flags) for other callers."""
    if storage.is_url(out_dir):
        return _check_remote_output(out_dir, overwrite=overwrite)
    out_dir = Path(out_dir).resolve()
    if os.path.lexists(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} already exists; {advice or 'remove it or pass overwrite=True (--overwrite)'}")
        _check_replaceable(out_dir, advice)
    existing = next(p for p in (out_dir.parent, *out_dir.parent.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {out_dir}: {existing} is not a writable folder; "
                              f"{advice or 'choose another output'}")
    return out_dir


def _save_remote(out_dir: str, meta: dict, arrays: dict, *, overwrite: bool):
    """A directory in a bucket, which has no rename: Orbax writes ``weights/`` in place (its commit file marks
    it complete), then ``cascade_model.json``, written last in one PUT, makes it a converted directory.
    Replacing one removes its ``cascade_model.json`` first, so an interrupted write is never read as one."""
    out_dir = _check_remote_output(out_dir, overwrite=overwrite)
    meta = {"format_version": FORMAT_VERSION, **meta, "checksums": {k: checksum(v) for k, v in arrays.items()}}
    meta_url, weights = storage.join(out_dir, META_FILE), storage.join(out_dir, WEIGHTS_DIR)
    storage.remove(meta_url)
    storage.remove(weights, recursive=True)
    checkpointer = _host_array_checkpointer()
    try:
        checkpointer.save(weights, args=ocp.args.PyTreeSave(arrays))
    finally:
        checkpointer.close()
    meta["file_sizes"] = {rel: st["size"] for rel, st in storage.listing(weights).items()}
    storage.write_text(meta_url, json.dumps(meta, indent=1))


def _check_remote_output(out_dir: str, *, overwrite: bool) -> str:
    """As :func:`check_output` for a URL: the bucket writable, an existing directory replaced only with
    ``overwrite`` and only when it holds nothing but what convert writes."""
    out_dir = storage.orbax_path(out_dir, "converted model directory")
    storage.check_writable(storage.parent(out_dir), "output")
    present = storage.listing(out_dir)
    if not present:
        return out_dir
    foreign = sorted({rel.split("/")[0] for rel in present} - {META_FILE, WEIGHTS_DIR})
    if foreign:
        raise FileExistsError(f"{out_dir} holds files convert did not write ({foreign[:5]}); refusing to replace it. "
                              "Choose a new --output")
    if not overwrite:
        state = "already exists" if META_FILE in present else f"holds an interrupted earlier write (no {META_FILE})"
        raise FileExistsError(f"{out_dir} {state}; pass overwrite=True (--overwrite) to replace it")
    return out_dir


def _check_replaceable(out_dir: Path, advice: str | None = None):
    """Refuse to replace anything but a converted model directory: --overwrite once emptied '.'."""
    ours = {META_FILE, WEIGHTS_DIR}
    if out_dir.is_symlink() or not out_dir.is_dir() or not (out_dir / META_FILE).is_file():
        raise FileExistsError(f"{out_dir} exists and is not a converted model directory (no {META_FILE}); "
                              + (advice or "--overwrite only replaces what convert wrote. Choose a new --output"))
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in ours)
    if foreign:
        raise FileExistsError(f"{out_dir} holds files convert did not write ({foreign[:5]}); refusing to replace "
                              f"it. {advice or 'Move them away or choose a new --output'}")
    if Path.cwd().resolve().is_relative_to(out_dir):
        raise FileExistsError(f"{out_dir} contains the working directory; refusing to replace it")


def _file_sizes(weights: Path) -> dict[str, int]:
    return {p.relative_to(weights).as_posix(): p.stat().st_size for p in sorted(weights.rglob("*")) if p.is_file()}


def weights_path(model_dir):
    """The Orbax checkpoint of a converted directory: a local Path, or a gs:// URL read in place."""
    if storage.is_url(model_dir):
        return storage.join(storage.orbax_path(model_dir, "converted model directory"), WEIGHTS_DIR)
    return Path(model_dir).resolve() / WEIGHTS_DIR


def _check_files(path, expected: dict | None):
    """Truncated or missing files fail here, by name, instead of as Orbax read errors mid-restore."""
    if storage.is_url(path):
        found = {rel: st["size"] for rel, st in storage.listing(path).items()} if expected else {}
    for name, size in (expected or {}).items():
        file = None if storage.is_url(path) else path / name
        actual = found.get(name) if file is None else (file.stat().st_size if file.is_file() else None)
        if actual != size:
            state = "is missing" if actual is None else f"has {actual} bytes, {size} were written"
            raise CheckpointError(f"{path}: {name} {state} (a damaged or incomplete copy); convert the model again")


def checksum(array) -> int:
    """CRC32 of the array's bytes (about 4 GB/s: a 7 GB Stage C costs ~2 s)."""
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return zlib.crc32(data)


def _host_array_checkpointer() -> ocp.Checkpointer:
    """A synchronous Orbax writer for numpy arrays that neither copies them nor compresses them.

    The default handler deep-copies every host array before an async save and zstd-compresses
    it, which made conversion hold ~2.7x the output in memory and take ~3x longer (see
    benchmarks/). The on-disk layout is the standard one: ``load_model`` restores it as usual.
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_without_array_metadata_warning)
    try:
        return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry))
    finally:
        absl_logger.removeFilter(_without_array_metadata_warning)


def _without_array_metadata_warning(record: logging.LogRecord) -> bool:
    """Drops Orbax's "No jax.Array in TypeHandlerRegistry: ArrayMetadata persistence is disabled" warning,
    which a registry of numpy handlers only (this writer's, on purpose) triggers on every save."""
    return not str(record.msg).startswith("No jax.Array in TypeHandlerRegistry")


META_KEYS = {"model": str, "config": dict, "dtype": str}


def read_meta(model_dir) -> dict:
    """The checked contents of ``cascade_model.json``; every defect is one error naming the file."""
    path = storage.join(model_dir, META_FILE)
    if not storage.isfile(path):
        raise FileNotFoundError(f"{model_dir} is not a converted model directory (no {META_FILE}); "
                                "create one with convert/convert.py")
    try:
        meta = json.loads(storage.read_text(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({e}); convert the model again") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is damaged (a JSON object was expected); convert the model again")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: missing or invalid format_version {version!r}; convert the model again")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} is newer than this cascade-jax reads "
                              f"({FORMAT_VERSION}); upgrade cascade-jax or convert with this version")
    for key, kind in META_KEYS.items():
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path}: {key!r} is missing or not a {kind.__name__} ({meta.get(key)!r}); "
                                  "convert the model again")
    return meta


def _sharding_for(sharding, key, var, rules=None):
    if sharding is None:
        return None
    if isinstance(sharding, jax.sharding.Mesh):
        return logical_sharding(var, sharding, rules)
    if isinstance(sharding, jax.sharding.Sharding):
        return sharding
    return sharding(key, var)


def _check_sharding(sharding):
    if sharding is None or isinstance(sharding, (jax.sharding.Mesh, jax.sharding.Sharding)) or callable(sharding):
        return
    raise TypeError(f"sharding={sharding!r} is not understood: pass None, a jax.sharding.Sharding, a Mesh, or a "
                    "callable (key, variable) -> Sharding")


def load_model(model_dir, dtype=None, sharding=None, *, rules: dict | None = None,
               verify: bool = True) -> nnx.Module:
    """Build the model saved in ``model_dir`` and restore its weights.

    ``dtype`` ('float32' / 'bfloat16') casts the parameters (BatchNorm statistics stay float32).
    ``sharding``: None (default device), one ``jax.sharding.Sharding`` for every array, a ``Mesh`` or a
    ``make_mesh`` spec such as ``"fsdp=4,tensor=2"`` (every variable placed by its logical axes and ``rules``,
    default ``cascade_jax.sharding.DEFAULT_RULES``, as in training), or a callable ``(key, variable) -> Sharding``. Arrays are restored directly into that
    layout: each device reads only its shards, nothing is materialised whole on one device.
    ``verify`` checks every tensor restored in its stored dtype (all of them unless ``dtype`` casts) against
    the checksum written at conversion (CRC32, ~4 GB/s; arrays spread over several hosts are not checked)
    and raises :class:`CheckpointError` on a mismatch.
    """
    if isinstance(sharding, (str, dict)):
        sharding = make_mesh(sharding)  # "fsdp=4,tensor=2" or {"fsdp": 4, "tensor": 2}: over all devices
    _check_sharding(sharding)
    if rules is not None and not isinstance(sharding, jax.sharding.Mesh):
        raise TypeError(f"rules={rules!r} need sharding= a Mesh (they map logical axes to its axes), "
                        f"got {sharding!r}")
    meta = read_meta(model_dir)
    model = abstract_model(meta["model"], meta["config"])
    variables = named_variables(model)
    param_dtype = parse_dtype(dtype or meta["dtype"])
    path = weights_path(model_dir)
    _check_files(path, meta.get("file_sizes"))
    stored = _stored_metadata(path)
    _check_stored(path, stored, variables)
    target = {}
    for key, var in variables.items():
        var_dtype = stored[key].dtype
        if isinstance(var, nnx.Param) and jnp.issubdtype(var_dtype, jnp.floating):
            var_dtype = param_dtype  # Orbax casts while reading: no second copy in the stored dtype
        target[key] = jax.ShapeDtypeStruct(var.shape, var_dtype, sharding=_sharding_for(sharding, key, var, rules))
    restored = _read(path, target)
    checksums = meta.get("checksums") if verify else None
    for key, var in variables.items():
        value = restored[key] if isinstance(restored[key], jax.Array) else jnp.asarray(restored[key])
        if checksums is not None and value.dtype == stored[key].dtype:
            _verify(path, key, value, checksums.get(key))
        var.set_value(value)
    return model


def _verify(path, key, value: jax.Array, expected):
    if expected is None:
        raise CheckpointError(f"{path}: no checksum recorded for {key}; the metadata is damaged, convert again")
    if not value.is_fully_addressable:
        return
    if checksum(np.asarray(jax.device_get(value))) != expected:
        raise CheckpointError(f"{path}: tensor {key} does not match the checksum written at conversion (the "
                              "files are damaged); convert the model again")


def _stored_metadata(path) -> dict:
    if not (storage.isdir(path) if storage.is_url(path) else (path.is_dir() and any(path.iterdir()))):
        raise CheckpointError(f"{path}: the Orbax checkpoint is missing or empty; convert the model again")
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
            tree = checkpointer.metadata(path).item_metadata
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: the Orbax checkpoint metadata cannot be read ({type(e).__name__}: {e}); "
                              "convert the model again") from e
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict) or not tree:
        raise CheckpointError(f"{path}: the Orbax checkpoint metadata is missing or damaged; convert the model again")
    return tree


def _check_stored(path: Path, stored: dict, variables: dict):
    missing, extra = set(variables) - set(stored), set(stored) - set(variables)
    if missing or extra:
        raise CheckpointError(f"{path}: checkpoint does not match the model config; missing {sorted(missing)[:10]}, "
                              f"unexpected {sorted(extra)[:10]}")
    bad = [f"{k}: stored {tuple(stored[k].shape)}, model {tuple(v.shape)}" for k, v in variables.items()
           if tuple(stored[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{path}: shapes differ from the model config: {bad[:10]}")


def _read(path: Path, target: dict) -> dict:
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
            return checkpointer.restore(path, args=ocp.args.StandardRestore(target))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: the Orbax checkpoint cannot be read ({type(e).__name__}: {e}); "
                              "convert the model again") from e


def load_arrays(model_dir) -> dict[str, np.ndarray]:
    """All stored arrays as numpy, in their stored dtype (for export), checked against their checksums."""
    meta = read_meta(model_dir)
    path = weights_path(model_dir)
    _check_files(path, meta.get("file_sizes"))
    stored = _stored_metadata(path)
    target = {k: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) for k, m in stored.items()}
    arrays = {k: np.asarray(v) for k, v in _read(path, target).items()}
    checksums = meta.get("checksums")
    for key, value in arrays.items() if checksums is not None else ():
        if checksum(value) != checksums.get(key):
            raise CheckpointError(f"{path}: tensor {key} does not match the checksum written at conversion; "
                                  "convert the model again")
    return arrays
