"""Which checkpoint format a source file is in, per model (official, diffusers, or a registered one).

The format types (:class:`Format`, :class:`Recipe`) live in :mod:`cascade_jax.weights.recipes`, so
the format modules do not import this registry and this registry imports them.
"""

from __future__ import annotations

from cascade_jax.weights.diffusers_unet import DIFFUSERS_STAGE_B, DIFFUSERS_STAGE_C
from cascade_jax.weights.diffusers_vq import DIFFUSERS_VQ
from cascade_jax.weights.recipes import Format, Recipe, concat_rows, identity_plan, take_only  # noqa: F401

OFFICIAL = Format("official", detect=lambda keys: True, plan=identity_plan)

# model name -> formats other than official, tried in order before falling back to official.
EXTRA_FORMATS: dict[str, list[Format]] = {
    "stage_a": [DIFFUSERS_VQ],
    "stage_b": [DIFFUSERS_STAGE_B],
    "stage_c": [DIFFUSERS_STAGE_C],
}


def register_format(model_name: str, fmt: Format):
    EXTRA_FORMATS.setdefault(model_name, []).append(fmt)


def detect_format(model_name: str, keys: set[str], requested: str | None = None) -> Format:
    """The format of a file with ``keys`` for ``model_name`` (``requested`` forces one by name)."""
    candidates = EXTRA_FORMATS.get(model_name, []) + [OFFICIAL]
    if requested is not None:
        for fmt in candidates:
            if fmt.name == requested:
                return fmt
        raise ValueError(f"format {requested!r} is not known for model {model_name!r}; "
                         f"known: {[f.name for f in candidates]}")
    for fmt in candidates:
        if fmt.detect(keys):
            return fmt
    return OFFICIAL

