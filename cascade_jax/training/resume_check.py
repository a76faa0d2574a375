"""Before resuming: compare the checkpointed run with this one, say what changed, refuse what cannot resume.

A checkpoint stores the config it was trained with. Resuming prints every key that differs. Changes
of what the run *is* (the model, the task, the batch, the data) are refused unless ``--force-resume``
(``train(force_resume=True)``): they would continue another experiment under this one's name. A
train state whose stored arrays do not fit this config's model cannot be restored at all: that is
refused with the entries and both shapes (Orbax's own error is hundreds of lines about a closed
event loop), forced or not. Anything else (lr, updates, save_every, the mesh...) just continues.
"""

from __future__ import annotations

import json

import jax
import orbax.checkpoint as ocp

from cascade_jax.training.checkpointing import flatten_state
from cascade_jax.training.config import TrainConfig

# Keys that decide what is trained and on what: changed, the run is another experiment.
IDENTITY_KEYS = ("stage", "model_version", "model_config", "train_filter", "rank", "module_filters", "train_tokens",
                 "controlnet_blocks", "controlnet_filter", "controlnet_bottleneck_mode",
                 "batch_size", "image_size", "multi_aspect_ratio", "webdataset_path", "dataset_filters", "data",
                 "cached_conditions")
SHOWN = 8  # differing entries listed in a message


class ResumeError(ValueError):
    """The checkpoint in the run folder cannot (or should not) continue with this config."""


def config_json(cfg: TrainConfig) -> dict:
    """The config as it is stored in a checkpoint's ``meta`` (plain JSON values)."""
    return json.loads(json.dumps(cfg.to_dict(), default=str))


def config_differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """``(key, saved value, current value)`` for each top-level key that differs; a key the saved config
    lacks (written by an older version) counts only when its current value is not the default."""
    defaults = config_json(TrainConfig())  # a valid config: every field at its default
    out = []
    for key, value in current.items():
        if key not in saved:
            if value != defaults.get(key):
                out.append((key, "(not set)", value))
        elif saved[key] != value:
            out.append((key, saved[key], value))
    return out


def shape_differences(stored: dict[str, tuple], state) -> list[str]:
    """Entries of this run's train state missing from the checkpoint or stored with another shape."""
    wanted = {name: tuple(leaf.shape) for name, leaf in flatten_state(state).items()}
    problems = [f"{name}: the checkpoint has {stored[name]}, this config's model needs {shape}"
                for name, shape in wanted.items() if name in stored and stored[name] != shape]
    problems += [f"{name}: not in the checkpoint (this config's model has it, shape {wanted[name]})"
                 for name in wanted if name not in stored]
    problems += [f"{name}: in the checkpoint ({stored[name]}), not in this config's model"
                 for name in stored if name not in wanted]
    # The parameters say it most plainly; their optimizer moments and EMA repeat the same story.
    params = [p for p in problems if p.startswith("params.")]
    return params or problems


def _listing(lines: list[str]) -> str:
    more = f"\n  ... and {len(lines) - SHOWN} more" if len(lines) > SHOWN else ""
    return "\n  " + "\n  ".join(lines[:SHOWN]) + more


def stored_config(directory) -> tuple[int, dict] | None:
    """(latest step, its saved config) of the run folder ``directory``, or None when it holds no finished
    checkpoint; read without building anything (the step's ``meta`` item only)."""
    steps = ocp.utils.checkpoint_steps(str(directory))  # [] for a folder that does not exist yet
    if not steps:
        return None
    step = max(steps)
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        meta = checkpointer.restore(f"{directory}/{step}/meta") or {}
    return step, meta.get("config") or {}


def check_resume_config(directory, cfg: TrainConfig, force: bool = False) -> None:
    """Before anything is built: print how ``cfg`` differs from the config of the run folder's latest
    checkpoint, and refuse (without ``force``) another model, task, batch or data."""
    found = stored_config(directory)
    if found is None:
        return
    step, saved = found
    where = f"{directory} (step {step})"
    changes = config_differences(saved, config_json(cfg))
    changed = [f"{key}: {_shown(old)} -> {_shown(new)}" for key, old, new in changes]
    if changes and jax.process_index() == 0:
        print(f"resuming {where} with a changed config:{_listing(changed)}", flush=True)
    identity = [line for (key, _, _), line in zip(changes, changed) if key in IDENTITY_KEYS]
    if identity and not force:
        raise ResumeError(f"{where} was trained with another model, task, batch or data; resuming would continue "
                          f"that run under this config:{_listing(identity)}\nRestore those keys, start a new run "
                          "(another experiment_id), or pass --force-resume to continue it anyway")


def check_resume_state(checkpointer, step: int, state) -> None:
    """The checkpoint's stored arrays fit this run's train state (same entries, same shapes), or a
    :class:`ResumeError` naming them with both shapes; no forcing helps here."""
    shapes = shape_differences(checkpointer.stored_shapes(step), state)
    if shapes:
        raise ResumeError(f"cannot resume {checkpointer.directory} (step {step}): its train state does not fit this "
                          f"config's model ({len(shapes)} entries differ):{_listing(shapes)}\nResume with the config it "
                          "was trained with, or start a new run: another experiment_id (or checkpoint_path)")


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value)
