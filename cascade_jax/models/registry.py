"""Model names used by the converter, presets and ``load_model``."""

from __future__ import annotations

import importlib
import importlib.resources
import json
from pathlib import Path

import jax
import yaml
from flax import nnx

from cascade_jax import storage
from cascade_jax.models.config_check import check_config
from cascade_jax.models.config_yaml import load_yaml

# name -> "module:Class"; the class is constructed as Class(**official_config, rngs=...).
MODEL_CLASSES = {
    "stage_a": "cascade_jax.models.stage_a:StageA",
    "stage_b": "cascade_jax.models.stage_b:StageB",
    "stage_c": "cascade_jax.models.stage_c:StageC",
    "previewer": "cascade_jax.models.previewer:Previewer",
    "effnet": "cascade_jax.models.effnet:EfficientNetEncoder",
    "clip_text": "cascade_jax.models.clip:CLIPTextEncoder",
    "clip_vision": "cascade_jax.models.clip:CLIPVisionEncoder",
    "controlnet": "cascade_jax.models.controlnet:ControlNet",
    "saliency": "cascade_jax.models.saliency:MicroResNet",
}


def configs_root() -> Path:
    """The ``configs/`` folder: shipped inside the installed package (setup.py copies the top-level
    ``configs/`` to ``cascade_jax/configs``), or the checkout's own for a source tree / editable install."""
    installed = Path(str(importlib.resources.files("cascade_jax"))) / "configs"
    if installed.is_dir():
        return installed
    checkout = Path(__file__).resolve().parents[2] / "configs"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"no configs/ folder in {installed} or {checkout}: the installation is incomplete; "
                            "reinstall cascade-jax (pip install .)")


def presets_dir() -> Path:
    return configs_root() / "models"


def model_class(name: str):
    if name not in MODEL_CLASSES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_CLASSES)}")
    return _import(MODEL_CLASSES[name])


class _ConstantKeys:
    """Stands in for ``nnx.Rngs`` when only shapes are wanted: every draw is the same key.

    Under ``nnx.eval_shape`` each ``nnx.Rngs`` draw updates a traced counter and flax probes
    the tracer's sharding, whose error message walks the whole trace: construction becomes
    quadratic in the number of parameters (about two minutes for the 3.6B Stage C, seconds here).
    """

    def params(self):
        return jax.random.key(0)


def abstract_model(name: str, config: dict) -> nnx.Module:
    """The model with shapes and metadata only (no memory), or a clear error when ``config`` cannot build it."""
    cls = model_class(name)
    check_config(cls, config, f"config does not fit model {name!r} ({cls.__name__})")
    try:
        return nnx.eval_shape(lambda: cls(**config, rngs=_ConstantKeys()))
    except (TypeError, ValueError, IndexError, KeyError) as e:
        raise ValueError(f"config does not fit model {name!r} ({cls.__name__}): {type(e).__name__}: {e}") from e


def list_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def load_config(preset_or_file: str) -> tuple[str | None, dict]:
    """``(model name or None, constructor kwargs)`` from a preset name or a YAML/JSON file.

    A preset/file is either ``{model: NAME, config: {...}}`` or the bare constructor kwargs; a file may be
    a bucket URL (read from a cached local copy).
    """
    path = storage.local_copy(preset_or_file) if storage.is_url(preset_or_file) else Path(preset_or_file)
    if not path.exists():
        path = presets_dir() / f"{preset_or_file}.yaml"
        if not path.exists():
            raise FileNotFoundError(f"config {preset_or_file!r} is neither a file nor a preset; "
                                    f"presets: {list_presets()}")
    data = read_config_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of constructor arguments, got {type(data).__name__}")
    if "config" in data and isinstance(data["config"], dict):
        return data.get("model"), dict(data["config"])
    return None, data


def read_config_file(path: Path):
    """The parsed YAML/JSON file, or a ValueError naming the file and the line of a syntax error."""
    try:
        text = path.read_text()
        return json.loads(text) if path.suffix == ".json" else load_yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({e}); "
                         "fix the file or pass another config") from e
    except IsADirectoryError as e:
        raise ValueError(f"{path} is a folder, not a config file") from e


def _import(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)
