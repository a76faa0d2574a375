"""Dry run: compile the train step for a mesh from abstract shapes (no weights, no data) and report
XLA's per-device memory and the step's FLOPs, to size a slice before renting it.

Simulate a mesh on a CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.models.registry import abstract_model
from cascade_jax.sharding import make_mesh
from cascade_jax.training import placement
from cascade_jax.training.config import TrainConfig
from cascade_jax.training.optimizer import make_optimizer
from cascade_jax.training.state import init_state
from cascade_jax.training.step import jit_train_step
from cascade_jax.training.task import TrainModules, get_task


def abstract_modules(task, cfg: TrainConfig, frozen_specs: dict) -> TrainModules:
    """The task's models as shapes only: ``frozen_specs`` maps attribute -> (model name, config)."""
    generator = abstract_model(task.generator_model, task.generator_config(cfg))
    if cfg.remat:
        generator.set_remat(cfg.remat)
    if cfg.dropout:
        generator.train()
    return TrainModules(generator=generator, **{k: abstract_model(*v) for k, v in frozen_specs.items()})


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


def plan(cfg: TrainConfig, batch_specs: dict | None = None, mesh=None) -> dict:
    """Compile one step on abstract inputs; ``batch_specs``: name -> (global shape, dtype), default one square bucket."""
    task = get_task(cfg.stage)
    mesh = mesh or make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    specs = task.frozen_specs(cfg)
    modules = task.adapt_abstract(abstract_modules(task, cfg, specs), cfg)
    batch_specs = batch_specs or default_batch_specs(cfg.stage, cfg, clip_image=specs.get(
        "image_encoder", (None, {}))[1].get("image_size", 224))
    graphdef, params, frozen = nnx.split(modules, task.trainable(cfg), ...)
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
    start = time.perf_counter()
    compiled = step.lower(_abstract(state, state_sh), _abstract(frozen, frozen_sh), _abstract(batch, batch_sh)).compile()
    return report(compiled, mesh, time.perf_counter() - start, params)


def report(compiled, mesh, compile_s: float, params) -> dict:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gib = 2 ** 30
    out = {"devices": int(np.prod(list(mesh.shape.values()))), "mesh": dict(mesh.shape), "compile_s": compile_s,
           "trainable_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
           "flops_per_step_per_device": float(cost.get("flops", 0.0))}
    for name in ("argument", "output", "temp", "generated_code", "alias"):
        value = getattr(mem, f"{name}_size_in_bytes", None)
        if value is not None:
            out[f"{name}_gib_per_device"] = value / gib
    out["peak_gib_per_device"] = (out.get("argument_gib_per_device", 0) + out.get("output_gib_per_device", 0)
                                  + out.get("temp_gib_per_device", 0) - out.get("alias_gib_per_device", 0))
    return out


def default_batch_specs(task_stage: str, cfg: TrainConfig, text_len: int = 77, clip_image: int = 224) -> dict:
    """Global batch shapes of one square ``image_size`` bucket (the largest EfficientNet size for Stage B)."""
    b, s = cfg.batch_size, cfg.image_size
    if cfg.cached_conditions and task_stage == "c":
        side = -(-s // 32)  # EfficientNet: a 32x smaller latent
        generator = get_task("c").generator_config(cfg)
        return {"x0": ((b, side, side, generator.get("c_in", 16)), jnp.float32),
                "clip_text": ((b, text_len, generator.get("c_clip_text", 1280)), jnp.bfloat16),
                "clip_text_pooled": ((b, 1, generator.get("c_clip_text_pooled", 1280)), jnp.bfloat16),
                "clip_img": ((b, 1, generator.get("c_clip_img", 768)), jnp.bfloat16)}
    if cfg.cached_conditions and task_stage == "b":
        side, e = s // 4, s // 32  # Stage A: 4x smaller; EfficientNet of the largest input, (s // 32) * 32 px
        generator = get_task("b").generator_config(cfg)
        return {"x0": ((b, side, side, generator.get("c_in", 4)), jnp.float32),
                "effnet": ((b, e, e, generator.get("c_effnet", 16)), jnp.float32),
                "clip_text_pooled": ((b, 1, generator.get("c_clip", 1280)), jnp.float32)}
    specs = {"images": ((b, s, s, 3), jnp.uint8), "input_ids": ((b, text_len), jnp.int32),
             "attention_mask": ((b, text_len), jnp.int32)}
    if task_stage.split("_")[0] == "c":  # c and the tasks built on it (c_lora)
        specs.update(clip_pixels=((b, clip_image, clip_image, 3), jnp.float32), use_image=((b,), jnp.float32))
    else:
        e = (s // 32) * 32
        specs.update(effnet_images=((b, e, e, 3), jnp.uint8), effnet_keep=((b,), jnp.float32))
    return specs
