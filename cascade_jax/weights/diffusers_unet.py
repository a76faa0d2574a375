"""diffusers ``StableCascadeUNet`` checkpoints and configs → official Stage B / Stage C.

diffusers keeps the official module tree except in two places (its own single-file converter,
``convert_stable_cascade_unet_single_file_to_diffusers``, is the inverse of this):

* attention: ``<block>.attention.to_q/to_k/to_v.{weight,bias}`` and ``to_out.0`` instead of the
  packed ``<block>.attention.attn.in_proj_{weight,bias}`` ([q; k; v] rows) and ``attn.out_proj``;
* Stage B's pooled-text mapper is ``clip_txt_pooled_mapper`` instead of ``clip_mapper``.

:mod:`cascade_jax.weights.formats` lists :data:`DIFFUSERS_STAGE_B` / :data:`DIFFUSERS_STAGE_C` (both
named ``"diffusers"``); :mod:`cascade_jax.weights.model_configs` uses the translator of diffusers'
``config.json`` (``_class_name: StableCascadeUNet``, see :func:`official_config_from_diffusers`).
"""

from __future__ import annotations

from cascade_jax.weights.recipes import Format, Recipe, concat_rows, take_only

_PACKED = ("to_q", "to_k", "to_v")
_ATTENTION_RENAMES = {"to_out.0.weight": "attn.out_proj.weight", "to_out.0.bias": "attn.out_proj.bias"}
_STAGE_B_RENAMES = {"clip_txt_pooled_mapper.weight": "clip_mapper.weight",
                    "clip_txt_pooled_mapper.bias": "clip_mapper.bias"}


def _split_attention_key(key: str):
    """``('down_blocks.0.2.attention', 'to_q.weight')`` for a diffusers attention key, else None."""
    head, sep, tail = key.rpartition(".attention.")
    return (head + ".attention", tail) if sep else None


def _has_split_attention(keys) -> bool:
    return any((parts := _split_attention_key(k)) is not None and parts[1].startswith(("to_q.", "to_out.0."))
               for k in keys)


def _attention_recipes(prefix: str, keys: set[str]) -> dict[str, Recipe]:
    recipes = {}
    for kind in ("weight", "bias"):
        sources = tuple(f"{prefix}.{p}.{kind}" for p in _PACKED)
        present = [s for s in sources if s in keys]
        if present and len(present) < 3:
            missing = sorted(set(sources) - set(present))
            raise KeyError(f"diffusers attention {prefix}: {missing} missing; q, k and v are packed together")
        if present:
            recipes[f"{prefix}.attn.in_proj_{kind}"] = Recipe(sources, concat_rows)
    return recipes


def _plan(keys: set[str], renames: dict[str, str]) -> dict[str, Recipe]:
    plan: dict[str, Recipe] = {}
    for key in sorted(keys):
        parts = _split_attention_key(key)
        if parts is not None and parts[1].split(".")[0] in _PACKED:
            plan.update(_attention_recipes(parts[0], keys))
        elif parts is not None and parts[1] in _ATTENTION_RENAMES:
            plan[f"{parts[0]}.{_ATTENTION_RENAMES[parts[1]]}"] = Recipe((key,), take_only)
        else:
            plan[renames.get(key, key)] = Recipe((key,), take_only)
    return plan


def plan_stage_c(keys: set[str]) -> dict[str, Recipe]:
    return _plan(keys, {})


def plan_stage_b(keys: set[str]) -> dict[str, Recipe]:
    return _plan(keys, _STAGE_B_RENAMES)


DIFFUSERS_STAGE_C = Format("diffusers", detect=_has_split_attention, plan=plan_stage_c)
# A Stage B without attention levels is still recognisable by its renamed pooled-text mapper.
DIFFUSERS_STAGE_B = Format("diffusers", plan=plan_stage_b,
                           detect=lambda keys: _has_split_attention(keys) or "clip_txt_pooled_mapper.weight" in keys)


# ---- config.json ------------------------------------------------------------------------------

# StableCascadeUNet.__init__ defaults (diffusers 0.42.1), for config.json files that omit keys.
DIFFUSERS_UNET_DEFAULTS = {
    "in_channels": 16, "out_channels": 16, "timestep_ratio_embedding_dim": 64, "patch_size": 1,
    "conditioning_dim": 2048, "block_out_channels": [2048, 2048], "num_attention_heads": [32, 32],
    "down_num_layers_per_block": [8, 24], "up_num_layers_per_block": [24, 8],
    "down_blocks_repeat_mappers": [1, 1], "up_blocks_repeat_mappers": [1, 1],
    "block_types_per_layer": [["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"]] * 2,
    "clip_text_in_channels": None, "clip_text_pooled_in_channels": 1280, "clip_image_in_channels": None,
    "clip_seq": 4, "effnet_in_channels": None, "pixel_mapper_in_channels": None, "kernel_size": 3,
    "dropout": [0.1, 0.1], "self_attn": True, "timestep_conditioning_type": ["sca", "crp"], "switch_level": None,
}
_BLOCK_LETTERS = {"SDCascadeResBlock": "C", "SDCascadeTimestepBlock": "T", "SDCascadeAttnBlock": "A"}


def diffusers_unet_model_name(config: dict) -> str:
    """'stage_b' for a decoder config (it has an EfficientNet mapper), else 'stage_c'."""
    return "stage_b" if config.get("effnet_in_channels") is not None else "stage_c"


def official_config_from_diffusers(config: dict) -> dict:
    """Official ``StageB``/``StageC`` constructor kwargs from a diffusers ``StableCascadeUNet`` config.

    Which model it is comes from :func:`diffusers_unet_model_name`. Raises ValueError for diffusers
    configurations the official classes cannot express (e.g. a prior without text/image mappers).
    """
    cfg = {**DIFFUSERS_UNET_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    levels = len(cfg["block_out_channels"])
    common = {
        "c_in": cfg["in_channels"], "c_out": cfg["out_channels"], "c_r": cfg["timestep_ratio_embedding_dim"],
        "patch_size": cfg["patch_size"], "c_cond": cfg["conditioning_dim"],
        "c_hidden": list(cfg["block_out_channels"]), "nhead": list(cfg["num_attention_heads"]),
        "blocks": [list(cfg["down_num_layers_per_block"]), list(cfg["up_num_layers_per_block"])],
        "block_repeat": [list(cfg["down_blocks_repeat_mappers"] or [1] * levels),
                         list(cfg["up_blocks_repeat_mappers"] or [1] * levels)],
        "level_config": [_level_letters(types) for types in cfg["block_types_per_layer"]],
        "c_clip_seq": cfg["clip_seq"], "kernel_size": cfg["kernel_size"],
        "dropout": cfg["dropout"], "self_attn": cfg["self_attn"],  # a scalar or per level, in both
        "t_conds": list(cfg["timestep_conditioning_type"]),
    }
    if diffusers_unet_model_name(cfg) == "stage_b":
        return {**common, **_stage_b_specific(cfg)}
    return {**common, **_stage_c_specific(cfg)}


def _stage_b_specific(cfg: dict) -> dict:
    unsupported = {k: cfg[k] for k in ("clip_text_in_channels", "clip_image_in_channels", "switch_level")
                   if cfg[k] is not None}
    if unsupported or cfg["pixel_mapper_in_channels"] is None:
        raise ValueError(f"diffusers decoder config is not an official StageB: it needs pixel_mapper_in_channels "
                         f"(got {cfg['pixel_mapper_in_channels']}) and no {sorted(unsupported)}")
    return {"c_clip": cfg["clip_text_pooled_in_channels"], "c_effnet": cfg["effnet_in_channels"],
            "c_pixels": cfg["pixel_mapper_in_channels"]}


def _stage_c_specific(cfg: dict) -> dict:
    if cfg["clip_text_in_channels"] is None or cfg["clip_image_in_channels"] is None:
        raise ValueError("diffusers prior config is not an official StageC: clip_text_in_channels and "
                         "clip_image_in_channels must both be set")
    if cfg["switch_level"] is None or cfg["pixel_mapper_in_channels"] is not None:
        raise ValueError("diffusers prior config is not an official StageC: it needs switch_level (official "
                         "StageC has no strided-conv rescaling) and no pixel_mapper_in_channels")
    return {"c_clip_text": cfg["clip_text_in_channels"], "c_clip_text_pooled": cfg["clip_text_pooled_in_channels"],
            "c_clip_img": cfg["clip_image_in_channels"], "switch_level": list(cfg["switch_level"])}


def _level_letters(block_types) -> str:
    unknown = [t for t in block_types if t not in _BLOCK_LETTERS]
    if unknown:
        raise ValueError(f"diffusers block types {unknown} have no official equivalent; known: {list(_BLOCK_LETTERS)}")
    return "".join(_BLOCK_LETTERS[t] for t in block_types)
