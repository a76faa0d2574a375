"""Checking a model config against its constructor before building anything.

A config is the official constructor call written as YAML, so most mistakes are a wrong key, a
value of the wrong type (``c_cond: "64"``), or per-level lists of different lengths (``c_hidden``
with one entry, ``nhead`` with two). Deep inside the constructor these surface as an
``IndexError`` or a JAX shape error that names nothing; here each becomes a message naming the key.
"""

from __future__ import annotations

import inspect

# Per-level arguments of the UNets: one entry per resolution level (as many as c_hidden); the nested
# ones hold a (down, up) pair of per-level lists.
LEVEL_ARGUMENTS = ("c_hidden", "nhead", "level_config", "dropout")
NESTED_LEVEL_ARGUMENTS = ("blocks", "block_repeat")
UNETS = ("StageB", "StageC")


def _kind(value) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "list"
    return None


def _fits(kind: str, value) -> bool:
    if kind == "number":
        return _kind(value) in ("int", "number")
    return _kind(value) == kind


def _element_kind(default) -> str | None:
    kinds = {_kind(v) for v in default}
    if kinds <= {"int", "number"} and kinds:
        return "number" if "number" in kinds else "int"
    return kinds.pop() if len(kinds) == 1 else None


def _check_value(name: str, value, default, where: str):
    kind = _kind(default)
    if kind is None:
        return  # None or an object default: nothing to compare with
    if not _fits(kind, value):
        wanted = {"list": "a list", "number": "a number", "int": "an integer", "bool": "true or false",
                  "str": "a string"}[kind]
        raise ValueError(f"{where}: {name} must be {wanted} (like the default {default!r}), got {value!r}")
    if kind == "list" and default:
        element = _element_kind(default)
        template = default[0]
        for i, item in enumerate(value):
            if element == "list":
                _check_value(f"{name}[{i}]", item, template, where)
            elif element is not None and not _fits(element, item):
                _check_value(f"{name}[{i}]", item, template if _kind(template) == element else 0.0, where)


def _check_levels(config: dict, defaults: dict, where: str):
    levels = len(config.get("c_hidden", defaults.get("c_hidden", ())))
    for name in LEVEL_ARGUMENTS:
        if name in config and len(config[name]) != levels:
            raise ValueError(f"{where}: {name} has {len(config[name])} entries but c_hidden has {levels} levels; "
                             "give one entry per level")
    for name in NESTED_LEVEL_ARGUMENTS:
        if name not in config:
            continue
        value = config[name]
        if len(value) != 2 or any(len(part) != levels for part in value):
            raise ValueError(f"{where}: {name} must be [down, up], two lists of {levels} entries (one per level of "
                             f"c_hidden), got {value!r}")


def check_config(cls, config: dict, where: str):
    """Raise a ValueError naming the key when ``config`` cannot be passed to ``cls``'s constructor."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: a config is a mapping of constructor arguments, got {type(config).__name__}")
    parameters = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
                  if n not in ("self", "rngs") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    unknown = sorted(set(config) - set(parameters))
    if unknown:
        raise ValueError(f"{where}: unknown config keys {unknown}; {cls.__name__} takes {sorted(parameters)}")
    missing = sorted(n for n, p in parameters.items() if p.default is p.empty and n not in config)
    if missing:
        raise ValueError(f"{where}: config keys {missing} are required by {cls.__name__}")
    defaults = {n: p.default for n, p in parameters.items() if p.default is not p.empty}
    for name, value in config.items():
        if name in defaults:
            _check_value(name, value, defaults[name], where)
    if cls.__name__ in UNETS:
        _check_levels(config, defaults, where)
