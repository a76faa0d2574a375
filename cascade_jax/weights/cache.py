"""The conversion cache: weights converted on first use, reused by every later run.

An entry is a converted model directory under ``$CASCADE_JAX_CACHE`` (default ``~/.cache/cascade_jax``)
named by the component and a key over the source's *content* (each file's size, its safetensors
header and chunks sampled across it), the dtype and the model config: replacing a source file by
another with the same size and modification time still gives a new entry, and moving a file keeps
its entry.

Processes share entries safely: one file lock per entry, so a second process waits for the first
conversion and then reuses it; entries are published by one rename (see ``checkpoint.save``).
Entries are loaded with their checksums verified; a damaged one is rebuilt, with a message.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from cascade_jax.storage import atomic
from cascade_jax.weights.checkpoint import META_FILE, CheckpointError, load_model

SAMPLED_CHUNKS = 16
CHUNK_BYTES = 64 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024


def cache_root() -> Path:
    return Path(os.environ.get("CASCADE_JAX_CACHE", Path.home() / ".cache" / "cascade_jax"))


def _file_fingerprint(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}:".encode())
    with open(path, "rb") as f:
        head = f.read(8)
        digest.update(head)
        if path.suffix == ".safetensors" and len(head) == 8:
            digest.update(f.read(min(struct.unpack("<Q", head)[0], MAX_HEADER_BYTES)))
        for i in range(SAMPLED_CHUNKS):
            f.seek(max(0, (size - CHUNK_BYTES) * i // max(SAMPLED_CHUNKS - 1, 1)))
            digest.update(f.read(CHUNK_BYTES))


def source_key(src: Path, dtype: str, config: dict) -> str:
    """A key over the content of ``src`` (a file, or a folder's safetensors and JSON files), ``dtype`` and ``config``."""
    files = sorted(p for p in src.rglob("*") if p.suffix in (".safetensors", ".json") and p.is_file()) \
        if src.is_dir() else [src]
    digest = hashlib.sha256()
    for path in files:
        _file_fingerprint(path, digest)
    digest.update(f"|{dtype}|{json.dumps(config, sort_keys=True)}".encode())
    return digest.hexdigest()[:20]


def cached_model(src: Path, component: str, dtype: str, config: dict, convert: Callable[[Path], object], *,
                 sharding=None, rules: dict | None = None):
    """The model converted from ``src``: loaded from the cache, or converted by ``convert(entry_dir)`` first.
    ``sharding``/``rules``: the layout to restore into (see ``load_model``)."""
    entry = cache_root() / f"{component}-{source_key(src, dtype, config)}"
    if (entry / META_FILE).is_file():
        try:
            return load_model(entry, dtype=dtype, sharding=sharding, rules=rules)
        except CheckpointError:
            pass  # damaged, or being replaced right now: decide under the lock
    (entry.parent / ".locks").mkdir(parents=True, exist_ok=True)
    lock = FileLock(entry.parent / ".locks" / f"{entry.name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process converting {src} into {entry}", file=sys.stderr)
        lock.acquire()
    try:
        atomic.remove_stale_temps(entry.parent)
        if (entry / META_FILE).is_file():
            try:
                return load_model(entry, dtype=dtype, sharding=sharding, rules=rules)
            except CheckpointError as e:
                print(f"the cache entry {entry} is damaged ({e}); rebuilding it from {src}", file=sys.stderr)
        if os.path.lexists(entry) and not (entry / META_FILE).is_file():
            atomic.remove(entry)  # an entry without metadata can only be debris
        print(f"converting {src} -> {entry} (first use only)", file=sys.stderr)
        convert(entry)
    finally:
        lock.release()
    return load_model(entry, dtype=dtype, sharding=sharding, rules=rules)


def enable_compilation_cache(folder=None) -> Path | None:
    """Keep XLA's compiled programs in ``folder`` (default ``$CASCADE_JAX_CACHE/xla``) across processes,
    so a second ``generate.py`` run of the same shapes loads its programs instead of compiling them
    again (the demo's 50 s of compilation become ~2 s). Sampling scripts call this; the library never
    changes JAX's configuration by itself. ``CASCADE_JAX_COMPILATION_CACHE=0`` turns it off."""
    import jax

    if os.environ.get("CASCADE_JAX_COMPILATION_CACHE", "1") == "0":
        return None
    folder = Path(folder) if folder is not None else cache_root() / "xla"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home: compile every time rather than fail
        print(f"note: no compilation cache ({folder}: {e.strerror})", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return folder
