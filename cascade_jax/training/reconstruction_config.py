"""The reconstruction section of a training config (stages ``a`` and ``previewer``; ``cfg.reconstruction``;
read by ``cascade_jax.training.stage_a`` and ``previewer``). The keys load flat (``l1_weight: 0.1``) or nested
(``reconstruction: {l1_weight: 0.1}``).
"""

from __future__ import annotations

import dataclasses

from cascade_jax.data.config_values import coerce_dataclass_fields


@dataclasses.dataclass(frozen=True)
class ReconstructionConfig:
    vq_beta: float = 0.25  # Stage A commitment-loss weight (VQ-VAE's beta; the official StageA uses 0.25)
    l1_weight: float = 0.0  # weight of an extra mean-absolute reconstruction error

    def __post_init__(self):
        coerce_dataclass_fields(self)  # errors name the flat key
