"""Local copies of remote files, for readers that need a local file (memory-mapped safetensors,
ArrayRecord) or a local folder (a tokenizer, a weights folder to convert).

Copies live under ``$CASCADE_JAX_CACHE/remote`` (default ``~/.cache/cascade_jax/remote``), keyed by the
URL and each object's generation/ETag and size: a replaced object is fetched again, an unchanged one
never. A copy is downloaded into a temp name and renamed, so a killed download is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cascade_jax.storage import files
from cascade_jax.storage.urls import is_url, join, local, name


def cache_root() -> Path:
    """``$CASCADE_JAX_CACHE`` (default ``~/.cache/cascade_jax``): converted weights, shard indexes, copies."""
    return Path(os.environ.get("CASCADE_JAX_CACHE", Path.home() / ".cache" / "cascade_jax"))


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _fetch(url: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
    try:
        files.download(url, tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def local_copy(path) -> Path:
    """``path`` itself when local; else a local copy of the object (or of every file under a prefix),
    fetched only if it changed."""
    if not is_url(path):
        return Path(local(path))
    try:
        st = files.stat(path)
    except IsADirectoryError:
        return mirror(str(path), files.listing(path))
    folder = cache_root() / "remote" / _key(str(path))
    target = folder / f"{_key(st['version'] + str(st['size']))}-{name(path)}"
    if not (target.is_file() and target.stat().st_size == st["size"]):
        _fetch(str(path), target)
        for old in folder.iterdir():  # earlier versions of the same URL
            if old != target and not old.name.startswith("."):
                old.unlink(missing_ok=True)
    return target


def mirror(prefix: str, wanted: dict[str, dict]) -> Path:
    """A local folder holding the files ``wanted`` (``{relative path: stat}`` from ``files.listing``) of the
    remote folder ``prefix``, each fetched only when its version changed since the last mirror."""
    folder = cache_root() / "remote" / _key(prefix.rstrip("/"))
    manifest_path = folder / ".versions.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = {}
    for relative in set(manifest) - set(wanted):  # files the folder no longer holds (or no longer needed)
        (folder / relative).unlink(missing_ok=True)
        manifest.pop(relative)
    for relative, st in sorted(wanted.items()):
        target = folder / relative
        stamp = f"{st['version']}:{st['size']}"
        if manifest.get(relative) != stamp or not target.is_file():
            _fetch(join(prefix, relative), target)
            manifest[relative] = stamp
            _write_manifest(manifest_path, manifest)  # after each file: an interrupted mirror resumes
    _write_manifest(manifest_path, manifest)
    return folder


def _write_manifest(path: Path, manifest: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".versions.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, path)
