"""Config values as users type them, read as the type their dataclass field declares.

Training and data configs come from YAML files and ``key=value`` overrides, where a number may
arrive as text ("5e-4" from a quoted YAML value, ``1_000``), a single path as a string where a
list is declared (``webdataset_path: /data/x.tar``, the official trainer's form), or a list as a
YAML list. Each field is read as its annotation says, before anything is built: numbers from any
text Python reads as one, a lone value as a one-entry list (never a string split into its
characters), ``null`` as an empty list where the field cannot be null. What cannot be read is
refused naming the field (``lr must be a number, got 'abc'``). Ranges are not checked here.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
import typing
from typing import Any

_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def coerce_dataclass_fields(instance, prefix: str = "") -> None:
    """Replace each field of a (frozen) dataclass ``instance`` by its value read as the field's type."""
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        coerced = coerce_value(prefix + field.name, value, hints[field.name])
        if coerced is not value:
            object.__setattr__(instance, field.name, coerced)


def coerce_mapping(cls, values: dict, prefix: str = "") -> dict:
    """``values`` with each key that is a field of dataclass ``cls`` read as that field's type (others kept)."""
    hints = typing.get_type_hints(cls)
    return {k: coerce_value(prefix + k, v, hints[k]) if k in hints else v for k, v in values.items()}


def list_fields(cls) -> list[str]:
    """The fields of dataclass ``cls`` declared as lists (``tuple``, possibly optional)."""
    def is_list(hint) -> bool:
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        return any(o is tuple or typing.get_origin(o) is tuple for o in options)

    return [name for name, hint in typing.get_type_hints(cls).items() if is_list(hint)]


def coerce_value(name: str, value, hint):
    """``value`` read as type ``hint`` (float, int, bool, str, tuple[...], dict, Optional of them, Any)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _union(name, value, args)
    if hint is tuple or origin is tuple:
        element = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        return _sequence(name, value, element)
    reader = _READERS.get(origin or hint)
    return reader[0](name, value) if reader is not None else value  # Any, nested dataclasses


def _union(name: str, value, options):
    """``X | None``: None or an X; ``X | Y``: the first option that reads the value."""
    if value is None and type(None) in options:
        return None
    options = [o for o in options if o is not type(None)]
    if len(options) == 1:
        return coerce_value(name, value, options[0])
    for option in options:
        if isinstance(value, typing.get_origin(option) or option):
            return value  # already of one of the types: no conversion to another
    for option in options:
        try:
            return coerce_value(name, value, option)
        except ValueError:
            continue
    wanted = " or ".join(_READERS[typing.get_origin(o) or o][1] for o in options)
    raise ValueError(f"{name} must be {wanted}, got {value!r}")


def _number(name: str, value) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value  # an int stays as typed (messages show "4", not "4.0")
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)  # numpy scalars
    number = _float_or_none(value) if isinstance(value, str) else None  # 5e-4, 1E-4, 1_000, .5
    if number is None:
        raise ValueError(f"{name} must be a number, got {value!r}")
    return number


def _integer(name: str, value) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    number = value
    if isinstance(value, str):
        try:
            return int(value.strip())  # 1000, 1_000
        except ValueError:
            number = _float_or_none(value)  # 1e3
    if isinstance(number, numbers.Real) and not isinstance(number, bool) and math.isfinite(number) \
            and float(number).is_integer():
        return int(number)  # 1e3, 1000.0
    raise ValueError(f"{name} must be an integer, got {value!r}")


def _float_or_none(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:
        return None


def _flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _text(name: str, value) -> str:
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return str(value)  # experiment_id=2024
    raise ValueError(f"{name} must be a string, got {value!r}")


def _mapping(name: str, value) -> dict:
    if isinstance(value, dict):
        return value
    raise ValueError(f"{name} must be a mapping (key: value, ...), got {value!r}")


def _sequence(name: str, value, element) -> tuple:
    """A list as a tuple (nested lists too), a lone value as a one-entry tuple, null as empty."""
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike, numbers.Real)) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list (or a single value), got {value!r}")
    if element is None or element is Any:
        return tuple(_freeze(v) for v in value)
    return tuple(coerce_value(f"{name}[{i}]", v, element) for i, v in enumerate(value))


def _sequence_of_any(name: str, value) -> tuple:
    return _sequence(name, value, None)


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


_READERS = {float: (_number, "a number"), int: (_integer, "an integer"), bool: (_flag, "true or false"),
            str: (_text, "a string"), dict: (_mapping, "a mapping"), tuple: (_sequence_of_any, "a list")}
