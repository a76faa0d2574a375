"""Checking a model config against its constructor before building anything.

A config is the official constructor call written as YAML, so most mistakes are a wrong key, a
value the constructor cannot take (``c_cond: "64"``), or a per-level list shorter than ``c_hidden``
(``nhead`` with one entry for two levels). Deep inside the constructor these surface as an
``IndexError`` or a JAX shape error that names nothing; here each becomes a message naming the key,
the value and what the key takes. What a key takes is the model class's ``CONFIG_FORMS``
(:mod:`cascade_jax.models.config_forms`): every form the official constructor accepts.
"""

from __future__ import annotations

import inspect

# The key whose length is the number of resolution levels (the U-Nets' per-level lists follow it).
LEVELS_KEY = "c_hidden"
_MAX_SHOWN = 200  # characters of a refused value shown in the message


def constructor_parameters(cls) -> dict[str, inspect.Parameter]:
    """The config keys of ``cls``: its constructor's named arguments other than ``rngs``."""
    return {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
            if n not in ("self", "rngs") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def _check_form(name: str, value, form, levels: int | None, where: str, default: bool = False):
    problem = form.problem(value, levels)
    if problem is not None:
        given = f"the default {name}={_shown(value)} does not fit this config" if default else \
            f"{name}={_shown(value)} is not accepted"
        raise ValueError(f"{where}: {given} ({problem}); {name} takes {form.text(levels)}")


def check_config(cls, config: dict, where: str):
    """Raise a ValueError naming the key when ``config`` cannot be passed to ``cls``'s constructor."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: a config is a mapping of constructor arguments, got {type(config).__name__}")
    parameters = constructor_parameters(cls)
    unknown = sorted(set(config) - set(parameters))
    if unknown:
        raise ValueError(f"{where}: unknown config keys {unknown}; {cls.__name__} takes {sorted(parameters)}")
    missing = sorted(n for n, p in parameters.items() if p.default is p.empty and n not in config)
    if missing:
        raise ValueError(f"{where}: config keys {missing} are required by {cls.__name__}")
    forms = cls.CONFIG_FORMS
    levels = None
    if LEVELS_KEY in parameters:
        hidden = config.get(LEVELS_KEY, parameters[LEVELS_KEY].default)
        _check_form(LEVELS_KEY, hidden, forms[LEVELS_KEY], None, where)
        levels = len(hidden) if isinstance(hidden, (list, tuple)) else None  # Stage A: one width, no levels
    # Defaults too: the default dropout (0.1, 0.1) of a three-level Stage C crashes as a given one would.
    for name, parameter in parameters.items():
        value = config.get(name, parameter.default)
        _check_form(name, value, forms[name], levels, where, default=name not in config)
