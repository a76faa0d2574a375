"""Keep a U-Net's repeated units stacked for training (``scan_blocks``): stack at build, unstack for export.

Scanning units whose parameters live block by block still puts every block's parameter into the step as its
own array, and each array brings its own cast, stack, gradient slice and optimizer update: the 3.6B Stage C
has ~2,300 of them, and the TPU compiler's time and memory grow with every one (400 AdamW updates of
separate arrays compiled in 58 s, of one stacked array in 2.6 s, on a loaded 2-core machine). Here a run of
identical units becomes one :class:`StackedUnits` whose Variables carry a leading unit axis (logical axis
``None``: never sharded), so the train state, its optimizer moments and the step hold one array per
parameter *kind* per run. ``scan_stacked`` (``unet_scan``) runs them.

Checkpoint files never see this layout: :func:`unstack_units` restores the per-block modules (official
keys) before export, and :func:`unstack_flat` maps a stacked flat state's paths back (the LoRA writer).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cascade_jax.models.unet_scan import runs, unit_period

LEVEL_LISTS = ("down_blocks", "up_blocks")


class StackedUnits(nnx.Module):
    """``count`` identical consecutive units of a level starting at block ``first``: one block per unit
    position, its Variables stacked over the units."""

    def __init__(self, blocks: Sequence[nnx.Module], count: int, first: int):
        self.count, self.first = count, first
        self.blocks = nnx.List(list(blocks))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _stack_variables(*variables):
    value = variables[0].get_value()
    if isinstance(value, jax.ShapeDtypeStruct):  # abstract models (planning): shapes only
        stacked = jax.ShapeDtypeStruct((len(variables), *value.shape), value.dtype)
    else:
        stacked = jnp.stack([v.get_value() for v in variables])
    axes = variables[0].get_metadata().get("axes")
    return variables[0].replace(stacked, axes=None if axes is None else (None, *axes))


def _unit_variable(variable, u: int):
    axes = variable.get_metadata().get("axes")
    return variable.replace(variable.get_value()[u], axes=None if axes is None else tuple(axes[1:]))


def stack_block(blocks: Sequence[nnx.Module]) -> nnx.Module:
    """One block (the first's graph) whose Variables stack those of ``blocks`` (same graph and shapes)."""
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.split(b)[1] for b in blocks]
    return nnx.merge(graphdef, jax.tree.map(_stack_variables, *states, is_leaf=_is_variable))


def unstack_block(block: nnx.Module, count: int) -> list[nnx.Module]:
    """The inverse of :func:`stack_block`: ``count`` blocks, each with its slice of the stacked Variables."""
    graphdef, state = nnx.split(block)
    return [nnx.merge(graphdef, jax.tree.map(lambda v: _unit_variable(v, u), state, is_leaf=_is_variable))
            for u in range(count)]


def stack_units(model) -> dict:
    """Stack every run of identical units of ``model``'s levels in place; returns the layout
    ``{(list, level): [("block", index) | ("stack", first, count, period), ...]}`` of the new level lists."""
    layout = {}
    for attr in LEVEL_LISTS:
        levels = getattr(model, attr)
        for i in range(len(levels)):
            blocks = list(levels[i])
            if any(isinstance(b, StackedUnits) for b in blocks):
                raise ValueError(f"{attr}.{i} is already stacked")
            period = unit_period(blocks)
            elements, entries = [], []
            for first, count in runs(blocks, period, first_alone=False):
                part = blocks[first * period:(first + count) * period]
                if count == 1:
                    elements.extend(part)
                    entries.extend(("block", first * period + k) for k in range(period))
                    continue
                stacked = [stack_block(part[j::period]) for j in range(period)]
                elements.append(StackedUnits(stacked, count, first * period))
                entries.append(("stack", first * period, count, period))
            levels[i] = nnx.List(elements)
            layout[(attr, i)] = entries
    return layout


def unstack_units(model):
    """The inverse of :func:`stack_units` (on a Stage B / C U-Net), in place: per-block modules under their
    official keys again."""
    for attr in LEVEL_LISTS:
        levels = getattr(model, attr)
        for i in range(len(levels)):
            blocks = []
            for element in levels[i]:
                if not isinstance(element, StackedUnits):
                    blocks.append(element)
                    continue
                per_position = [unstack_block(b, element.count) for b in element.blocks]
                blocks.extend(b for unit in zip(*per_position) for b in unit)
            levels[i] = nnx.List(blocks)
    return model


def unstack_flat(flat: dict, layout: dict, prefix: tuple = ()) -> dict:
    """``{path: value}`` of a stacked model (paths under ``prefix``) with per-block paths and values."""
    out = {}
    for path, value in flat.items():
        rest = path[len(prefix):]
        if path[:len(prefix)] != prefix or len(rest) < 3 or (rest[0], rest[1]) not in layout:
            out[path] = value
            continue
        entry = layout[(rest[0], rest[1])][rest[2]]
        if entry[0] == "block":
            out[(*prefix, rest[0], rest[1], entry[1], *rest[3:])] = value
            continue
        _, first, count, period = entry  # rest[3:5] == ("blocks", position)
        for u in range(count):
            out[(*prefix, rest[0], rest[1], first + u * period + rest[4], *rest[5:])] = value[u]
    return out
