"""Plan a run before renting it: compile the real train step from shapes only (no weights, no data) for a
TPU slice (libtpu compiles for any topology without a TPU) or simulated CPU devices, and report what the
compiler says per chip: memory against the chip's HBM, FLOPs and its step-time estimate.

    python train/train_c.py finetune_c_3b --plan v5p-16 mesh.fsdp=8 batch_size=64

The TPU compiler's memory analysis is the per-chip truth of that program; its ``optimal_seconds`` is an
estimate (named so in the report); XLA:CPU's temporaries (``cpu-N``) do not size an accelerator.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from cascade_jax import compile_report
from cascade_jax.accelerators import Target, resolve_target
from cascade_jax.sharding import make_mesh
from cascade_jax.training import placement
from cascade_jax.training.config import TrainConfig
from cascade_jax.training.optimizer import make_optimizer
from cascade_jax.training.state import init_state
from cascade_jax.training.step import jit_train_step
from cascade_jax.training.task import get_task, stack_for_scan, unroll_stacked

DEFAULT_MARGIN = 0.10  # share of a chip's HBM kept free: the runtime's own reservation, fragmentation


def _with_dtype(tree, dtype, only_params: bool):
    def cast(v):
        if only_params and not isinstance(v, nnx.Param):
            return v
        value = v.get_value()
        if jnp.issubdtype(value.dtype, jnp.floating):
            return v.replace(jax.ShapeDtypeStruct(value.shape, jnp.dtype(dtype)))
        return v
    return jax.tree.map(cast, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def traced_step(cfg: TrainConfig, mesh, batch_specs: dict | None = None, *, unrolled: bool = False):
    """(the jitted step traced on abstract, sharded inputs; trainable parameter count). ``unrolled``: stacked
    units (``scan_blocks``) as straight-line code, for XLA's time estimate."""
    task = get_task(cfg.stage)
    task.initial_loss_state(cfg)  # a clear error for a task without noise levels before anything is built
    modules = task.abstract_modules(cfg)
    stack_for_scan(modules, cfg)
    if unrolled:
        unroll_stacked(modules)
    batch_specs = batch_specs or task.plan_batch(cfg)
    graphdef, params, frozen = nnx.split(modules, task.trainable(cfg), ...)
    if not jax.tree.leaves(params):
        raise ValueError(f"the {type(task).__name__} filter selects no trainable parameters (train_filter="
                         f"{list(cfg.train_filter)})")
    params = _with_dtype(params, cfg.param_dtype, only_params=False)
    frozen = _with_dtype(frozen, cfg.compute_dtype, only_params=True)
    tx = make_optimizer(cfg)
    loss_state = task.initial_loss_state(cfg)
    state = jax.eval_shape(lambda p: init_state(cfg, p, tx, loss_state), params)
    state_sh = placement.state_shardings(state, tx, mesh, cfg.sharding_rules)
    frozen_sh = placement.variable_shardings(frozen, mesh, cfg.sharding_rules)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in batch_specs.items()}
    batch_sh = placement.batch_shardings(batch, mesh)
    step = jit_train_step(task, cfg, graphdef, tx, state_sh, frozen_sh, batch_sh, placement.replicated(mesh))
    traced = step.trace(_abstract(state, state_sh), _abstract(frozen, frozen_sh), _abstract(batch, batch_sh))
    return traced, compile_report.param_count(params)


def plan_mesh(cfg: TrainConfig, target: Target | None):
    devices = None if target is None else target.devices
    return make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)


def plan(cfg: TrainConfig, target: Target | str | None = None, *, batch_specs: dict | None = None, mesh=None,
         margin: float = DEFAULT_MARGIN, with_model_flops: bool = True) -> dict:
    """Compile one step for ``target`` (a :class:`Target`, a name such as ``"v5p-16"``, or None: this
    process's devices) over ``cfg.mesh``; ``batch_specs``: name -> (global shape, dtype), default one square
    ``image_size`` bucket. Returns the report (see :func:`step_report`). ``with_model_flops``: with remat,
    trace the step once more without it for MFU's FLOPs (else MFU counts the recomputation too)."""
    target = resolve_target(target) if isinstance(target, str) else target
    mesh = mesh or plan_mesh(cfg, target)
    start = time.perf_counter()
    traced, trainable = traced_step(cfg, mesh, batch_specs)
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - start
    hardware_flops = model_flops = compile_report.jaxpr_flops(traced.jaxpr)
    if cfg.remat and with_model_flops:
        model_flops = model_step_flops(cfg, mesh, batch_specs)
    estimate = None
    if cfg.scan_blocks and target is not None and target.platform == "tpu" and with_model_flops:
        from cascade_jax.training.plan_estimate import depth_extrapolated_seconds

        estimate = depth_extrapolated_seconds(traced_step, cfg, get_task(cfg.stage), mesh, batch_specs,
                                              hardware_flops)
    return step_report(compiled, mesh, target, compile_s=compile_s, trainable_params=trainable,
                       model_flops=model_flops, images_per_step=cfg.batch_size, margin=margin, estimate=estimate)


def model_step_flops(cfg: TrainConfig, mesh, batch_specs: dict | None = None) -> float:
    """Matmul/conv FLOPs of the step without remat's recomputation (what MFU counts): the step traced again
    with remat off (tracing only, no compile)."""
    import dataclasses

    traced, _ = traced_step(dataclasses.replace(cfg, remat=None), mesh, batch_specs)
    return compile_report.jaxpr_flops(traced.jaxpr)


def step_report(compiled, mesh, target: Target | None, *, compile_s: float, trainable_params: int,
                model_flops: float, images_per_step: int, margin: float, estimate: dict | None = None) -> dict:
    """The plan's numbers; per device unless named otherwise. ``estimate``: a step-time estimate from
    ``plan_estimate`` for a step with loops (``estimated_step_s`` and how it was made)."""
    devices = int(mesh.devices.size)
    kind = target.device_kind if target is not None else mesh.devices.flat[0].device_kind
    memory = compile_report.xla_memory(compiled) or {}
    cost = compile_report.xla_cost(compiled)
    hbm = target.hbm_gib if target is not None else None
    out = {"target": target.name if target is not None else "current devices",
           "topology": target.topology if target is not None else None, "device_kind": kind, "devices": devices,
           "mesh": dict(mesh.shape), "hbm_gib_per_device": hbm, "trainable_params": trainable_params,
           **{f"{k}_gib_per_device": v for k, v in memory.items()}}
    out.update(fit_fields(out.get("peak_gib_per_device"), hbm, margin))
    out.update(speed_fields(cost, model_flops / devices, target.peak_flops if target is not None else None,
                            images_per_step, estimate))
    out.update(compile_s=round(compile_s, 1), host_peak_rss_gib=round(compile_report.host_peak_rss_gib(), 2))
    return out


def fit_fields(peak_gib: float | None, hbm_gib: float | None, margin: float) -> dict:
    """``fits``: the compiler's peak within the chip's HBM less ``margin`` of it (None where either is unknown)."""
    if peak_gib is None or hbm_gib is None:
        return {"fits": None, "margin": margin}
    usable = hbm_gib * (1 - margin)
    return {"fits": bool(peak_gib <= usable), "margin": margin, "usable_gib_per_device": round(usable, 2),
            "headroom_gib_per_device": round(usable - peak_gib, 2)}


def speed_fields(cost: dict, model_flops_per_device: float, peak_flops: float | None, images_per_step: int,
                 estimate: dict | None = None) -> dict:
    """FLOPs and the compiler's time estimate; MFU = model FLOPs (no remat recompute) / (estimate x peak)."""
    seconds, source = cost["optimal_seconds"], "TPU compiler cost model (optimal_seconds), not a measurement"
    if seconds is None and estimate is not None and estimate["estimated_step_s"]:
        seconds = estimate["estimated_step_s"]
        source = ("TPU compiler cost model of the step at 1 and 2 units per level (loop-free), extrapolated to "
                  "the full depth by FLOPs (training/plan_estimate.py); not a measurement")
    elif seconds is None:
        source = "none: XLA gives no time estimate for this backend or for a program with loops"
    out = {"flops_per_step_per_device": model_flops_per_device, "xla_flops_per_step_per_device": cost["flops"],
           "optimal_seconds": cost["optimal_seconds"], "estimated_step_s": seconds, "estimate_source": source}
    if estimate is not None:
        out["estimate_points"] = estimate["estimate_points"]
    out["estimated_mfu"] = model_flops_per_device / (seconds * peak_flops) if seconds and peak_flops else None
    out["images_per_s_estimate"] = images_per_step / seconds if seconds else None
    return out


def format_table(report: dict) -> str:
    """A short human summary of a plan report."""
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    fits = {True: "yes", False: "NO", None: "unknown"}[report.get("fits")]
    rows = [("target", f"{report['target']} ({report['devices']} x {report['device_kind']})"),
            ("mesh", " ".join(f"{k}={v}" for k, v in report["mesh"].items())),
            ("per device GiB", f"arguments {num(report.get('argument_gib_per_device'), '.2f')}, temporaries "
                               f"{num(report.get('temp_gib_per_device'), '.2f')}, peak "
                               f"{num(report.get('peak_gib_per_device'), '.2f')} of {num(report['hbm_gib_per_device'], 'g')}"),
            ("fits", f"{fits} (margin {report['margin']:.0%})"),
            ("TFLOP / step / device", num(report["flops_per_step_per_device"] / 1e12, ".3g")),
            ("estimated step s", f"{num(report['estimated_step_s'], '.3g')} (compiler estimate)"),
            ("estimated MFU", num(report["estimated_mfu"], ".1%")),
            ("images / s (estimate)", num(report["images_per_s_estimate"], ".3g")),
            ("compile", f"{report['compile_s']:.0f} s, host peak RSS {report['host_peak_rss_gib']:.2f} GiB")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
