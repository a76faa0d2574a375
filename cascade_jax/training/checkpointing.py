"""Train checkpoints with an Orbax ``CheckpointManager``: async saves every ``save_every`` updates,
the last ``keep_checkpoints`` kept plus every ``backup_every``-th one, and on resume the train
state (parameters, optimizer state, EMA, step, RNG, adaptive buckets), the data iterator's
position and the run's config restored together.

The state is stored as a flat ``{name: array}`` mapping (names from the pytree paths), so it
restores into any mesh: the caller passes the target shardings. The folder may be a ``gs://`` URL:
Orbax writes there through TensorStore and marks a finished step with a commit file, so a process
killed during a save resumes from the last complete step.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from cascade_jax import storage
from cascade_jax.training.hooks import Hook, StepInfo
from cascade_jax.training.storage_errors import quiet_orbax_noise, storage_errors


def _name(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return ".".join(parts)


def flatten_state(tree) -> dict:
    flat = {_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    if len(flat) != len(jax.tree.leaves(tree)):
        raise ValueError("train state has two leaves with the same checkpoint name")
    return flat


def unflatten_state(template, flat: dict):
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    missing = [_name(p) for p, _ in paths if _name(p) not in flat]
    if missing:
        raise KeyError(f"checkpoint lacks {missing[:10]} ({len(missing)} entries): saved by another task or config?")
    return jax.tree_util.tree_unflatten(treedef, [flat[_name(p)] for p, _ in paths])


class TrainCheckpointer:
    def __init__(self, directory, *, save_every: int, keep: int, backup_every: int | None, use_async: bool):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=backup_every or None,
                                               save_interval_steps=save_every, enable_async_checkpointing=use_async,
                                               create=True, cleanup_tmp_directories=True)  # one trainer: run_lock
        # A local folder, or a gs:// URL (a string: pathlib folds "//"), which Orbax writes through TensorStore.
        self.directory = storage.orbax_path(directory, "checkpoint folder") if storage.is_url(directory) else \
            Path(directory).absolute()
        # Handlers named up front (not just item names): item_metadata() then reads a step's shapes without restoring it.
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self.unquiet = quiet_orbax_noise()  # a full disk is one DiskFullError, not Orbax's per-thread tracebacks
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self.saved_step = self.manager.latest_step()  # the last step saved (or being saved) by anyone

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict | None, meta: dict, force: bool = False) -> bool:
        with storage_errors(self.directory, self.manager.all_steps):
            saved = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(flatten_state(state)),
                data=ocp.args.JsonSave(data_state or {}),
                meta=ocp.args.JsonSave(meta)), force=force)
        if saved:
            self.saved_step = step
        return saved

    def save_if_new(self, step: int, state, data_state: dict | None, meta: dict) -> bool:
        """Save ``step`` now unless it is saved already or nothing has trained (an interrupted run)."""
        if step == 0 or step == self.saved_step:
            return False
        return self.save(step, state, data_state, meta, force=True)

    def restore(self, step: int, state_template, shardings):
        """(state, data iterator state, meta) of ``step``, arrays placed with ``shardings`` (a tree like the state)."""
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                state_template, shardings)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(flatten_state(abstract)),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return unflatten_state(state_template, restored["state"]), restored["data"], restored["meta"]

    def stored_shapes(self, step: int) -> dict[str, tuple]:
        """``{state entry name: shape}`` of ``step`` as written, read from its metadata (no arrays)."""
        tree = self.manager.item_metadata(step)["state"]
        tree = getattr(tree, "tree", tree)
        return {name: tuple(meta.shape) for name, meta in (tree or {}).items()}

    def wait(self):
        with storage_errors(self.directory, self.manager.all_steps):
            self.manager.wait_until_finished()

    def close(self):
        try:
            with storage_errors(self.directory, self.manager.all_steps):
                self.manager.close()
        finally:
            self.unquiet()

    def finish(self):
        """Wait for the saves in flight, then close, even when the wait fails (a full disk)."""
        try:
            self.wait()
        finally:
            self.close()


class CheckpointHook(Hook):
    """Saves the state and the data position as Orbax would (multiples of ``save_every``, the first update of a
    folder without checkpoints, the last update forced), the last completed update of an interrupted run, and
    waits for the saves in flight when the run ends. ``meta``: stored beside each step (the run's config)."""

    def __init__(self, checkpointer: TrainCheckpointer, *, every: int, meta: dict):
        super().__init__(every=every)
        self.checkpointer, self.meta = checkpointer, meta

    def due(self, info: StepInfo) -> bool:
        return super().due(info) or info.final or self.checkpointer.latest_step() is None

    def run(self, info: StepInfo):
        self.checkpointer.save(info.step, info.state, info.data_state, self.meta, force=info.final)

    def interrupted(self, info: StepInfo):
        self.checkpointer.save_if_new(info.step, info.state, info.data_state, self.meta)

    def close(self):
        self.checkpointer.finish()
