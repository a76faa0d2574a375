"""Ctrl-C / SIGTERM during training (``training/interrupt.py``): the run stops after the update in
flight, saves a checkpoint at it, prints how to resume and exits with 128 + the signal and no
traceback; a second signal during the save changes nothing; resuming ends bit-identical to a run
that was never interrupted; where nothing trained can be lost (a compile) the signal abandons the
work at once. The runs here also show the trainer's start-up lines (``training/console.py``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from training_testing import ToyData, host_params, interruptible_config, toy_config

from cascade_jax.training import train
from cascade_jax.training.checkpointing import TrainCheckpointer
from cascade_jax.training.export import ExportHook
from cascade_jax.training.interrupt import Abandoned, StopSignals, call_abandonably, exit_status
from cascade_jax.training.loop import checkpointer_for

HERE = Path(__file__).resolve().parent
UPDATES = 8
SETTINGS = {"updates": UPDATES, "save_every": 3, "keep_checkpoints": 5, "ema_start_iters": 0, "ema_iters": 1,
            "ema_beta": 0.5, "adaptive_loss_weight": True, "async_checkpointing": True}


@pytest.fixture
def restore_signal_handlers():
    """exit_status leaves SIGINT/SIGTERM ignored (its script exits next): give pytest its handlers back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def latest_step(cfg) -> int | None:
    checkpointer = checkpointer_for(cfg)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def test_sigterm_saves_the_update_in_flight_and_resume_is_bit_identical(tmp_path, capsys, monkeypatch,
                                                                        restore_signal_handlers):
    cfg = toy_config(tmp_path / "a", **SETTINGS)

    def sigterm_at_update_5(info):
        if info.step == 5:  # guard: without train()'s handler this signal would end pytest
            assert getattr(signal.getsignal(signal.SIGTERM), "graceful", False), "train() installed no handler"
            os.kill(os.getpid(), signal.SIGTERM)

    real_save = TrainCheckpointer.save_if_new

    def save_with_a_second_signal(self, *args):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the checkpoint is being written
        return real_save(self, *args)

    monkeypatch.setattr(TrainCheckpointer, "save_if_new", save_with_a_second_signal)

    def work() -> int:
        train(cfg, data=ToyData(8), hooks=[sigterm_at_update_5, ExportHook(tmp_path / "export")], progress=False)
        return 0

    assert exit_status(work) == 143
    out = capsys.readouterr().out
    # The start-up lines, once each, then the compile of the first update and its time.
    checkpoints = tmp_path / "a" / "ckpt" / "toy"
    start_up = [
        "parameters: 800 trainable (generator 800), 256 frozen (frozen 256)",  # ToyNet 16x32+32+32x8; 16x16
        "mesh: data=8 fsdp=1 tensor=1 over 8 CPU device(s); global batch 8",  # conftest's 8 virtual devices
        f"checkpoints: {checkpoints} (every 3 updates, the last 5 kept)",
        f"TensorBoard: tensorboard --logdir {tmp_path / 'a' / 'out' / 'toy' / 'logs'}",
        f"export: {tmp_path / 'export'} (at the end)",
        "starting at step 0 (of 8)",
        "compiling the first update (one-time)...",
    ]
    lines = out.splitlines()
    assert lines[:len(start_up)] == start_up
    assert re.fullmatch(r"compiled in \d+\.\d s", lines[len(start_up)]), lines
    assert "SIGTERM: stopping after the update in progress and saving a checkpoint" in out
    assert "still saving the checkpoint, please wait" in out
    assert f"stopped after update 5; checkpoint in {checkpoints}" in out
    assert "resume with: " in out
    assert latest_step(cfg) == 5  # save_every=3 saved 3; the interruption saved 5

    monkeypatch.undo()
    resumed = train(cfg, data=ToyData(8), progress=False)
    assert "resuming from step 5 (of 8)" in capsys.readouterr().out
    once = train(toy_config(tmp_path / "b", **SETTINGS), data=ToyData(8), progress=False)
    expected = host_params(once.state)
    for key, value in host_params(resumed.state).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


def read_steps(log: Path) -> list[int]:
    return [json.loads(line)["step"] for line in log.read_text().splitlines()] if log.is_file() else []


def test_ctrl_c_stops_a_trainer_process_cleanly(tmp_path):
    """A real Ctrl-C to a trainer process (the toy task under the trainer scripts' exit handling)."""
    log = tmp_path / "log"
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, str(HERE / "training_testing.py"), "interruptible", str(tmp_path),
                             str(log)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while len(read_steps(log)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    last = read_steps(log)[-1]  # the hook logs each update as it completes, before the loop stops
    assert f"stopped after update {last}; checkpoint in" in out
    resume = next(line for line in out.splitlines() if line.startswith("resume with: "))
    assert resume.endswith(f"python {HERE / 'training_testing.py'} interruptible {tmp_path} {log}"), resume
    assert latest_step(interruptible_config(tmp_path)) == last


def test_a_signal_abandons_a_compile():
    """A compile holds its thread inside XLA, where no Python signal handler runs: call_abandonably runs it
    on a worker thread, so the signal is handled at once in the waiting main thread."""
    def slow_compile():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)

    start = time.perf_counter()
    with StopSignals() as stop:
        assert signal.getsignal(signal.SIGINT) == stop._handle  # guard: else the signal ends pytest
        with pytest.raises(Abandoned):
            call_abandonably(slow_compile)
    assert time.perf_counter() - start < 4 and stop.signum == signal.SIGINT
    assert call_abandonably(lambda: 7) == 7  # without a StopSignals: a plain call
