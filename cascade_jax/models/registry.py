"""Model names used by the converter, presets and ``load_model``."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import jax
import yaml
from flax import nnx

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
}

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESETS_DIR = REPO_ROOT / "configs" / "models"


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
    try:
        return nnx.eval_shape(lambda: cls(**config, rngs=_ConstantKeys()))
    except TypeError as e:
        raise ValueError(f"config does not fit model {name!r} ({cls.__name__}): {e}") from e


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


# Third-party config dicts (a diffusers/transformers config.json) -> official constructor kwargs,
# keyed by the "_class_name" (diffusers) or "model_type" (transformers) field.
CONFIG_TRANSLATORS = {
    "StableCascadeUNet": "cascade_jax.weights.diffusers_unet:official_config_from_diffusers",
    "PaellaVQModel": "cascade_jax.weights.diffusers_vq:stage_a_config_from_paella",
    "clip_text_model": "cascade_jax.models.clip:text_kwargs_from_hf_config",
    "clip_vision_model": "cascade_jax.models.clip:vision_kwargs_from_hf_config",
}


def _import(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def translate_config(config: dict) -> dict:
    """Official kwargs from ``config``; third-party configs are recognised by their class field."""
    for field in ("_class_name", "model_type"):
        name = config.get(field)
        if name is not None:
            if name not in CONFIG_TRANSLATORS:
                raise ValueError(f"config of class {name!r} cannot be translated; known: {sorted(CONFIG_TRANSLATORS)}")
            return _import(CONFIG_TRANSLATORS[name])(config)
    return config


def resolve_config(model_name: str, config, src=None) -> dict:
    """Constructor kwargs for ``model_name`` from a dict, a preset name, a file, or (None) the
    ``config.json`` beside ``src``."""
    from cascade_jax.weights.sources import folder_config

    if config is None:
        found = folder_config(src) if src is not None else None
        if found is None:
            raise ValueError(f"no config given for {model_name!r} and no config.json beside {src}; "
                             f"pass --config with a preset ({', '.join(list_presets())}) or a file")
        return translate_config(found)
    if isinstance(config, dict):
        return translate_config(dict(config))
    preset_model, kwargs = load_config(str(config))
    if preset_model is not None and preset_model != model_name:
        raise ValueError(f"config {config!r} is for model {preset_model!r}, not {model_name!r}")
    return translate_config(kwargs)
