"""Opening a checkpoint source: one safetensors file, several shards, or a folder of them."""

from __future__ import annotations

import json
from pathlib import Path

from cascade_jax.weights.safetensors_io import PICKLE_SUFFIXES, SafetensorsReader


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
        return index_shards(src)
    if src.is_file():
        return [src]
    indexes = sorted(src.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return safetensors_files(indexes[0])
    files = sorted(src.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in src.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        hint = (f"; it holds PyTorch pickles ({pickles[:3]}), which are never loaded: re-save them as safetensors "
                "with your own PyTorch (safetensors.torch.save_file)") if pickles else ""
        raise FileNotFoundError(f"{src}: the folder holds no .safetensors file{hint}")
    if len(files) > 1:
        raise ValueError(f"{src}: several .safetensors files and no index.json ({[f.name for f in files]}); "
                         "pass the file to convert")
    return files


def index_shards(index: Path) -> list[Path]:
    """The shard files a ``*.safetensors.index.json`` names; each must be a plain file name in its folder."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{index}: not a valid shard index ({e}); download it again") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
    shards = []
    for name in sorted(set(weight_map.values())):
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"{index}: shard {name!r} is outside the index's folder; an index may only name files "
                             "beside it")
        shards.append(index.parent / name)
    return shards


def open_source(src) -> ShardedReader:
    return ShardedReader(safetensors_files(src))


def folder_config(src) -> dict | None:
    """The ``config.json`` beside a diffusers/transformers checkpoint, if there is one."""
    src = Path(src)
    folder = src if src.is_dir() else src.parent
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); download it again") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of model settings, got {type(config).__name__}")
    return config
