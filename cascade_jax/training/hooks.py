"""Things done every N updates, outside the loop: logging, checkpoints, sample collages, exports, a user's own.

``train()`` (``training/loop.py``) only runs updates; after each one it hands a :class:`StepInfo` to its
:class:`TrainerHooks`, which call every hook that is due. A user adds one without editing the loop::

    hooks = TrainerHooks()
    hooks.add_hook(lambda info: print(info.step, float(info.metrics["loss"])), every=100)
    train(cfg, hooks=hooks)

A hook sees only finite states: the loop checks the losses of the updates so far before any hook runs.
The built-in hooks (``metrics_log.LoggingHook``, ``checkpointing.CheckpointHook``, ``samples.SampleCollage``,
``export.ExportHook``) are :class:`Hook` subclasses that also act when a run is interrupted or ends.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a hook is given: the run after update ``step`` (1-based; at the start, the update resumed from)."""

    step: int
    run: Any  # training.loop.Run: state, task, config, mesh
    metrics: dict | None = None  # this update's metrics (device arrays); None before any update of this process
    loader_batch: dict | None = None  # the loader batch this update trained on
    data_state: dict | None = None  # the data iterator's position after this update (what a checkpoint saves)

    @property
    def state(self):
        return self.run.state

    @property
    def final(self) -> bool:
        """Whether this is the run's last update (``cfg.updates``)."""
        return self.step == self.run.cfg.updates


class Hook:
    """``fn(info)`` after every ``every``-th update (never with ``every=0``) and, with ``at_end``, once more when
    ``train()`` returns without an interruption (after its last update, ``stop_after``'s, or at once for a resumed
    run with none left), unless it just ran for that update.
    Subclasses may override ``due``, ``interrupted`` (Ctrl-C / SIGTERM: ``info`` is the last completed update),
    ``close`` (always, last) and ``start_line`` (a start-up line saying what the hook writes where)."""

    start_line: str | None = None

    def __init__(self, fn: Callable[[StepInfo], Any] | None = None, every: int = 0, at_end: bool = False):
        if isinstance(fn, int) and callable(every):
            raise TypeError("Hook(fn, every=N): the function comes first")
        self.fn, self.every, self.at_end = fn, int(every or 0), at_end
        self.last_step: int | None = None

    def due(self, info: StepInfo) -> bool:
        return bool(self.every) and info.step % self.every == 0

    def run(self, info: StepInfo):
        self.last_step = info.step
        return self.fn(info)

    def __call__(self, info: StepInfo):
        """Run if due (what the loop does after each update)."""
        if self.due(info):
            return self.run(info)
        return None

    def end(self, info: StepInfo):
        if self.at_end and self.last_step != info.step:
            self.run(info)

    def interrupted(self, info: StepInfo):
        pass

    def close(self):
        pass


class TrainerHooks:
    """The hooks of one run, in the order they were added (levanter's ``TrainerHooks.add_hook``)."""

    def __init__(self, hooks=()):
        self.hooks: list[Hook] = []
        for hook in hooks:
            self.add_hook(hook)

    def add_hook(self, fn, *, every: int | None = None, at_end: bool = False) -> Hook:
        """Add ``fn(info)`` to run every ``every`` updates (and at the end with ``at_end``), or a :class:`Hook`
        as it is; returns the hook."""
        if isinstance(fn, Hook):
            if every is not None or at_end:
                raise ValueError(f"{type(fn).__name__} is a Hook already: give every/at_end to its constructor")
            hook = fn
        elif callable(fn):
            hook = Hook(fn, every=1 if every is None else every, at_end=at_end)
        else:
            raise TypeError(f"a hook is a function of a StepInfo or a Hook, got {type(fn).__name__}")
        self.hooks.append(hook)
        return hook

    def due(self, info: StepInfo) -> list[Hook]:
        return [hook for hook in self.hooks if hook.due(info)]

    def run(self, hooks: list[Hook], info: StepInfo):
        for hook in hooks:
            hook.run(info)

    def end(self, info: StepInfo):
        for hook in self.hooks:
            hook.end(info)

    def interrupted(self, info: StepInfo):
        for hook in self.hooks:
            hook.interrupted(info)

    def start_lines(self) -> list[str]:
        return [hook.start_line for hook in self.hooks if hook.start_line]

    def close(self):
        """Close every hook, the last added first, even when one fails (the first failure is raised)."""
        failure = None
        for hook in reversed(self.hooks):
            try:
                hook.close()
            except BaseException as err:  # noqa: BLE001 - the others still close; the first one is raised below
                failure = failure or err
        if failure is not None:
            raise failure
