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
from cascade_jax.accelerators import Target, plan_target, resolve_target
from cascade_jax.sharding import make_mesh
from cascade_jax.training import placement
from cascade_jax.training.config import TrainConfig
from cascade_jax.training.optimizer import make_optimizer
from cascade_jax.training.plan_estimate import compiled_point, extrapolate, shallow_config
from cascade_jax.training.plan_isolation import ChildOutcome, in_process, run_in_child
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
         margin: float = DEFAULT_MARGIN, with_model_flops: bool = True, isolate: bool = False,
         child_memory_gib: float | None = None) -> dict:
    """Compile one step for ``target`` (a :class:`Target`, a name such as ``"v5p-16"``, or None: this
    process's devices) over ``cfg.mesh``; ``batch_specs``: name -> (global shape, dtype), default one square
    ``image_size`` bucket. Returns the report (see :func:`step_report`). ``with_model_flops``: with remat,
    trace the step once more without it for MFU's FLOPs (else MFU counts the recomputation too); for a scanned
    step on a TPU also compile the time estimate's shallow steps (``plan_estimate``).

    ``isolate``: each compile and trace in a fresh process (``plan_isolation``; what ``--plan`` does), so host
    memory is the largest one's, not their sum; the report then lists each process's cost under
    ``processes``; ``child_memory_gib``: a process above that much host memory is stopped. The step's failure
    is raised; a failed FLOPs trace or estimate compile leaves that number out, with the reason in the report."""
    target = resolve_target(target) if isinstance(target, str) else target
    if isolate and mesh is not None:
        raise ValueError("plan(isolate=True) builds the mesh from cfg.mesh in each process: give no mesh")
    pieces = Pieces(cfg, target, batch_specs, mesh, isolate, child_memory_gib)
    step = pieces.run("step", step_numbers)
    numbers = step.result()  # without the step there is no plan
    outcomes, model_flops, flops = [step], numbers["hardware_flops"], None
    if cfg.remat and with_model_flops:
        flops = pieces.run("FLOPs without remat (traced)", model_step_flops)
        outcomes.append(flops)
        model_flops = flops.value  # None when it failed: no MFU, the reason in the report
    estimate = None
    if cfg.scan_blocks and target is not None and target.platform == "tpu" and with_model_flops:
        estimate, points = time_estimate(pieces, numbers["hardware_flops"])
        outcomes.extend(points)
    report = step_report(numbers, target, trainable_params=numbers["trainable_params"], model_flops=model_flops,
                         images_per_step=cfg.batch_size, margin=margin, estimate=estimate)
    if flops is not None and flops.error is not None:
        report["model_flops_error"] = f"{flops.task}: {flops.error}"
    if isolate:
        report["host_peak_rss_gib"] = step.peak_rss_gib  # the step's compile, as in one process
        report["processes"] = [o.summary() for o in outcomes]
    return report


class Pieces:
    """How :func:`plan` runs its pieces (the step, the FLOPs trace, each estimate compile): here, or each in a
    fresh process given the config, the target by name and the module that registers the task."""

    def __init__(self, cfg: TrainConfig, target: Target | None, batch_specs, mesh, isolate: bool,
                 memory_limit_gib: float | None = None):
        self.cfg, self.batch_specs, self.isolate, self.memory_limit_gib = cfg, batch_specs, isolate, memory_limit_gib
        self.target = (None if target is None else target.name) if isolate else target
        self.mesh = mesh
        self.task_module = type(get_task(cfg.stage)).__module__  # an unknown stage fails here, before any child

    def run(self, task: str, piece, *args) -> ChildOutcome:
        if not self.isolate:
            return in_process(task, piece, self.cfg, self.target, self.batch_specs, self.mesh, *args)
        return run_in_child(task, f"{__name__}:run_piece", self.task_module, piece.__name__, self.cfg,
                            self.target, self.batch_specs, None, *args, memory_limit_gib=self.memory_limit_gib)


def run_piece(task_module: str, piece: str, *args):
    """A child's entry (``Pieces.run``): register the task (its module), then run the piece."""
    import importlib

    importlib.import_module(task_module)
    if piece not in PIECES:
        raise ValueError(f"{piece!r} is not a plan piece: one of {sorted(PIECES)}")
    return PIECES[piece](*args)


def _target_and_mesh(cfg: TrainConfig, target, mesh):
    target = plan_target(target) if isinstance(target, str) else target
    return target, mesh or plan_mesh(cfg, target)


def step_numbers(cfg: TrainConfig, target, batch_specs, mesh) -> dict:
    """The step compiled for ``target`` (a Target or its name): what the report needs, as plain data."""
    target, mesh = _target_and_mesh(cfg, target, mesh)
    start = time.perf_counter()
    traced, trainable = traced_step(cfg, mesh, batch_specs)
    lowered = traced.lower()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    cost = compile_report.xla_cost(compiled, lowered_text=lowered.as_text())
    return {"memory": compile_report.xla_memory(compiled) or {}, "cost": cost,
            "compile_s": compile_s, "hardware_flops": compile_report.jaxpr_flops(traced.jaxpr),
            "trainable_params": trainable, "mesh": dict(mesh.shape), "devices": int(mesh.devices.size),
            "device_kind": mesh.devices.flat[0].device_kind, "host_peak_rss_gib": compile_report.host_peak_rss_gib()}


def model_step_flops(cfg: TrainConfig, target, batch_specs: dict | None = None, mesh=None) -> float:
    """Matmul/conv FLOPs of the step without remat's recomputation (what MFU counts): the step traced again
    with remat off (tracing only, no compile)."""
    import dataclasses

    target, mesh = _target_and_mesh(cfg, target, mesh)
    traced, _ = traced_step(dataclasses.replace(cfg, remat=None), mesh, batch_specs)
    return compile_report.jaxpr_flops(traced.jaxpr)


def estimate_point(cfg: TrainConfig, target, batch_specs, mesh, scale: int) -> dict:
    """One shallow, loop-free copy of the step compiled (``plan_estimate``): the compiler's seconds, FLOPs."""
    target, mesh = _target_and_mesh(cfg, target, mesh)
    seconds, flops = compiled_point(traced_step, shallow_config(cfg, get_task(cfg.stage), scale), mesh, batch_specs)
    return {"optimal_seconds": seconds, "flops": flops}


PIECES = {f.__name__: f for f in (step_numbers, model_step_flops, estimate_point)}


def time_estimate(pieces: Pieces, full_flops: float) -> tuple[dict, list[ChildOutcome]]:
    """``plan_estimate``'s two shallow compiles (the second only if the first gave a point): the estimate, with
    ``error`` naming the compile that failed and why, and the outcomes."""
    points, outcomes = [], []
    for scale in (1, 2):
        outcome = pieces.run(f"time estimate: shallow step x{scale}", estimate_point, scale)
        outcomes.append(outcome)
        if outcome.error is not None:
            return {"estimated_step_s": None, "estimate_points": points,
                    "error": f"{outcome.task}: {outcome.error}"}, outcomes
        points.append(outcome.value)
    seconds = extrapolate([(p["optimal_seconds"], p["flops"]) for p in points], full_flops)
    return {"estimated_step_s": seconds, "estimate_points": points}, outcomes


def step_report(numbers: dict, target: Target | None, *, trainable_params: int, model_flops: float | None,
                images_per_step: int, margin: float, estimate: dict | None = None) -> dict:
    """The plan's numbers (``numbers``: :func:`step_numbers`); per device unless named otherwise.
    ``estimate``: a step-time estimate from ``plan_estimate`` for a step with loops (``estimated_step_s`` and
    how it was made)."""
    devices = numbers["devices"]
    hbm = target.hbm_gib if target is not None else None
    out = {"target": target.name if target is not None else "current devices",
           "topology": target.topology if target is not None else None,
           "device_kind": target.device_kind if target is not None else numbers["device_kind"], "devices": devices,
           "mesh": numbers["mesh"], "hbm_gib_per_device": hbm, "trainable_params": trainable_params,
           **{f"{k}_gib_per_device": v for k, v in numbers["memory"].items()}}
    out.update(fit_fields(out.get("peak_gib_per_device"), hbm, margin))
    out.update(speed_fields(numbers["cost"], None if model_flops is None else model_flops / devices,
                            target.peak_flops if target is not None else None, images_per_step, estimate))
    out.update(compile_s=round(numbers["compile_s"], 1), host_peak_rss_gib=round(compile_report.host_peak_rss_gib(), 2))
    return out


def fit_fields(peak_gib: float | None, hbm_gib: float | None, margin: float) -> dict:
    """``fits``: the compiler's peak within the chip's HBM less ``margin`` of it (None where either is unknown)."""
    if peak_gib is None or hbm_gib is None:
        return {"fits": None, "margin": margin}
    usable = hbm_gib * (1 - margin)
    return {"fits": bool(peak_gib <= usable), "margin": margin, "usable_gib_per_device": round(usable, 2),
            "headroom_gib_per_device": round(usable - peak_gib, 2)}


def speed_fields(cost: dict, model_flops_per_device: float | None, peak_flops: float | None, images_per_step: int,
                 estimate: dict | None = None) -> dict:
    """FLOPs and the compiler's time estimate; MFU = model FLOPs (no remat recompute) / (estimate x peak)."""
    seconds, source = cost["optimal_seconds"], "TPU compiler cost model (optimal_seconds), not a measurement"
    if seconds is None and estimate is not None and estimate["estimated_step_s"]:
        seconds = estimate["estimated_step_s"]
        source = ("TPU compiler cost model of the step at 1 and 2 units per level (loop-free), extrapolated to "
                  "the full depth by FLOPs (training/plan_estimate.py); not a measurement")
    elif seconds is None and estimate is not None and estimate.get("error"):
        source = f"none: a compile of the time estimate failed ({estimate['error']})"
    elif seconds is None:
        source = "none: XLA gives no time estimate for this backend or for a program with loops"
    out = {"flops_per_step_per_device": model_flops_per_device, "xla_flops_per_step_per_device": cost["flops"],
           "optimal_seconds": cost["optimal_seconds"], "estimated_step_s": seconds, "estimate_source": source}
    if estimate is not None:
        out["estimate_points"] = estimate["estimate_points"]
    out["estimated_mfu"] = (model_flops_per_device / (seconds * peak_flops)
                            if seconds and peak_flops and model_flops_per_device else None)
    out["images_per_s_estimate"] = images_per_step / seconds if seconds else None
    return out


def format_table(report: dict) -> str:
    """A short human summary of a plan report."""
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    fits = {True: "yes", False: "NO", None: "unknown"}[report.get("fits")]
    tflops = None if report["flops_per_step_per_device"] is None else report["flops_per_step_per_device"] / 1e12
    estimate = f"{num(report['estimated_step_s'], '.3g')} (compiler estimate)" if report["estimated_step_s"] else \
        report["estimate_source"]
    rows = [("target", f"{report['target']} ({report['devices']} x {report['device_kind']})"),
            ("mesh", " ".join(f"{k}={v}" for k, v in report["mesh"].items())),
            ("per device GiB", f"arguments {num(report.get('argument_gib_per_device'), '.2f')}, temporaries "
                               f"{num(report.get('temp_gib_per_device'), '.2f')}, peak "
                               f"{num(report.get('peak_gib_per_device'), '.2f')} of {num(report['hbm_gib_per_device'], 'g')}"),
            ("fits", f"{fits} (margin {report['margin']:.0%})"),
            ("TFLOP / step / device", num(tflops, ".3g")),
            ("estimated step s", estimate),
            ("estimated MFU", num(report["estimated_mfu"], ".1%")),
            ("images / s (estimate)", num(report["images_per_s_estimate"], ".3g")),
            ("compile", f"{report['compile_s']:.0f} s, host peak RSS {report['host_peak_rss_gib']:.2f} GiB")]
    rows += [("process", f"{p['task']}: {p['wall_s']:.0f} s, {p['cpu_s']:.0f} CPU s, peak RSS {p['peak_rss_gib']} GiB"
              + (f"; {p['error']}" if "error" in p else "")) for p in report.get("processes", [])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
