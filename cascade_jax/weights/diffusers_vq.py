"""Stage A in diffusers' format (``PaellaVQModel``, the ``vqgan`` folder of stabilityai/stable-cascade).

diffusers keeps the official module tree of Stage A; the one renamed tensor is the
codebook: diffusers' ``VectorQuantizer`` stores it as ``vquantizer.embedding.weight`` where
the official torchtools ``VectorQuantize`` has ``vquantizer.codebook.weight``.

The scale factor differs too: diffusers' config says 0.3764, the official code 0.43. The
weights are the same and Stage B was trained on ``latent / 0.43``, so
:func:`stage_a_config_from_paella` keeps the official value unless told otherwise.
"""

from __future__ import annotations

from cascade_jax.weights.recipes import Format, Recipe, take_only

DIFFUSERS_CODEBOOK = "vquantizer.embedding.weight"
OFFICIAL_CODEBOOK = "vquantizer.codebook.weight"
OFFICIAL_SCALE_FACTOR = 0.43


def is_diffusers_vq(keys) -> bool:
    return DIFFUSERS_CODEBOOK in keys


def diffusers_vq_plan(keys) -> dict[str, Recipe]:
    """``{official key: Recipe}`` for a PaellaVQModel state dict; unknown keys pass through by name
    so that the converter reports them as unexpected rather than dropping them silently."""
    if DIFFUSERS_CODEBOOK not in keys:
        raise KeyError(f"{DIFFUSERS_CODEBOOK!r} is missing: this is not a diffusers PaellaVQModel state dict")
    return {(OFFICIAL_CODEBOOK if k == DIFFUSERS_CODEBOOK else k): Recipe((k,), take_only) for k in keys}


DIFFUSERS_VQ = Format("diffusers", detect=is_diffusers_vq, plan=diffusers_vq_plan)


def stage_a_config_from_paella(config: dict, scale_factor: float | None = OFFICIAL_SCALE_FACTOR) -> dict:
    """Official ``StageA`` kwargs from a diffusers ``PaellaVQModel`` config dict.

    ``scale_factor``: the value to use (official 0.43 by default); ``None`` keeps the config's own
    (diffusers 0.3764), e.g. to reproduce diffusers' pipelines.
    """
    fixed = {"in_channels": 3, "out_channels": 3, "up_down_scale_factor": 2}
    for name, official in fixed.items():
        if config.get(name, official) != official:
            raise ValueError(f"PaellaVQModel config has {name}={config[name]}; the official StageA "
                             f"is built for {name}={official} only")
    return {
        "levels": config.get("levels", 2),
        "bottleneck_blocks": config.get("bottleneck_blocks", 12),
        "c_hidden": config.get("embed_dim", 384),
        "c_latent": config.get("latent_channels", 4),
        "codebook_size": config.get("num_vq_embeddings", 8192),
        "scale_factor": config.get("scale_factor", 0.3764) if scale_factor is None else scale_factor,
    }
