"""A LoRA as its file holds it, apart from any model: the factors of each adapted weight under its
official key, the token rows, and the ``module_filters`` / ``train_tokens`` it was trained with; checked
against a model (every mismatch named, with both shapes) and attached to it (``models.lora`` holds the
adapters themselves). ``weights/lora_files.py`` reads and writes it in the official and ComfyUI formats.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from cascade_jax.models.lora import DEFAULT_FILTERS, TokenDeltas, add_factors, all_targets, check_strength
from cascade_jax.models.structure import describe_lora_layers, describe_unet, model_shapes


@dataclasses.dataclass
class LoRAWeights:
    """A LoRA as plain arrays: ``layers`` maps the official key of each adapted weight (e.g.
    ``down_blocks.0.2.attention.attn.in_proj_weight``) to its factors, in official module order."""

    layers: dict
    tokens: TokenDeltas | None = None
    module_filters: tuple | None = DEFAULT_FILTERS
    train_tokens: list = dataclasses.field(default_factory=list)  # official [[token or regex, init regex]]


class LoRAMismatchError(ValueError):
    """A LoRA that does not fit the model; the message names each offending key and both shapes."""


def check_lora_fits(model: nnx.Module, lora: LoRAWeights, source: str = "the LoRA"):
    """Raise :class:`LoRAMismatchError` unless every factor of ``lora`` fits a weight of ``model``."""
    targets = {t.key: t for t in all_targets(model, "")}
    problems = []
    for key, factors in lora.layers.items():
        if key not in targets:
            problems.append(f"{key}: the model has no such weight")
            continue
        d0, d1 = targets[key].torch_dims()
        rank = factors.rank
        if tuple(factors.down.shape) != (rank, d1) or tuple(factors.up.shape) != (d0, rank):
            problems.append(f"{key}: lora_down {tuple(factors.down.shape)} / lora_up {tuple(factors.up.shape)} in "
                            f"the file, the model needs ({rank}, {d1}) / ({d0}, {rank})")
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise LoRAMismatchError(f"{source} does not fit this model ({len(problems)} of {len(lora.layers)} weights):\n  "
                                + "\n  ".join(problems[:10]) + more + _both_sides(model, lora)
                                + "\nUse the model the LoRA was trained on.")


def _both_sides(model: nnx.Module, lora: LoRAWeights) -> str:
    """The model's ResBlocks and widths per level beside what the LoRA's own keys and shapes imply."""
    in_model = describe_unet(model_shapes(model))
    in_lora = describe_lora_layers({key: int(factors.down.shape[1]) for key, factors in lora.layers.items()})
    return (f"\n  this model: {in_model}" if in_model else "") + f"\n  the LoRA: {in_lora}"


def attach_lora(model: nnx.Module, name: str, lora: LoRAWeights, strength: float = 1.0) -> int:
    """Add the layers of ``lora`` to ``model`` under ``name`` (checked first); returns how many."""
    strength = check_strength(f"LoRA {name!r} strength", strength)
    check_lora_fits(model, lora, f"LoRA {name!r}")
    return add_factors(model, name, lora.layers, strength)
