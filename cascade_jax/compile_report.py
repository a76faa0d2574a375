"""What XLA says about a compiled program: per-device memory, FLOPs and its step-time estimate; plus a
FLOP count of a jaxpr and the host's peak memory. The one place the trainer, the planners and the
benchmarks read ``memory_analysis()`` / ``cost_analysis()``.

XLA's cost analysis visits a loop body once, whatever its trip count, and its time estimate
(``optimal_seconds``, the TPU compiler's own model) is negative ("unknown") for a program with loops:
:func:`jaxpr_flops` counts the matmuls and convolutions of the traced program instead, scan bodies times
their length, and a loop makes :func:`xla_cost` report no time estimate rather than a wrong one.
"""

from __future__ import annotations

import math
import re
import resource
import sys

import numpy as np

GIB = 2 ** 30
UNMODELLED_CUSTOM_CALL = r' custom-call\([^\n]*custom_call_target="ConcatBitcast"'
MEMORY_FIELDS = ("argument", "output", "temp", "alias", "generated_code")


def xla_memory(compiled) -> dict | None:
    """GiB per device: argument, output, temp, alias, generated_code and peak; None where unavailable.

    ``peak`` = arguments + outputs + temporaries less what the outputs alias (donated inputs); where the
    compiler reports its own peak (``peak_memory_in_bytes``: on TPU arguments and outputs with little of
    the temporaries, so smaller) it is kept as ``compiler_peak``."""
    try:
        mem = compiled.memory_analysis()
    except (AttributeError, NotImplementedError, RuntimeError):  # backends without it
        return None
    if mem is None:
        return None
    out = {name: getattr(mem, f"{name}_size_in_bytes") / GIB for name in MEMORY_FIELDS
           if getattr(mem, f"{name}_size_in_bytes", None) is not None}
    summed = out.get("argument", 0) + out.get("output", 0) + out.get("temp", 0) - out.get("alias", 0)
    out["peak"] = summed
    compiler_peak = getattr(mem, "peak_memory_in_bytes", 0) or 0
    if compiler_peak > 0:
        out["compiler_peak"] = compiler_peak / GIB
    return out


def xla_cost(compiled_or_lowered, *, lowered_text: str | None = None) -> dict:
    """flops, bytes_accessed and optimal_seconds (the compiler's step-time estimate; None when it has none:
    non-TPU backends, or a program with loops) of a compiled or lowered computation; per device.

    The TPU cost model counts -1 s for every instruction it has no cost for: the TPU's ``ConcatBitcast``
    custom calls, which move no data (20 of them gave -19.998 s for a 2 ms step), and each while loop of the
    program (whose body it then leaves out). The former are added back (``unmodelled_instructions``); with a
    loop there is no estimate. ``lowered_text`` (the program's StableHLO, as lowered from JAX) judges the loops
    by the program as written: the loops the TPU compiler adds itself (an FSDP step's all-gathers windowed
    into its matmuls: 135 of them in the 3.6B step's shallow copy) are its own and costed (that copy's
    estimate was 2.1x its matmuls' time at peak, not the -135 s a left-out body per loop would give)."""
    try:
        cost = compiled_or_lowered.cost_analysis()
    except (AttributeError, NotImplementedError, RuntimeError):
        cost = None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    cost = cost or {}
    seconds, unmodelled = cost.get("optimal_seconds"), 0
    if seconds is not None and hasattr(compiled_or_lowered, "as_text"):
        text = compiled_or_lowered.as_text() or ""
        unmodelled = len(re.findall(UNMODELLED_CUSTOM_CALL, text))
        loops = "stablehlo.while" in lowered_text if lowered_text is not None else re.search(r" while\(", text)
        seconds = None if loops else seconds + unmodelled
    return {"flops": float(cost["flops"]) if cost.get("flops") else None,
            "bytes_accessed": float(cost["bytes accessed"]) if cost.get("bytes accessed") else None,
            "optimal_seconds": float(seconds) if seconds is not None and seconds > 0 else None,
            "unmodelled_instructions": unmodelled}


def host_peak_rss_gib() -> float:
    """This process's peak resident memory so far (GiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / GIB if sys.platform == "darwin" else peak * 1024 / GIB  # bytes on macOS, KiB on Linux


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (lc, _), (lb, _) = eqn.params["dimension_numbers"]
    batch = math.prod(lhs[d] for d in lb)
    contract = math.prod(lhs[d] for d in lc)
    lhs_free = math.prod(lhs) // max(batch * contract, 1)
    rhs_free = math.prod(rhs) // max(batch * contract, 1)
    return 2.0 * batch * contract * lhs_free * rhs_free


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 2.0 * math.prod(out) * math.prod(rhs) / out_features


def _sub_jaxprs(value):
    from jax.extend import core

    if isinstance(value, core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def jaxpr_flops(jaxpr) -> float:
    """Matmul and convolution FLOPs of a (closed) jaxpr, the whole program (all devices): scan bodies count
    ``length`` times, a ``cond`` its costliest branch, a while loop's body once."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "cond":
            total += max(jaxpr_flops(b) for b in eqn.params["branches"])
        else:
            inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def param_count(tree) -> int:
    import jax

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
