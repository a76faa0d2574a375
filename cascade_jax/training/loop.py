"""The training loop: build a run (task models split into trainable / frozen, state on the mesh), resume it,
feed it batches. Everything done every N updates (logging, checkpoints, sample collages, an export, a user's
own) is a hook (``training/hooks.py``): the loop knows none of them.

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
from cascade_jax.training.checkpointing import CheckpointHook, TrainCheckpointer
from cascade_jax.training.config import TrainConfig
from cascade_jax.training.finite_guard import FiniteGuard
from cascade_jax.training.hooks import StepInfo, TrainerHooks
from cascade_jax.training.interrupt import Abandoned, StopSignals, TrainingInterrupted, call_abandonably
from cascade_jax.training.metrics_log import LoggingHook
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
    history: list = dataclasses.field(default_factory=list)  # what the logging hook logged
    stack_layouts: dict = dataclasses.field(default_factory=dict)  # scan_blocks: how each U-Net was stacked

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
    modules = task.build(cfg)
    layouts = stack_for_scan(modules, cfg)
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
               state_sh, frozen_sh, stack_layouts=layouts)


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
          progress: bool = True, force_resume: bool = False) -> Run:
    """Train ``cfg.updates`` updates (resuming from ``checkpoint_path/experiment_id`` when a checkpoint is there).

    ``data``: an iterator of per-host loader batches with ``get_state``/``set_state`` (default: the
    Grain loader of ``cfg.data``). ``stop_after``: leave after this many updates in total (tests).
    ``hooks``: a :class:`~cascade_jax.training.hooks.TrainerHooks` or a list of hooks (functions of a ``StepInfo``
    run after every update, or :class:`~cascade_jax.training.hooks.Hook` objects with their ``every``); they run
    after the built-in logging and checkpoint hooks and before the sample collages (``sample_every``).
    ``force_resume``: resume a checkpoint trained with another model, task, batch or data
    (training/resume_check.py). The config is checked against its task and files, then the data, before any
    model is built; one trainer at a time holds the run folder. A NaN or infinite loss or gradient norm raises
    :class:`NonFiniteError` before the bad state is saved or shown to a hook. Ctrl-C or SIGTERM stops after the
    update in flight, saves it and raises :class:`~cascade_jax.training.interrupt.TrainingInterrupted`
    (``training/interrupt.py``). A run that completes runs its hooks' ``end`` (an export) after the signal
    handlers are gone, still holding the run folder.
    """
    task = task or get_task(cfg.stage)
    hooks = hooks if isinstance(hooks, TrainerHooks) else TrainerHooks(hooks)
    check_run(cfg, task)
    check_run_paths(cfg)  # a missing bucket or a permission error: one message now, before any work
    with run_lock(checkpoint_dir(cfg)):
        check_resume_config(checkpoint_dir(cfg), cfg, force_resume)
        with StopSignals() as stop:
            run, done, all_hooks = _train(cfg, task, data, mesh, hooks, stop_after, progress, stop)
        all_hooks.end(done)
    return run


def _train(cfg: TrainConfig, task, data, mesh, user_hooks: TrainerHooks, stop_after, progress, stop: StopSignals):
    """The loop: an update, then the hooks that are due. Returns (run, the last update's StepInfo, the hooks)."""
    from cascade_jax.data import global_batch

    run, data, checkpointer, start = _prepare(cfg, task, data, mesh, stop)
    hooks = _run_hooks(run, data, checkpointer, start, user_hooks, progress)
    console.announce_start(run, data, checkpointer.directory, start, hooks.start_lines())
    guard = FiniteGuard(checkpointer.directory, checkpointer.latest_step)
    done = StepInfo(start, run, data_state=_data_state(data))  # the last completed update
    try:
        for step in range(start + 1, cfg.updates + 1):
            with stop.abandonable():  # waiting for data: the update has not started
                loader_batch = next(data)
            arrays = run.task.host_batch(cfg, loader_batch, host_rng(cfg, step - 1))
            metrics = run.step(global_batch(arrays, run.mesh))
            guard.add(step, metrics)
            done = StepInfo(step, run, metrics, loader_batch, _data_state(data))
            due = hooks.due(done)
            if due:
                guard.check()  # nothing non-finite is logged, saved or handed to a hook
            hooks.run(due, done)
            if stop.requested(step) or (stop_after is not None and step >= stop_after):
                break
    except Abandoned:
        pass  # raised before the update it interrupted changed the state: `done` is intact
    finally:
        try:
            if stop.signum is not None:
                guard.check()  # an interrupted run saves its last update only if it is finite
                hooks.interrupted(done)
        finally:
            hooks.close()
    if stop.signum is not None:
        raise TrainingInterrupted(stop.signum, done.step, checkpointer.directory)
    return run, done, hooks


def _run_hooks(run: Run, data, checkpointer: TrainCheckpointer, start: int, user_hooks: TrainerHooks,
               progress: bool) -> TrainerHooks:
    """Logging and checkpoints, the user's hooks, then the sample collages (which log their images)."""
    from cascade_jax.training.samples import make_sample_collage

    cfg = run.cfg
    log_hook = LoggingHook(cfg, start, data, progress)
    meta = {"config": json.loads(json.dumps(cfg.to_dict(), default=str))}
    hooks = TrainerHooks([log_hook, CheckpointHook(checkpointer, every=cfg.save_every, meta=meta), *user_hooks.hooks])
    collage = make_sample_collage(run, cfg, data, log_hook.logger.add_image)
    if collage is not None:
        hooks.add_hook(collage)
    return hooks


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


def export_run(run: Run, out_dir) -> dict:
    """Export the run as a complete weights folder (trained model, EMA, frozen parts, tokenizer): see
    ``cascade_jax.training.export``."""
    from cascade_jax.training.export import export_run as export

    return export(run, out_dir)
