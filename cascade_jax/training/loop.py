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

from cascade_jax import storage
from cascade_jax.compile_report import xla_cost
from cascade_jax.sharding import make_mesh
from cascade_jax.training import console, placement
from cascade_jax.training.checkpointing import TrainCheckpointer
from cascade_jax.training.config import TrainConfig
from cascade_jax.training.finite_guard import FiniteGuard
from cascade_jax.training.hooks import Hook, MetricsLogger, peak_flops_per_device
from cascade_jax.training.interrupt import Abandoned, StopSignals, TrainingInterrupted, call_abandonably
from cascade_jax.training.optimizer import make_optimizer
from cascade_jax.training.paths import check_run_paths
from cascade_jax.training.resume_check import check_resume_config, check_resume_state
from cascade_jax.training.run_checks import check_run
from cascade_jax.training.run_lock import run_lock
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
            what = f"the update for a new batch shape ({console.batch_shapes(batch)})" if self.compiled else \
                "the first update"
            with console.compiling(what):
                self.compiled[key] = call_abandonably(lambda: step_fn.lower(self.state, self.frozen, batch).compile())
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


def checkpoint_dir(cfg: TrainConfig):
    """``checkpoint_path/experiment_id``: a Path, or a string for a bucket URL (pathlib folds ``gs://``)."""
    if storage.is_url(cfg.checkpoint_path):
        return storage.join(cfg.checkpoint_path, cfg.experiment_id)
    return Path(cfg.checkpoint_path) / cfg.experiment_id


def checkpointer_for(cfg: TrainConfig) -> TrainCheckpointer:
    return TrainCheckpointer(checkpoint_dir(cfg), save_every=cfg.save_every,
                             keep=cfg.keep_checkpoints, backup_every=cfg.backup_every,
                             use_async=cfg.async_checkpointing)


def resume(run: Run, checkpointer: TrainCheckpointer, data) -> int:
    """Restore the latest checkpoint into ``run`` and ``data``; returns the update count to start at.
    (``train`` compared the configs before building; a state of other shapes is refused here, by name.)"""
    step = checkpointer.latest_step()
    if step is None:
        return 0
    check_resume_state(checkpointer, step, run.state)
    run.state, data_state, _ = checkpointer.restore(step, run.state, run.state_shardings)
    if hasattr(data, "set_state") and data_state:
        data.set_state(data_state)
    return step


def train(cfg: TrainConfig, *, task: Task | None = None, data=None, mesh=None, hooks=(), stop_after: int | None = None,
          progress: bool = True, export_dir=None, force_resume: bool = False) -> Run:
    """Train ``cfg.updates`` updates (resuming from ``checkpoint_path/experiment_id`` when a checkpoint is there).

    ``data``: an iterator of per-host loader batches with ``get_state``/``set_state`` (default: the
    Grain loader of ``cfg.data``). ``stop_after``: leave after this many updates in total (tests).
    ``hooks`` run after each update's checkpoint; with ``sample_every`` set, the sample-collage hook
    (``training/samples.py``) runs after them. ``export_dir``: only named in the start-up lines.
    ``force_resume``: resume a checkpoint trained with another model, task, batch or data
    (training/resume_check.py). The config is checked against its task and files, then the data, before any
    model is built; one trainer at a time holds the run folder. A NaN or infinite loss or gradient norm raises
    :class:`NonFiniteError` before the bad state is saved. Ctrl-C or SIGTERM stops after the update in flight,
    saves it and raises :class:`~cascade_jax.training.interrupt.TrainingInterrupted` (``training/interrupt.py``).
    """
    task = task or get_task(cfg.stage)
    check_run(cfg, task)
    check_run_paths(cfg)  # a missing bucket or a permission error: one message now, before any work
    with run_lock(checkpoint_dir(cfg)):
        check_resume_config(checkpoint_dir(cfg), cfg, force_resume)
        with StopSignals() as stop:
            return _train(cfg, task, data, mesh, hooks, stop_after, progress, export_dir, stop)


def _train(cfg: TrainConfig, task, data, mesh, hooks, stop_after, progress, export_dir, stop: StopSignals) -> Run:
    from cascade_jax.data import global_batch
    from cascade_jax.training.samples import make_sample_collage

    run, data, checkpointer, start = _prepare(cfg, task, data, mesh, stop)
    console.announce_start(run, data, checkpointer.directory, start, export_dir)
    guard = FiniteGuard(checkpointer.directory, checkpointer.latest_step)
    logger = MetricsLogger(storage.join(cfg.output_path, cfg.experiment_id, "logs"), total_steps=cfg.updates,
                           start_step=start, images_per_step=cfg.batch_size, smoothing=cfg.loss_smoothing,
                           step_flops=None, peak_flops=peak_flops_per_device(cfg.peak_flops), progress=progress)
    collage = make_sample_collage(run, cfg, data, logger.add_image)
    hooks = (*hooks, Hook(cfg.sample_every, collage)) if collage is not None else tuple(hooks)
    meta = {"config": json.loads(json.dumps(cfg.to_dict(), default=str))}
    done = (start, _data_state(data))  # the last completed update and the data position after it
    try:
        for step in range(start + 1, cfg.updates + 1):
            with stop.abandonable():  # waiting for data: the update has not started
                loader_batch = next(data)
            if collage is not None:
                collage.remember(loader_batch)  # Stage B reconstructs images of the first batch
            arrays = run.task.host_batch(cfg, loader_batch, host_rng(cfg, step - 1))
            metrics = run.step(global_batch(arrays, run.mesh))
            guard.add(step, metrics)
            if logger.step_flops is None:
                logger.step_flops = run.step_flops()
            if step % cfg.log_every == 0 or step == cfg.updates or step == start + 1:
                guard.check()
                run.history.append(logger.update(step, metrics, _skips(data)) | {"step": step})
            if _reads_state(step, cfg, hooks, checkpointer):
                guard.check()  # nothing non-finite is saved or handed to a hook
            done = (step, _data_state(data))
            checkpointer.save(step, run.state, done[1], meta, force=step == cfg.updates)
            for hook in hooks:
                hook(step, run.state, metrics)
            if stop.requested(step) or (stop_after is not None and step >= stop_after):
                break
    except Abandoned:
        pass  # raised before the update it interrupted changed the state: `done` is intact
    finally:
        try:
            if stop.signum is not None:
                guard.check()  # an interrupted run saves its last update only if it is finite
                checkpointer.save_if_new(done[0], run.state, done[1], meta)
        finally:
            checkpointer.finish()
            logger.close()
    if stop.signum is not None:
        raise TrainingInterrupted(stop.signum, done[0], checkpointer.directory)
    return run


def _prepare(cfg: TrainConfig, task, data, mesh, stop: StopSignals):
    """(run, data iterator, checkpointer, step to start after), resumed from the latest checkpoint. The data comes
    first: a folder without usable images is refused before any model is built."""
    try:
        with stop.abandonable():  # nothing is trained yet: a signal stops at once
            data = data if data is not None else make_data_iterator(cfg)
            run = build_run(cfg, task, mesh)
            checkpointer = checkpointer_for(cfg)
            try:
                return run, data, checkpointer, resume(run, checkpointer, data)
            except BaseException:  # a refused resume: the checkpointer's threads and log filter go with it
                checkpointer.close()
                raise
    except Abandoned:
        raise TrainingInterrupted(stop.signum, None, checkpoint_dir(cfg)) from None


def _data_state(data) -> dict | None:
    return data.get_state() if hasattr(data, "get_state") else None


def _reads_state(step: int, cfg: TrainConfig, hooks, checkpointer: TrainCheckpointer) -> bool:
    """Whether update ``step`` is saved or shown to a hook: Orbax saves multiples of save_every, the last update
    (forced) and the first one of a run folder without checkpoints."""
    saved = step % cfg.save_every == 0 or step == cfg.updates or checkpointer.latest_step() is None
    return saved or any(h.every and step % h.every == 0 for h in hooks)


def _skips(data) -> dict:
    counts = getattr(data, "skip_counts", None)
    storage_faults = {f"storage_{k}": v for k, v in storage.fault_counts().items()}  # retries, skipped shards
    return ({f"skipped_{k}": v for k, v in counts.items()} if counts else {}) | storage_faults


def export_run(run: Run, out_dir) -> dict:
    """Export the run as a complete weights folder (trained model, EMA, frozen parts, tokenizer): see
    ``cascade_jax.training.export``."""
    from cascade_jax.training.export import export_run as export

    return export(run, out_dir)
