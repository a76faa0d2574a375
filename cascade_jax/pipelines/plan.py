"""Plan sampling on a chip: compile the Stage C and Stage B sampling loops and Stage A's decode for a TPU
slice (or simulated CPU devices) from shapes only, and say whether the whole cascade fits a chip and the
compiler's estimate of the seconds per image.

    python sample/generate.py text2img --random full --plan v5e-1 --num-images 4 --dtype bfloat16

Each stage compiles the program the pipeline runs (``stage_runner._run``: the whole loop, CFG by batch
concatenation). Memory is that program's; time is the compiler's estimate of the same program with one
step (XLA gives no estimate for a program with a loop) times the steps. The pipeline keeps every model
resident, so the cascade fits when all weights (CLIP text encoder included) plus the largest stage's
working memory do.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cascade_jax import compile_report
from cascade_jax.accelerators import Target
from cascade_jax.diffusion import SamplerSettings
from cascade_jax.models.registry import abstract_model
from cascade_jax.pipelines.sizes import latent_shapes
from cascade_jax.pipelines.stage_runner import _run, program_settings
from cascade_jax.sharding import batch_axes, make_mesh, variable_shardings

TEXT_TOKENS = 77
DEFAULT_MARGIN = 0.10


def abstract_weights(model_name: str, config: dict, dtype: str):
    """(graphdef, state of ShapeDtypeStructs in ``dtype``) of a model, no values."""
    graphdef, state = nnx.split(abstract_model(model_name, config))
    cast = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                                          else x.dtype)
    return graphdef, jax.tree.map(cast, state)


def weight_gib(state) -> float:
    return float(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))) / compile_report.GIB


class _Placer:
    """Shardings as the stage runner lays things out: variables by their logical axes, the batch over data
    (and fsdp) when it divides, the rest replicated."""

    def __init__(self, mesh: Mesh, rules=None):
        self.mesh, self.rules = mesh, rules

    def state(self, state):
        shardings = variable_shardings(state, self.mesh, self.rules)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)

    def batched(self, tree, batch: int):
        def place(x):
            axes = batch_axes(self.mesh, batch) if x.ndim and x.shape[0] == batch else None
            spec = PartitionSpec(axes, *([None] * (x.ndim - 1))) if axes else PartitionSpec()
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(self.mesh, spec))
        return jax.tree.map(place, tree)


def _stage_args(batch: int, conditions: dict, steps: int, placer: _Placer):
    """The loop's array arguments as ``StageRunner._arguments`` makes them: keys, conditions, unconditional
    ones, no x_init, listener id, positions, then the per-step guidance scales (replicated)."""
    keys = jax.ShapeDtypeStruct((batch,), jax.random.key(0).dtype)
    scalars = (jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32))
    args = placer.batched((keys, conditions, jax.tree.map(lambda x: x, conditions), None, *scalars), batch)
    cfg_scale = jax.ShapeDtypeStruct((steps,), jnp.float32, sharding=NamedSharding(placer.mesh, PartitionSpec()))
    return (*args, cfg_scale)


def _compile_loop(graphdef, settings: SamplerSettings, x_shape: tuple, state, conditions: dict, placer: _Placer):
    batch = next(iter(conditions.values())).shape[0]
    args = _stage_args(batch, conditions, settings.steps, placer)
    return jax.jit(_run, static_argnums=(0, 1, 2, 3)).lower(graphdef, program_settings(settings), x_shape, None,
                                                            state, *args).compile()


def compile_stage(name: str, model: tuple, settings: SamplerSettings, x_shape: tuple, conditions: dict,
                  placer: _Placer) -> dict:
    """Compile a stage's loop (memory) and the same program with one step (the compiler's time estimate)."""
    model_name, config, dtype = model
    graphdef, state = abstract_weights(model_name, config, dtype)
    batch = next(iter(conditions.values())).shape[0]
    state = placer.state(state)
    start = time.perf_counter()
    loop = _compile_loop(graphdef, settings, x_shape, state, conditions, placer)
    compile_s = time.perf_counter() - start
    one_step = dataclasses.replace(settings, steps=1)
    single = loop if settings.steps == 1 else _compile_loop(graphdef, one_step, x_shape, state, conditions, placer)
    step_s = compile_report.xla_cost(single)["optimal_seconds"]
    memory = compile_report.xla_memory(loop) or {}
    return {"stage": name, "steps": settings.steps, "cfg_batch": batch * (2 if settings.cfg is not None else 1),
            "weights_gib": weight_gib(state), "peak_gib_per_device": memory.get("peak"),
            "estimated_step_s": step_s, "estimated_s": step_s * settings.steps if step_s else None,
            "compile_s": round(compile_s, 1)}


def compile_decode(model: tuple, latent_shape: tuple, placer: _Placer) -> dict:
    model_name, config, dtype = model
    graphdef, state = abstract_weights(model_name, config, dtype)
    state = placer.state(state)
    latents = placer.batched(jax.ShapeDtypeStruct(latent_shape, jnp.dtype(dtype)), latent_shape[0])
    start = time.perf_counter()
    compiled = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z)).lower(state, latents).compile()
    cost = compile_report.xla_cost(compiled)["optimal_seconds"]
    return {"stage": "Stage A decode", "weights_gib": weight_gib(state),
            "peak_gib_per_device": (compile_report.xla_memory(compiled) or {}).get("peak"), "estimated_s": cost,
            "compile_s": round(time.perf_counter() - start, 1)}


def plan_sampling(components: dict, target: Target | None, *, height: int, width: int, batch: int, dtype: str,
                  prior: SamplerSettings, decoder: SamplerSettings, mesh=None, rules=None,
                  margin: float = DEFAULT_MARGIN) -> dict:
    """``components``: name -> (model, config) as ``loading.pipeline_set`` gives them. ``mesh``: a spec for
    ``make_mesh`` over the target's devices (default: every device on the data axis, models replicated)."""
    devices = None if target is None else target.devices
    mesh = make_mesh(mesh if mesh is not None else -1, devices=devices) if not isinstance(mesh, Mesh) else mesh
    placer = _Placer(mesh, rules)
    c_cfg, b_cfg = components["stage_c"][1], components["stage_b"][1]
    c_shape, b_shape = latent_shapes(height, width, batch, c_cfg.get("c_in", 16), b_cfg.get("c_in", 4))
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    c_cond = {"clip_text": f32(batch, TEXT_TOKENS, c_cfg.get("c_clip_text", 1280)),
              "clip_text_pooled": f32(batch, 1, c_cfg.get("c_clip_text_pooled", 1280)),
              "clip_img": f32(batch, 1, c_cfg.get("c_clip_img", 768))}
    b_cond = {"effnet": f32(*c_shape), "clip": f32(batch, 1, b_cfg.get("c_clip", 1280))}
    stages = [compile_stage("Stage C", (*components["stage_c"], dtype), prior, c_shape[1:], c_cond, placer),
              compile_stage("Stage B", (*components["stage_b"], dtype), decoder, b_shape[1:], b_cond, placer),
              compile_decode((*components["stage_a"], dtype), b_shape, placer)]
    text_gib = weight_gib(abstract_weights(*components["text_encoder"], dtype)[1])
    return cascade_report(stages, text_gib, target, mesh, batch=batch, size=(height, width), dtype=dtype,
                          margin=margin)


def cascade_report(stages: list, text_gib: float, target: Target | None, mesh, *, batch: int, size, dtype: str,
                   margin: float) -> dict:
    devices = int(mesh.devices.size)
    sharded = any(mesh.shape[a] > 1 for a in ("fsdp", "tensor"))
    resident = sum(s["weights_gib"] for s in stages) + text_gib
    working = max((s["peak_gib_per_device"] or 0) - s["weights_gib"] for s in stages)
    # Weights sharded over fsdp/tensor occupy a share of each device; the stage peaks already count that share.
    per_device = (resident / (mesh.shape["fsdp"] * mesh.shape["tensor"]) if sharded else resident) + working
    hbm = target.hbm_gib if target is not None else None
    seconds = [s.get("estimated_s") for s in stages]
    total = sum(seconds) if all(seconds) else None
    fits = None if hbm is None else bool(per_device <= hbm * (1 - margin))
    verdict = ("unknown (no capacity for this target)" if fits is None else
               f"fits {'one chip' if devices == 1 else f'{devices} chips'}" if fits else
               "does not fit: sample model-parallel (--mesh fsdp=N over more chips) or with a smaller batch")
    return {"target": target.name if target is not None else "current devices",
            "device_kind": target.device_kind if target is not None else mesh.devices.flat[0].device_kind,
            "devices": devices, "mesh": dict(mesh.shape), "size": list(size), "batch": batch, "dtype": dtype,
            "hbm_gib_per_device": hbm, "weights_gib": resident, "text_encoder_weights_gib": text_gib,
            "cascade_peak_gib_per_device": per_device, "fits": fits, "margin": margin, "verdict": verdict,
            "estimated_s_per_batch": total, "estimated_s_per_image": total / batch if total else None,
            "estimate_source": "TPU compiler cost model (one step x steps), not a measurement" if total else
            "none: XLA gives no time estimate on this backend", "stages": stages,
            "host_peak_rss_gib": round(compile_report.host_peak_rss_gib(), 2)}


def format_sampling(report: dict) -> str:
    num = lambda v, f: "-" if v is None else format(v, f)
    lines = [f"{report['target']} ({report['devices']} x {report['device_kind']}), {report['batch']} images of "
             f"{report['size'][0]}x{report['size'][1]}, {report['dtype']}"]
    for s in report["stages"]:
        lines.append(f"  {s['stage']:<15} weights {s['weights_gib']:.2f} GiB, peak {num(s['peak_gib_per_device'], '.2f')}"
                     f" GiB/device, estimated {num(s.get('estimated_s'), '.3g')} s, compiled in {s['compile_s']:.0f} s")
    lines.append(f"  cascade: {report['cascade_peak_gib_per_device']:.2f} GiB per device of "
                 f"{num(report['hbm_gib_per_device'], 'g')} (all weights resident, CLIP text "
                 f"{report['text_encoder_weights_gib']:.2f} GiB): {report['verdict']}")
    lines.append(f"  estimated {num(report['estimated_s_per_image'], '.3g')} s per image (compiler estimate)")
    return "\n".join(lines)
