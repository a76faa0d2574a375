"""Constructor arguments of a model from what a user gives: a dict, a preset, a file, or the
``config.json`` of a diffusers/transformers folder (translated to the official names)."""

from __future__ import annotations

from cascade_jax.models.clip import text_kwargs_from_hf_config, vision_kwargs_from_hf_config
from cascade_jax.models.registry import list_presets, load_config
from cascade_jax.weights.diffusers_unet import official_config_from_diffusers
from cascade_jax.weights.diffusers_vq import stage_a_config_from_paella
from cascade_jax.weights.sources import folder_config

# Third-party config dicts (a diffusers/transformers config.json) -> official constructor kwargs,
# keyed by the "_class_name" (diffusers) or "model_type" (transformers) field.
CONFIG_TRANSLATORS = {
    "StableCascadeUNet": official_config_from_diffusers,
    "PaellaVQModel": stage_a_config_from_paella,
    "clip_text_model": text_kwargs_from_hf_config,
    "clip_vision_model": vision_kwargs_from_hf_config,
}


def translate_config(config: dict) -> dict:
    """Official kwargs from ``config``; third-party configs are recognised by their class field."""
    for field in ("_class_name", "model_type"):
        name = config.get(field)
        if name is not None:
            if name not in CONFIG_TRANSLATORS:
                raise ValueError(f"config of class {name!r} cannot be translated; known: {sorted(CONFIG_TRANSLATORS)}")
            return CONFIG_TRANSLATORS[name](config)
    return config


def resolve_config(model_name: str, config, src=None) -> dict:
    """Constructor kwargs for ``model_name`` from a dict, a preset name, a file, or (None) the
    ``config.json`` beside ``src``."""
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
