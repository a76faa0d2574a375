"""Checkpoint formats: how the tensors of a source file make up the official tensors.

A format adapter turns the key set of a source file into a *plan*:
``{official key: Recipe(source keys, combine)}``. ``combine`` receives the source tensors
(PyTorch layout, as numpy) and returns the official tensor (PyTorch layout). The official
format is the identity plan; others (diffusers) rename keys and may pack several tensors
into one (diffusers splits the packed q/k/v projection, for example).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np


@dataclass(frozen=True)
class Recipe:
    sources: tuple[str, ...]
    combine: Callable[[list[np.ndarray]], np.ndarray]


def take_only(arrays):
    return arrays[0]


def concat_rows(arrays):
    return np.concatenate(arrays, axis=0)


def identity_plan(keys: Iterable[str]) -> dict[str, Recipe]:
    return {k: Recipe((k,), take_only) for k in keys}


@dataclass(frozen=True)
class Format:
    name: str
    # True when a file with these keys is in this format (cheap, key-based).
    detect: Callable[[set[str]], bool]
    # Source keys -> plan; may raise KeyError naming what it cannot place.
    plan: Callable[[set[str]], dict[str, Recipe]]


OFFICIAL = Format("official", detect=lambda keys: True, plan=identity_plan)

# model name -> formats other than official, tried in order before falling back to official.
EXTRA_FORMATS: dict[str, list[Format]] = {}


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


import cascade_jax.weights.diffusers_vq  # noqa: E402,F401  (registers the diffusers Stage A format)
import cascade_jax.weights.diffusers_unet  # noqa: E402,F401  (registers the diffusers Stage B/C formats)
