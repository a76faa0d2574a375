"""Checks of the pipeline's arguments, each failing with a message that names the argument.

Shared by ``StableCascadePipeline`` and the sampling request (``request.py``: the command line's and
the app's, checked before any model loads, so a bad argument costs a second, not a model load).
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np

from cascade_jax.diffusion import SamplerSettings
from cascade_jax.pipelines.stage_runner import SEED_LIMIT


def prompt_list(prompt) -> list[str]:
    if not isinstance(prompt, (str, list, tuple)):
        raise ValueError(f"prompts must be strings: pass a string or a list of strings, got {type(prompt).__name__}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("no prompt given: pass a string or a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
    return prompts


def batch_size(groups: int, num_images_per_prompt) -> int:
    if not isinstance(num_images_per_prompt, int) or isinstance(num_images_per_prompt, bool) \
            or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
    return groups * num_images_per_prompt


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def seeds_for(seed: int | Sequence[int], count: int) -> list[int]:
    """One seed per image: consecutive seeds from an int, or an explicit list; all in [0, 2**32)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != count:
            raise ValueError(f"{len(seed)} seeds for {count} images")
        bad = [s for s in seed if not is_int(s) or not 0 <= s < SEED_LIMIT]
        if bad:
            raise ValueError(f"seeds must be integers in [0, 2**32), got {bad[:3]}")
        return [int(s) for s in seed]
    if not is_int(seed) or not 0 <= seed <= SEED_LIMIT - count:
        raise ValueError(f"seed must be an integer in [0, 2**32 - {count}] for {count} image(s) (consecutive seeds "
                         f"seed .. seed + {count - 1}), got {seed!r}")
    return [int(seed) + i for i in range(count)]


def check_settings(name: str, settings):
    if not isinstance(settings, SamplerSettings):
        raise ValueError(f"{name} must be a SamplerSettings (e.g. {name.upper()}_DEFAULTS.replace(steps=30)), "
                         f"got {type(settings).__name__}")


def check_flag(name: str, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_x_init(name: str, x_init, shape):
    if x_init is None:
        return None
    x_init = np.asarray(x_init)
    if x_init.shape != tuple(shape) or not np.issubdtype(x_init.dtype, np.floating):
        raise ValueError(f"{name} must be a float array of shape {tuple(shape)} (batch, h, w, c) for this call, got "
                         f"{x_init.dtype} {x_init.shape}")
    if not np.isfinite(x_init).all():
        raise ValueError(f"{name} holds NaN or inf values")
    return x_init.astype(np.float32)


def check_strength(strength):
    if not isinstance(strength, numbers.Real) or isinstance(strength, bool) or not math.isfinite(strength) \
            or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
