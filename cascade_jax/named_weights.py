"""Weight sets known by name (``--weights demo``, ``from_pretrained("demo-lcm")``): a small registry.

A project built on the library (the embedded demo, ``cascade_jax.demo``) registers its sets here when
imported; the pipelines resolve a name through :func:`lookup` and know no set by name. A set is a weights
folder, optionally with Stage C LoRAs merged into the base at load (so ``--lora`` stacks on top of them)
and another folder's ``sampling.json`` as its sampler defaults. Paths are callables, read when the set is
used: a set whose files are missing fails then, with its own message, not at import.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable


@dataclasses.dataclass(frozen=True)
class WeightSet:
    folder: Callable[[], Path]  # the weights folder (converted directories, tokenizer/...)
    loras: Callable[[], tuple] = tuple  # Stage C LoRA files merged into the loaded base weights
    sampling: Callable[[], Path] | None = None  # the folder whose sampling.json gives the defaults (None: folder)
    dtype: str = "bfloat16"  # the dtype the scripts load it in by default
    image_size: int | None = None  # the side the scripts draw by default (None: 1024)


SETS: dict[str, WeightSet] = {}


def register(name: str, weight_set: WeightSet):
    SETS[name] = weight_set


def lookup(name) -> WeightSet | None:
    """The set registered as ``name`` (a str), or None (then ``name`` is a folder or a Hub repository)."""
    return SETS.get(name) if isinstance(name, str) else None
