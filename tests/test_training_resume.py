"""Checkpoints: a trainer killed with SIGKILL mid-run and resumed ends bit-identical to an
uninterrupted run (parameters, optimizer state, EMA, adaptive buckets, RNG), and its data stream
neither skips nor repeats a batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from training_testing import ToyData, host_params, toy_config

from cascade_jax.training import train
from cascade_jax.training.hooks import TrainerHooks
from cascade_jax.training.loop import build_run, checkpointer_for

HERE = Path(__file__).resolve().parent
UPDATES = 12


def start_trainer(ckpt: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, str(HERE / "training_testing.py"), str(ckpt), str(UPDATES), str(log)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def read_log(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def final_state(ckpt: Path):
    cfg = toy_config(ckpt, updates=UPDATES, save_every=2, keep_checkpoints=2)
    run = build_run(cfg)
    checkpointer = checkpointer_for(cfg)
    try:
        assert checkpointer.latest_step() == UPDATES
        state, data_state, _ = checkpointer.restore(UPDATES, run.state, run.state_shardings)
    finally:
        checkpointer.close()
    return host_params(state), data_state


def test_kill_minus_nine_then_resume_is_bit_identical(tmp_path):
    whole = tmp_path / "whole"
    proc = start_trainer(whole, tmp_path / "whole.log")
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]

    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    proc = start_trainer(killed, log)
    deadline = time.time() + 300
    while len(read_log(log)) < 7 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before_kill = len(read_log(log))
    assert 7 <= done_before_kill < UPDATES, f"the kill came too late ({done_before_kill} updates done)"
    proc = start_trainer(killed, log)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]

    a, data_a = final_state(whole)
    b, data_b = final_state(killed)
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert data_a == data_b == {"position": UPDATES * 8}
    # The resumed run restarted at the last checkpoint (an even step): the updates after it ran
    # again with the same batches and losses; none was skipped.
    records = read_log(log)
    by_step = {}
    for r in records:
        by_step.setdefault(r["step"], set()).add((r["position"], round(r["loss"], 7)))
    assert sorted(by_step) == list(range(1, UPDATES + 1))
    assert all(len(v) == 1 for v in by_step.values()), "a re-run update saw other data or gave another loss"
    whole_losses = {r["step"]: round(r["loss"], 7) for r in read_log(tmp_path / "whole.log")}
    assert {s: next(iter(v))[1] for s, v in by_step.items()} == whole_losses


def test_in_process_resume_and_checkpoint_retention(tmp_path):
    """Two calls of train() (the second resumes) equal one; keep N plus backups are honoured. A user's hook
    (added without touching the loop) runs every 3 updates and when train() returns, on the state of that update."""
    cfg = toy_config(tmp_path / "a", updates=8, save_every=2, keep_checkpoints=2, backup_every=4,
                     ema_start_iters=0, ema_iters=1, ema_beta=0.5, adaptive_loss_weight=True)
    seen = []
    hooks = TrainerHooks()
    hooks.add_hook(lambda info: seen.append((info.step, int(info.state.step), info.final)), every=3, at_end=True)
    train(cfg, data=ToyData(8), stop_after=5, progress=False, hooks=hooks)
    resumed = train(cfg, data=ToyData(8), progress=False, hooks=hooks)
    # 3, then 5 (stop_after); resumed from the checkpoint of 4: 6, then the last update.
    assert seen == [(3, 3, False), (5, 5, False), (6, 6, False), (8, 8, True)]
    once = train(toy_config(tmp_path / "b", **{k: getattr(cfg, k) for k in (
        "updates", "save_every", "keep_checkpoints", "backup_every", "ema_start_iters", "ema_iters", "ema_beta",
        "adaptive_loss_weight")}), data=ToyData(8), progress=False)
    for key, value in host_params(once.state).items():
        np.testing.assert_array_equal(host_params(resumed.state)[key], value, err_msg=key)
    kept = sorted(int(p.name) for p in (tmp_path / "a" / "ckpt" / "toy").iterdir() if p.name.isdigit())
    assert kept == [4, 6, 8], kept  # the last two, plus every 4th as a backup
