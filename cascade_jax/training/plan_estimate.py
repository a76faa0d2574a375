"""A step-time estimate for a step with loops (``scan_blocks``), which XLA's cost model does not give.

The TPU compiler's ``optimal_seconds`` is negative ("unknown") for any program with a while loop, and its
FLOP count visits a loop body once. A U-Net step's time is close to linear in its depth, so this compiles
the same step twice more, unrolled (the stacked units as straight-line code, so parameters and optimizer are
the scanned step's), with shallow U-Nets whose levels keep the full model's mix of
units (counts scaled to at most 3 units per level and direction, A, then twice that, B: small, loop-free
programs), reads the compiler's estimate of each and extrapolates along the FLOPs (matmuls and convolutions
counted on the traced programs, scan bodies times their length):

    estimated_s = T_A + (F_full - F_A) * (T_B - T_A) / (F_B - F_A)

It is the compiler's estimate of the shallow steps, extended to the full depth at their marginal seconds
per FLOP; the report names it so. Keeping the mix matters where levels differ in width or resolution:
on a two-level test U-Net (widths 128 / 256, 3 + 6 units) the full unrolled step's estimate was 2.78 ms,
1-and-2-units-everywhere extrapolation said 3.99 ms.
"""

from __future__ import annotations

import dataclasses

from cascade_jax import compile_report
from cascade_jax.training.config import TrainConfig


UNITS = 3  # the deepest level of variant A


def shallow_config(cfg: TrainConfig, task, scale: int) -> TrainConfig:
    """``cfg`` with ``scale`` x (each count scaled to at most UNITS, at least 1) units per level and direction,
    one micro-batch (traced unrolled: its parameters stay stacked, so the optimizer is the scanned step's)."""
    model_config = dict(task.generator_config(cfg))  # a ControlNet task's: its frozen Stage C's
    deepest = max(c for direction in model_config["blocks"] for c in direction)
    model_config["blocks"] = [[scale * max(1, round(c * UNITS / deepest)) for c in direction]
                              for direction in model_config["blocks"]]
    return dataclasses.replace(cfg, model_config=model_config, grad_accum_steps=1)


def compiled_point(trace, cfg: TrainConfig, mesh, batch_specs) -> tuple[float | None, float]:
    """(the compiler's optimal_seconds, jaxpr FLOPs) of one loop-free step; ``trace``: ``plan.traced_step``."""
    traced, _ = trace(cfg, mesh, batch_specs, unrolled=True)
    lowered = traced.lower()
    seconds = compile_report.xla_cost(lowered.compile(), lowered_text=lowered.as_text())["optimal_seconds"]
    return seconds, compile_report.jaxpr_flops(traced.jaxpr)


def extrapolate(points, full_flops: float) -> float | None:
    """The formula above from ``[(T_A, F_A), (T_B, F_B)]``; None without two estimates that differ in FLOPs."""
    (t1, f1), (t2, f2) = points
    if t1 is None or t2 is None or f2 <= f1:
        return None
    return t1 + (full_flops - f1) * (t2 - t1) / (f2 - f1)
