"""A U-Net's structure read from its official tensor names and shapes: ResBlocks and widths per level.

Used by every model-mismatch message (a checkpoint, LoRA or resumed run that does not fit a
model), so the user sees both sides' actual sizes instead of a guess about released models. It
reads only names and torch-layout shapes, which a safetensors header, a converted directory's
metadata and an abstract model all give without loading weights.
"""

from __future__ import annotations

import re

# A ResBlock's depthwise conv: torch weight (c, 1, k, k), so its width is dim 0.
_RESBLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(\d+)\.depthwise\.weight$")


def unet_levels(shapes: dict[str, tuple]) -> dict[str, list[tuple[int, int]]]:
    """``{"down": [(ResBlocks, width) per level], "up": [...]}`` from ``{official key: torch shape}``."""
    found: dict[str, dict[int, list[int]]] = {"down": {}, "up": {}}
    for key, shape in shapes.items():
        match = _RESBLOCK.match(key)
        if match and len(shape) >= 1:
            found[match[1]].setdefault(int(match[2]), []).append(int(shape[0]))
    return {side: [(len(widths), widths[0]) for _, widths in sorted(levels.items())]
            for side, levels in found.items()}


def describe_unet(shapes: dict[str, tuple]) -> str:
    """``"ResBlocks per level: down [8, 24], up [24, 8]; widths [2048, 2048]"``, or ``""`` if not a U-Net."""
    levels = unet_levels(shapes)
    if not levels["down"] and not levels["up"]:
        return ""
    down, up = ([count for count, _ in levels[side]] for side in ("down", "up"))
    widths = [width for _, width in levels["down"] or levels["up"]]
    return f"ResBlocks per level: down {down}, up {up}; widths {widths}"


def model_shapes(model) -> dict[str, tuple]:
    """``{official key: torch-layout shape}`` of a model's ResBlock depthwise convs (what :func:`unet_levels`
    reads); works on abstract models. Our conv kernels are (kh, kw, in / groups, out), torch's (out, ...)."""
    from cascade_jax.nn.params import named_variables

    shapes = {}
    for key, var in named_variables(model).items():
        if _RESBLOCK.match(key):
            shape = tuple(var.shape)
            shapes[key] = (shape[-1], *shape[:-1]) if var.get_metadata().get("torch_layout") == "conv" else shape
    return shapes


def describe_lora_layers(keys_and_inputs: dict[str, int]) -> str:
    """What a LoRA's own keys say about the model it was made for: ``{official key: input width}`` ->
    ``"input widths [2048]; blocks up to down_blocks.0.23, up_blocks.0.23"``."""
    last: dict[tuple[str, int], int] = {}
    for key in keys_and_inputs:
        match = re.match(r"^(down|up)_blocks\.(\d+)\.(\d+)\.", key)
        if match:
            place = (match[1], int(match[2]))
            last[place] = max(last.get(place, 0), int(match[3]))
    blocks = ", ".join(f"{side}_blocks.{level}.{index}" for (side, level), index in sorted(last.items()))
    widths = sorted(set(keys_and_inputs.values()))
    return f"input widths {widths}" + (f"; blocks up to {blocks}" if blocks else "")
