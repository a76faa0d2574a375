"""The trainer's hooks (``training/hooks.py``) without a model: which hooks are due after which update, the end
of a run, an interruption, and closing every hook even when one fails. train() with a user's hook is in
test_training_resume.py (test_in_process_resume_and_checkpoint_retention)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cascade_jax.training.hooks import Hook, StepInfo, TrainerHooks

RUN = SimpleNamespace(cfg=SimpleNamespace(updates=6), state="state")


def drive(hooks: TrainerHooks, updates: int) -> StepInfo:
    """What train() does with its hooks: after each update the due ones, then the end of the run."""
    info = StepInfo(0, RUN)
    for step in range(1, updates + 1):
        info = StepInfo(step, RUN, {"loss": step})
        hooks.run(hooks.due(info), info)
    hooks.end(info)
    return info


def test_hooks_run_every_n_updates_in_order_and_at_the_end():
    calls = []
    hooks = TrainerHooks()
    hooks.add_hook(lambda info: calls.append(("every 2", info.step, info.final)), every=2)
    hooks.add_hook(lambda info: calls.append(("at end", info.step, info.state)), every=0, at_end=True)
    every_4 = hooks.add_hook(Hook(lambda info: calls.append(("every 4 + end", info.step, None)), every=4, at_end=True))
    assert isinstance(every_4, Hook) and len(hooks.hooks) == 3
    drive(hooks, 6)
    assert calls == [("every 2", 2, False), ("every 2", 4, False), ("every 4 + end", 4, None),
                     ("every 2", 6, True), ("at end", 6, "state"), ("every 4 + end", 6, None)]
    calls.clear()
    drive(TrainerHooks([Hook(lambda info: calls.append(info.step), every=3, at_end=True)]), 6)
    assert calls == [3, 6]  # the end of the run is update 6, which it ran for already


def test_a_hook_is_a_function_of_a_step_info_or_a_hook():
    hooks = TrainerHooks()
    with pytest.raises(TypeError, match="function of a StepInfo"):
        hooks.add_hook("not a function")
    with pytest.raises(ValueError, match="every/at_end to its constructor"):
        hooks.add_hook(Hook(print, every=2), every=3)
    with pytest.raises(TypeError, match="the function comes first"):
        Hook(1, print)  # the old Hook(every, fn) order


class Recording(Hook):
    def __init__(self, name: str, log: list, fail_close: bool = False):
        super().__init__(every=1)
        self.name, self.log, self.fail_close = name, log, fail_close
        self.start_line = f"{name}: somewhere"

    def run(self, info):
        self.log.append((self.name, "update", info.step))

    def interrupted(self, info):
        self.log.append((self.name, "interrupted", info.step))

    def close(self):
        self.log.append((self.name, "close"))
        if self.fail_close:
            raise OSError(f"{self.name} could not close")


def test_interruption_and_closing_reach_every_hook_last_added_first():
    log = []
    hooks = TrainerHooks([Recording("log", log), Recording("checkpoint", log, fail_close=True), Recording("user", log)])
    assert hooks.start_lines() == ["log: somewhere", "checkpoint: somewhere", "user: somewhere"]
    hooks.interrupted(StepInfo(5, RUN))
    with pytest.raises(OSError, match="checkpoint could not close"):
        hooks.close()
    assert log == [("log", "interrupted", 5), ("checkpoint", "interrupted", 5), ("user", "interrupted", 5),
                   ("user", "close"), ("checkpoint", "close"), ("log", "close")]
