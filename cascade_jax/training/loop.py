"""The training loop: build a run (task models split into trainable / frozen, state on the mesh),
feed it batches, log, checkpoint, resume, export.

Per step the host draws the task's random choices from ``np.random.default_rng((seed, step,
process))`` and the device from ``fold_in(state.rng, step)``, so a run resumed from a checkpoint
(state + data iterator position) repeats exactly what an uninterrupted run does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from cascade_jax.compile_report import xla_cost
from cascade_jax.sharding import make_mesh
from cascade_jax.training import placement
from cascade_jax.training.checkpointing import TrainCheckpointer
from cascade_jax.training.config import TrainConfig
from cascade_jax.training.hooks import Hook, MetricsLogger, peak_flops_per_device
from cascade_jax.training.optimizer import make_optimizer
from cascade_jax.training.state import TrainState, init_state
from cascade_jax.training.step import cast_floats, jit_train_step
from cascade_jax.training.task import Task, get_task, stack_for_scan


@dataclasses.dataclass
class Run:
    cfg: TrainConfig
    task: Task
    mesh: Any
    graphdef: Any
    frozen: Any
    state: TrainState
    tx: Any
    state_shardings: Any
    frozen_shardings: Any
    compiled: dict = dataclasses.field(default_factory=dict)
    history: list = dataclasses.field(default_factory=list)

    def step(self, batch):
        """One update on a global batch; compiles once per batch shape."""
        key = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
        if key not in self.compiled:
            step_fn = jit_train_step(self.task, self.cfg, self.graphdef, self.tx, self.state_shardings,
                                     self.frozen_shardings, placement.batch_shardings(batch, self.mesh),
                                     placement.replicated(self.mesh))
            self.compiled[key] = step_fn.lower(self.state, self.frozen, batch).compile()
        self.state, metrics = self.compiled[key](self.state, self.frozen, batch)
        return metrics

    def step_flops(self) -> float | None:
        for compiled in self.compiled.values():
            return xla_cost(compiled)["flops"]
        return None


def build_run(cfg: TrainConfig, task: Task | None = None, mesh=None) -> Run:
    task = task or get_task(cfg.stage)
    mesh = mesh or make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    modules = stack_for_scan(task, task.build(cfg), cfg)
    graphdef, params, frozen = nnx.split(modules, task.trainable(cfg), ...)
    if not jax.tree.leaves(params):
        raise ValueError(f"the {type(task).__name__} filter selects no trainable parameters (train_filter="
                         f"{list(cfg.train_filter)})")
    params = cast_floats(params, cfg.param_dtype)
    frozen = jax.tree.map(lambda v: v.replace(v[...].astype(cfg.compute_dtype)) if isinstance(v, nnx.Param)
                          else v, frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))
    tx = make_optimizer(cfg)
    state = init_state(cfg, params, tx, task.initial_loss_state(cfg))
    rules = cfg.sharding_rules
    state_sh = placement.state_shardings(state, tx, mesh, rules)
    frozen_sh = placement.variable_shardings(frozen, mesh, rules)
    return Run(cfg, task, mesh, graphdef, placement.place(frozen, frozen_sh), placement.place(state, state_sh), tx,
               state_sh, frozen_sh)


def make_data_iterator(cfg: TrainConfig):
    from cascade_jax.data import make_train_loader

    loader = make_train_loader(cfg.data_config(), global_batch_size=cfg.batch_size, image_size=cfg.image_size,
                               multi_aspect_ratio=list(cfg.multi_aspect_ratio) if cfg.multi_aspect_ratio else None,
                               seed=cfg.seed, process_index=jax.process_index(), process_count=jax.process_count())
    return iter(loader)


def host_rng(cfg: TrainConfig, step: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, step, jax.process_index()])


def checkpointer_for(cfg: TrainConfig) -> TrainCheckpointer:
    return TrainCheckpointer(Path(cfg.checkpoint_path) / cfg.experiment_id, save_every=cfg.save_every,
                             keep=cfg.keep_checkpoints, backup_every=cfg.backup_every,
                             use_async=cfg.async_checkpointing)


def resume(run: Run, checkpointer: TrainCheckpointer, data) -> int:
    """Restore the latest checkpoint into ``run`` and ``data``; returns the update count to start at."""
    step = checkpointer.latest_step()
    if step is None:
        return 0
    run.state, data_state, _ = checkpointer.restore(step, run.state, run.state_shardings)
    if hasattr(data, "set_state") and data_state:
        data.set_state(data_state)
    return step


def train(cfg: TrainConfig, *, task: Task | None = None, data=None, mesh=None, hooks=(), stop_after: int | None = None,
          progress: bool = True) -> Run:
    """Train ``cfg.updates`` updates (resuming from ``checkpoint_path/experiment_id`` when a checkpoint is there).

    ``data``: an iterator of per-host loader batches with ``get_state``/``set_state`` (default: the
    Grain loader of ``cfg.data``). ``stop_after``: leave after this many updates in total (tests).
    ``hooks`` run after each update's checkpoint; with ``sample_every`` set, the sample-collage hook
    (``training/samples.py``) runs after them.
    """
    from cascade_jax.data import global_batch
    from cascade_jax.training.samples import make_sample_collage

    run = build_run(cfg, task, mesh)
    collage = make_sample_collage(run, cfg)
    hooks = (*hooks, Hook(cfg.sample_every, collage)) if collage is not None else tuple(hooks)
    data = data if data is not None else make_data_iterator(cfg)
    checkpointer = checkpointer_for(cfg)
    start = resume(run, checkpointer, data)
    logger = MetricsLogger(Path(cfg.output_path) / cfg.experiment_id / "logs", total_steps=cfg.updates,
                           start_step=start, images_per_step=cfg.batch_size, smoothing=cfg.loss_smoothing,
                           step_flops=None, peak_flops=peak_flops_per_device(cfg.peak_flops), progress=progress)
    meta = {"config": json.loads(json.dumps(cfg.to_dict(), default=str))}
    step = start
    try:
        for step in range(start + 1, cfg.updates + 1):
            loader_batch = next(data)
            if collage is not None:
                collage.remember(loader_batch)  # Stage B reconstructs images of the first batch
            arrays = run.task.host_batch(cfg, loader_batch, host_rng(cfg, step - 1))
            metrics = run.step(global_batch(arrays, run.mesh))
            if logger.step_flops is None:
                logger.step_flops = run.step_flops()
            if step % cfg.log_every == 0 or step == cfg.updates or step == start + 1:
                run.history.append(logger.update(step, metrics, _skips(data)) | {"step": step})
            data_state = data.get_state() if hasattr(data, "get_state") else None
            checkpointer.save(step, run.state, data_state, meta, force=step == cfg.updates)
            for hook in hooks:
                hook(step, run.state, metrics)
            if stop_after is not None and step >= stop_after:
                break
    finally:
        checkpointer.wait()
        checkpointer.close()
        logger.close()
    return run


def _skips(data) -> dict:
    counts = getattr(data, "skip_counts", None)
    return {f"skipped_{k}": v for k, v in counts.items()} if counts else {}


def export_run(run: Run, out_dir) -> dict:
    """Export the trained generator (and its EMA) as converted directories plus official safetensors."""
    from cascade_jax.training.export import export_generator, generator_arrays

    model_name, config = run.task.export_model(None)
    out = {"generator": export_generator(Path(out_dir) / "generator", model_name, config,
                                         generator_arrays(run.graphdef, run.state.params, run.frozen))}
    if run.state.ema is not None:
        out["generator_ema"] = export_generator(Path(out_dir) / "generator_ema", model_name, config,
                                                generator_arrays(run.graphdef, run.state.ema, run.frozen))
    return out
