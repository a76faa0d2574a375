"""Model names used by the converter, presets and ``load_model``."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import yaml

# name -> "module:Class"; the class is constructed as Class(**official_config, rngs=...).
MODEL_CLASSES = {
    "stage_a": "cascade_jax.models.stage_a:StageA",
    "stage_b": "cascade_jax.models.stage_b:StageB",
    "stage_c": "cascade_jax.models.stage_c:StageC",
    "previewer": "cascade_jax.models.previewer:Previewer",
    "effnet": "cascade_jax.models.effnet:EfficientNetEncoder",
    "clip_text": "cascade_jax.models.clip:CLIPTextEncoder",
    "clip_vision": "cascade_jax.models.clip:CLIPVisionEncoder",
}

PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


def model_class(name: str):
    if name not in MODEL_CLASSES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_CLASSES)}")
    module, cls = MODEL_CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config(preset_or_file: str) -> tuple[str | None, dict]:
    """``(model name or None, constructor kwargs)`` from a preset name or a YAML/JSON file.

    A preset/file is either ``{model: NAME, config: {...}}`` or the bare constructor kwargs.
    """
    path = Path(preset_or_file)
    if not path.exists():
        path = PRESETS_DIR / f"{preset_or_file}.yaml"
        if not path.exists():
            raise FileNotFoundError(f"config {preset_or_file!r} is neither a file nor a preset; "
                                    f"presets: {list_presets()}")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of constructor arguments, got {type(data).__name__}")
    if "config" in data and isinstance(data["config"], dict):
        return data.get("model"), dict(data["config"])
    return None, data
