"""Checkpoint format types: how the tensors of a source file make up the official tensors.

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
