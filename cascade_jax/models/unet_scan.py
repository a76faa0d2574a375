"""Run a level's repeated blocks as one ``lax.scan`` over their stacked parameters (``scan_blocks``).

A Stage C 3.6B level repeats the unit ``CTA`` (ResBlock, TimestepBlock, AttnBlock) 8 or 24 times; unrolled,
the train step holds every copy of the forward, its recomputation and its backward, and the compiler's time
and host memory grow with them (the 3.6B step did not compile for a TPU slice in 23 GB). Scanned, the step
holds one unit's program per run of identical units.

The parameters stay where they are (module structure, checkpoint keys, conversion, export, LoRA adapters
and sharding rules are unchanged): a run's per-block states are stacked inside the traced forward, where
the stack and its gradient (slices) are cheap next to the blocks. Results equal the unrolled forward's up
to floating-point reassociation by XLA: the same blocks, inputs, ControlNet residuals (resized before the
scan as the unrolled path resizes them) and dropout keys (``fold_in(key, visiting index)``).

Units are found from the block types (the level's period); a run is consecutive units whose blocks have
the same graph and shapes, so a LoRA on some blocks only, or the up path's first unit (its ResBlock takes
the skip connection), splits runs instead of failing; a run of one unit runs unrolled.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def unit_period(blocks: Sequence[nnx.Module]) -> int:
    """The shortest p such that block types repeat with period p (``CTA`` -> 3)."""
    kinds = [type(b) for b in blocks]
    for p in range(1, len(kinds) + 1):
        if len(kinds) % p == 0 and all(kinds[i] is kinds[i % p] for i in range(len(kinds))):
            return p
    return len(kinds)


def _signature(unit) -> tuple:
    splits = [nnx.split(block) for block in unit]
    return tuple((graphdef, jax.tree.map(lambda x: (x.shape, x.dtype), state)) for graphdef, state in splits)


def runs(blocks: Sequence[nnx.Module], period: int, first_alone: bool) -> list[tuple[int, int]]:
    """(first unit, unit count) of each run of identical consecutive units; unit 0 alone if ``first_alone``."""
    units = [blocks[u * period:(u + 1) * period] for u in range(len(blocks) // period)]
    out, previous = [], None
    for u, unit in enumerate(units):
        signature = _signature(unit)
        if out and signature == previous and not (first_alone and out[-1][0] == 0):
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((u, 1))
        previous = signature
    return out


def _stacked_residuals(residuals: Iterator | None, is_res: list[bool], count: int, like, add_control) -> list | None:
    """The next ``count`` units' ControlNet residuals per ResBlock position, resized to ``like`` and stacked
    (zeros where a block gets none); None when the run gets none at all."""
    if residuals is None:
        return None
    taken = [[next(residuals, None) if res else None for res in is_res] for _ in range(count)]
    if all(r is None for unit in taken for r in unit):
        return None
    zero = jnp.zeros_like(like)
    # add_control(zero, iter([r])) is exactly the unrolled path's resize and cast of r.
    per_position = [[add_control(zero, iter([unit[j]])) for unit in taken] if res else None
                    for j, res in enumerate(is_res)]
    return [None if p is None else jnp.stack(p) for p in per_position]


def scan_units(units: Sequence[Sequence[nnx.Module]], x, residuals: Iterator | None, run, apply_block: Callable,
               add_control: Callable, is_resblock: Callable):
    """Run ``units`` (identical, consecutive; each a list of blocks) as one scan; returns the new x.

    ``run`` is the forward's block runner (its visiting counter and dropout key advance as if unrolled);
    ``apply_block(block, x, index)`` runs one block at visiting index ``index`` (a traced int32)."""
    graphdefs = [nnx.split(block)[0] for block in units[0]]
    stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.split(unit[j])[1] for unit in units])
               for j in range(len(units[0]))]
    return scan_stacked(graphdefs, stacked, len(units), [is_resblock(b) for b in units[0]], x, residuals, run,
                        apply_block, add_control)


def scan_stacked(graphdefs: list, stacked: list, count: int, is_res: list[bool], x, residuals: Iterator | None,
                 run, apply_block: Callable, add_control: Callable, unroll: bool = False):
    """The scan of :func:`scan_units` over states already stacked (one per unit position, leading axis
    ``count``; ``unet_stack.StackedUnits``); ``unroll``: as straight-line code (no loop; planning's
    time estimate, ``training/plan_estimate.py``)."""
    period = len(graphdefs)
    control = _stacked_residuals(residuals, is_res, count, x, add_control)
    first = run.advance(count * period)
    indices = first + jnp.arange(count * period, dtype=jnp.int32).reshape(count, period)

    def body(x, inputs):
        states, controls, index = inputs
        for j in range(period):
            if controls is not None and controls[j] is not None:
                x = x + controls[j]
            x = apply_block(nnx.merge(graphdefs[j], states[j]), x, index[j])
        return x, None

    x, _ = jax.lax.scan(body, x, (stacked, control, indices), unroll=unroll)
    return x
