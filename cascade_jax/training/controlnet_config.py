"""The ControlNet section of a training config (stage ``c_controlnet``; ``cfg.controlnet``; read by
``cascade_jax.training.controlnet``).

The official ``train_c_controlnet.py`` configs write these keys at the top level (``controlnet_blocks``,
``controlnet_filter``, ``offset_noise``, ...); they load into this section as written, and so does the nested
form ``controlnet: {controlnet_blocks: [...]}``.
"""

from __future__ import annotations

import dataclasses

from cascade_jax.data.config_values import coerce_dataclass_fields


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    controlnet_blocks: tuple[int, ...] | None = None  # Stage C ResBlock indices that get a residual
    controlnet_filter: str | None = None  # CannyFilter | InpaintFilter | SREffnetFilter | IdentityFilter
    controlnet_filter_params: dict | None = None
    controlnet_bottleneck_mode: str | None = None  # effnet (default) | simple | large
    controlnet_checkpoint_path: str | None = None
    offset_noise: float | None = None  # std of a per-(sample, channel) constant added to the noise

    def __post_init__(self):
        coerce_dataclass_fields(self)  # errors name the official (flat) key
