"""What a pipeline component *is*, independent of where it lies: a content digest, and copies that keep it.

Several weights folders may hold the same component (a Stage C export and a Stage B export both carry
the text encoder they trained with). They may be combined only when those copies are the same
weights, so every kind of component source gets a digest:

* weights as released (official safetensors, diffusers/transformers folders): the conversion cache's
  key over their content (name, size, header and sampled chunks of every file);
* a directory converted from such weights: that same key of its source, recorded at conversion, so a
  trainer's copy of the text encoder it converted from ``stable-cascade/text_encoder/`` matches that
  folder itself (and two conversions of one file match whatever their dtypes);
* any other converted directory (trained weights, random test encoders): its model, config and the
  per-tensor CRC32s written when it was saved (``cascade_model.json``), so the digest costs no tensor
  read and a copy keeps it;
* a tokenizer folder: the bytes of the files the tokenizer reads (``TOKENIZER_FILES``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from cascade_jax import storage
from cascade_jax.data.clip_tokenizer import TOKENIZER_FILES
from cascade_jax.weights.cache import source_key
from cascade_jax.weights.checkpoint import META_FILE, read_meta

# The record a trainer's export folder carries (``cascade_jax.training.export``): which run wrote it, what
# it trained, and where each component came from.
EXPORT_MANIFEST = "cascade_export.json"


def read_export_manifest(folder) -> dict | None:
    """The export record of ``folder`` (a local path or a bucket URL; None if it has none); a damaged one is an
    error naming the file."""
    path = storage.join(folder, EXPORT_MANIFEST)
    if not storage.isfile(path):
        return None
    try:
        manifest = json.loads(storage.read_text(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e}); it records a trainer's export: export again") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object (a trainer's export record); export again")
    return manifest


def component_digest(path) -> str:
    """A hex digest of the weights (or tokenizer files) at ``path``; equal digests mean equal components."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return _converted_digest(path)
    if path.is_dir() and (path / "vocab.json").is_file():
        return files_digest(path, [path / name for name in TOKENIZER_FILES if (path / name).is_file()])
    return source_key(path, "", {})


def _converted_digest(path: Path) -> str:
    meta = read_meta(path)
    origin = (meta.get("source") or {}).get("content_key")
    if isinstance(origin, str):
        return origin  # converted from released weights: the same key as those weights themselves
    checksums = meta.get("checksums")
    if checksums is None:  # format 1 directories recorded no checksums: hash the stored files
        return folder_digest(path)
    identity = {"model": meta["model"], "config": meta["config"], "checksums": checksums}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def folder_digest(folder: Path) -> str:
    """sha256 over the relative names and bytes of every file under ``folder``."""
    return files_digest(folder, [p for p in Path(folder).rglob("*") if p.is_file()])


def files_digest(folder: Path, files) -> str:
    """sha256 over the names (relative to ``folder``) and bytes of ``files``."""
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(f"{file.relative_to(folder).as_posix()}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def copy_tree(src, dst) -> Path:
    """Copy the folder ``src`` to the new path ``dst``, hard-linking files where the filesystem allows.

    Converted directories are never modified in place (a new copy is renamed over an old one), so a hard
    link is a copy that costs no space; across filesystems the files are copied. Symbolic links are
    followed: the copy holds the files, not links to them."""
    def link_or_copy(source, target):
        try:
            os.link(source, target)  # follows a symlink to its file
        except OSError:  # another filesystem, or links not permitted
            shutil.copy2(source, target)
        return target

    shutil.copytree(src, dst, copy_function=link_or_copy)
    return Path(dst)


def copy_tokenizer(src, dst) -> Path:
    """Copy the tokenizer files of the folder ``src`` (a tokenizer folder, or a transformers text-model folder
    that also holds weights) into the new folder ``dst``."""
    src, dst = Path(src), Path(dst)
    dst.mkdir()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst
