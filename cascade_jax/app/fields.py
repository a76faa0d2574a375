"""The page's fields (numbers as gradio sends them: floats, None for an empty box) as typed sampling
requests, and what the page shows about them (size hints, drawn masks)."""

from __future__ import annotations

import secrets

import numpy as np

from cascade_jax.pipelines.control_request import ControlNetRequest
from cascade_jax.pipelines.request import IMAGE_MODES, SamplingRequest
from cascade_jax.pipelines.sizes import check_image_size, nearest_valid, stage_b_latent_hw, stage_c_latent_hw
from cascade_jax.pipelines.stage_runner import SEED_LIMIT

PAGE_STAGE_KEYS = ("steps", "cfg", "sampler")  # the stage settings the page shows


def whole(value, name: str) -> int:
    """``value`` (a page number: 3.0 is 3) as an int, or a ValueError naming the field."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if number != int(number):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def pick_seed(seed, random_seed: bool, count: int) -> int:
    """The request's first seed: the field's, or a random one when "random seed" is ticked."""
    if random_seed:
        return secrets.randbelow(SEED_LIMIT - count + 1)
    if seed is None or float(seed) != int(float(seed)):
        raise ValueError(f"seed must be a whole number, got {seed!r}")
    return int(float(seed))


def image_count(mode: str, fields: dict) -> int:
    return int(fields.get("num_images") or 1) if mode in ("text2img", "variation") else 1


def stage_fields(stage: str, fields: dict) -> dict:
    """The stage's settings the page set (an empty box: the weights' default), as SamplerSettings changes."""
    changes = {}
    for key in PAGE_STAGE_KEYS:
        value = fields.get(f"{stage}_{key}")
        if value not in (None, ""):
            changes[key] = whole(value, f"{stage} steps") if key == "steps" else value
    return changes


def sampling_request(mode: str, fields: dict, *, seed: int, loras: list[str]) -> SamplingRequest:
    """The request of a generation tab (text2img, variation, img2img, reconstruct); checked by its ``check``."""
    if mode in IMAGE_MODES and not fields.get("image"):
        raise ValueError(f"{mode} needs an input image: upload one")
    size = {}
    if not (mode in IMAGE_MODES and fields.get("use_image_size")):
        size = dict(height=whole(fields.get("height"), "height"), width=whole(fields.get("width"), "width"))
    return SamplingRequest(mode, prompt=fields.get("prompt") or "",
                           negative_prompt=fields.get("negative_prompt") or None, image=fields.get("image") or None,
                           strength=float(fields.get("strength", SamplingRequest.strength)),
                           num_images=image_count(mode, fields), seed=seed, prior=stage_fields("prior", fields),
                           decoder=stage_fields("decoder", fields), loras=tuple(loras), **size)


def control_request(fields: dict, image: np.ndarray, mask: np.ndarray | None, *, seed: int) -> ControlNetRequest:
    """The ControlNet tab's request: the uploaded pixels, the page's steps and seed, official guidance."""
    size = {}
    if not fields.get("use_image_size"):
        size = dict(height=whole(fields.get("height"), "height"), width=whole(fields.get("width"), "width"))
    return ControlNetRequest(fields.get("control"), image_array=image, mask_array=mask,
                             prompt=fields.get("prompt") or "", negative_prompt=fields.get("negative_prompt") or None,
                             seed=seed, strength=float(fields.get("control_strength", ControlNetRequest.strength)),
                             prior_steps=whole(fields.get("prior_steps"), "prior steps"),
                             decoder_steps=whole(fields.get("decoder_steps"), "decoder steps"), **size)


def size_hint(height, width) -> str:
    """What the page says under the size fields: the latent sizes, or the nearest valid size."""
    try:
        height, width = int(height), int(width)
        check_image_size(height, width)
    except (TypeError, ValueError):
        try:
            nearest = f"{nearest_valid(int(height))}x{nearest_valid(int(width))}"
            return f"Not a valid size: the nearest valid size is {nearest}."
        except (TypeError, ValueError):
            return "Height and width must be whole numbers of pixels."
    (hc, wc), (hb, wb) = stage_c_latent_hw(height, width), stage_b_latent_hw(height, width)
    return f"{height}x{width}: Stage C latent {hc}x{wc}, Stage B latent {hb}x{wb}."


def mask_from_editor(value) -> np.ndarray | None:
    """A drawn mask (gradio's ImageMask value: background + layers) as a uint8 image, white = painted."""
    layers = [np.asarray(layer) for layer in (value or {}).get("layers") or [] if layer is not None]
    if not layers:
        return None
    painted = np.zeros(layers[0].shape[:2], bool)
    for layer in layers:
        painted |= (layer[..., 3] > 0) if layer.ndim == 3 and layer.shape[-1] == 4 else (layer.max(axis=-1) > 0)
    return painted.astype(np.uint8) * 255 if painted.any() else None


def image_from_editor(value) -> np.ndarray | None:
    background = (value or {}).get("background")
    if background is None:
        return None
    background = np.asarray(background)
    return background[..., :3].copy() if background.ndim == 3 else np.repeat(background[..., None], 3, axis=-1)
