"""What a pipeline component *is*, independent of where it lies: a content digest, and copies that keep it.

Several weights folders may hold the same component (a Stage C export and a Stage B export both carry
the text encoder they trained with). They may be combined only when those copies are the same
weights, so every kind of component source gets a digest:

* a converted directory: its model, config and the per-tensor CRC32s written at conversion
  (``cascade_model.json``), so the digest costs no tensor read and a copy keeps it;
* a tokenizer folder: the bytes of the files the tokenizer reads (``TOKENIZER_FILES``);
* anything else (official safetensors, diffusers/transformers folders): the conversion cache's key
  over the content (size, header and sampled chunks of every file).

Two copies of one set of weights in different dtypes (a float32 and a bfloat16 conversion) are
different components here: the digest is of what is stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from cascade_jax.data.clip_tokenizer import TOKENIZER_FILES
from cascade_jax.weights.cache import source_key
from cascade_jax.weights.checkpoint import META_FILE, read_meta

# The record a trainer's export folder carries (``cascade_jax.training.export``): which run wrote it, what
# it trained, and where each component came from.
EXPORT_MANIFEST = "cascade_export.json"


def read_export_manifest(folder) -> dict | None:
    """The export record of ``folder`` (None if it has none); a damaged one is an error naming the file."""
    path = Path(folder) / EXPORT_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
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

    Converted directories and tokenizer folders are never modified in place (they are replaced by
    renaming a new copy over them), so a hard link is a copy that costs no space; across filesystems
    the files are copied. Symlinks inside ``src`` are refused: a copy must not point elsewhere."""
    src, dst = Path(src), Path(dst)
    links = [p for p in src.rglob("*") if p.is_symlink()]
    if src.is_symlink() or links:
        raise ValueError(f"{src}: holds symbolic links ({[str(p) for p in links[:3]]}); copy real files there first")

    def link_or_copy(source, target):
        try:
            os.link(source, target)
        except OSError:  # another filesystem, or links not permitted
            shutil.copy2(source, target)
        return target

    shutil.copytree(src, dst, copy_function=link_or_copy)
    return dst


def copy_tokenizer(src, dst) -> Path:
    """Copy the tokenizer files of the folder ``src`` (a tokenizer folder, or a transformers text-model folder
    that also holds weights) into the new folder ``dst``."""
    src, dst = Path(src), Path(dst)
    dst.mkdir()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst
