"""``key=value`` overrides of a training config, as typed on a command line.

A value is YAML (``lr=5e-4``, ``mesh.fsdp=8``, ``webdataset_path=[/d/a.tar, /d/b.tar]``,
``data="{source: folder, paths: [imgs/]}"``), read by :func:`cascade_jax.models.config_yaml.load_override_value`:
brace ranges such as ``/d/x-{000..009}.tar`` stay text for the shard expansion. A dotted key sets
a key of a section (``data.num_workers=4``).

A list key given several times takes every value, in order. That is what an unquoted brace range
becomes in bash or zsh: ``webdataset_path=/d/x-{000..002}.tar`` reaches the program as three
overrides, one per shard, and means all three (with "last one wins" it would silently train on the
last shard). Other keys given twice take the last value.
"""

from __future__ import annotations

from typing import Any

import yaml

from cascade_jax.models.config_yaml import load_override_value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``(dotted key as a list, value)`` of ``key=value``; an unparsable value is named with its position."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip().split("."), load_override_value(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at character {mark.column + 1} of the value" if mark is not None else ""
        raise ValueError(f"override {text!r}: the value is not valid YAML ({getattr(e, 'problem', e)}{where}); "
                         f"to pass it as text, quote it for the shell and for YAML: {key.strip()}='\"...\"'") from None


def apply_overrides(values: dict, overrides, list_keys=frozenset()) -> dict:
    """``values`` (a config mapping, not modified) with the overrides applied; ``list_keys``: the dotted
    keys whose repeated overrides are joined into one list."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for text, path, value in _join_repeated_lists(overrides, list_keys):
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return values


def _join_repeated_lists(overrides, list_keys) -> list[tuple[str, list[str], Any]]:
    parsed = [(text, *parse_override(text)) for text in overrides]
    keys = [".".join(path) for _, path, _ in parsed]
    joined, done = [], set()
    for (text, path, value), key in zip(parsed, keys):
        if key in list_keys and keys.count(key) > 1:
            if key in done:
                continue
            done.add(key)
            value = [item for (_, _, v), k in zip(parsed, keys) if k == key for item in _as_list(v)]
        joined.append((text, path, value))
    return joined


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
