"""The LoRA section of a training config (stage ``c_lora``; ``cfg.lora``; read by ``cascade_jax.training.lora``).

The official ``train_c_lora.py`` configs write these keys at the top level (``rank: 4``, ``module_filters:
['.attn']``); they load into this section as written, and so does the nested form ``lora: {rank: 4}``.
"""

from __future__ import annotations

import dataclasses

from cascade_jax.data.config_values import coerce_dataclass_fields


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    module_filters: tuple[str, ...] | None = None  # substrings of official module names; None: ['.attn'] as officially
    rank: int = 4
    train_tokens: tuple[tuple, ...] = ()  # [[token or regex, init regex or null], ...]; [x] / <x> adds a new token
    lora_checkpoint_path: str | None = None  # start from this LoRA file

    def __post_init__(self):
        coerce_dataclass_fields(self)  # errors name the official (flat) key
