"""Opening a checkpoint source: one safetensors file, several shards, or a folder of them."""

from __future__ import annotations

import json
from pathlib import Path

from cascade_jax.weights.safetensors_io import SafetensorsReader


class ShardedReader:
    """Several safetensors files seen as one key space (diffusers shards its large models)."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        self._readers = [SafetensorsReader(p) for p in self.paths]
        self._owner = {}
        for reader in self._readers:
            for key in reader.keys():
                if key in self._owner:
                    raise ValueError(f"tensor {key!r} appears in both {self._owner[key].path} and {reader.path}")
                self._owner[key] = reader

    def keys(self):
        return list(self._owner)

    def shape(self, key):
        return self._owner[key].shape(key)

    def dtype(self, key):
        return self._owner[key].dtype(key)

    def get(self, key):
        return self._owner[key].get(key)

    def release(self, key):
        self._owner[key].release(key)

    def __repr__(self):
        return ", ".join(str(p) for p in self.paths)


def safetensors_files(src) -> list[Path]:
    """The safetensors file(s) that ``src`` names: a file, a ``*.safetensors.index.json``, or a folder."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    if src.is_file() and src.name.endswith(".index.json"):
        weight_map = json.loads(src.read_text()).get("weight_map", {})
        return [src.parent / name for name in sorted(set(weight_map.values()))]
    if src.is_file():
        return [src]
    indexes = sorted(src.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return safetensors_files(indexes[0])
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src}: the folder holds no .safetensors file")
    if len(files) > 1:
        raise ValueError(f"{src}: several .safetensors files and no index.json ({[f.name for f in files]}); "
                         "pass the file to convert")
    return files


def open_source(src) -> ShardedReader:
    return ShardedReader(safetensors_files(src))


def folder_config(src) -> dict | None:
    """The ``config.json`` beside a diffusers/transformers checkpoint, if there is one."""
    src = Path(src)
    folder = src if src.is_dir() else src.parent
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None
