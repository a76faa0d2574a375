"""YAML as users write configs and ``key=value`` overrides.

Two departures from PyYAML's YAML 1.1 reading, both about what a user types:

* ``1e-4``, ``5E-4`` are numbers (YAML 1.2). YAML 1.1 wants a dot (``1.0e-4``) and reads the rest as
  the string "1e-4", which then reaches an optimizer as text.
* In an override, shell-style brace expansions (``part-{000..009}.tar``, ``{a,b}.tar``) are text,
  not YAML flow mappings, so ``webdataset_path=[/d/x-{000..009}.tar]`` needs no quoting. A flow
  mapping has ``key: value`` inside its braces, which a brace expansion never has.

Loading stays safe (``yaml.SafeLoader``: no ``!!python`` tags).
"""

from __future__ import annotations

import re

import yaml

# YAML 1.2 core-schema floats that YAML 1.1 leaves as strings: an exponent without a dot in the mantissa.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
# {000..009} or {a,b,c}: no whitespace, colon or nested brace inside.
_BRACE_EXPANSION = re.compile(r"\{[^{}:\s]*(?:\.\.|,)[^{}:\s]*\}")
_PLACEHOLDER = "__cascade_brace_{}__"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent-only floats (``1e-4``) as numbers."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def load_yaml(text: str):
    """The parsed document (``yaml.YAMLError`` on a syntax error, as ``yaml.safe_load``)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def load_override_value(text: str):
    """The value of a ``key=value`` override: a YAML scalar or flow list/mapping; brace expansions stay text."""
    groups: list[str] = []

    def protect(match):
        groups.append(match.group(0))
        return _PLACEHOLDER.format(len(groups) - 1)

    value = load_yaml(_BRACE_EXPANSION.sub(protect, text))
    return _restore(value, groups) if groups else value


def _restore(value, groups: list[str]):
    if isinstance(value, str):
        for i, group in enumerate(groups):
            value = value.replace(_PLACEHOLDER.format(i), group)
        return value
    if isinstance(value, list):
        return [_restore(v, groups) for v in value]
    if isinstance(value, dict):
        return {_restore(k, groups): _restore(v, groups) for k, v in value.items()}
    return value
