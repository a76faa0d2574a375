"""Training configs that cannot train are refused by name at load, before any model is built or compiled
(values out of range, broken YAML, missing or mismatched weights): each refusal is timed. Then what a run meets on the way: a NaN loss, a second trainer on the
same run, a resume with a changed config, a full disk."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from training_testing import ToyData, ToyNet, ToyTask, host_params, toy_config

from cascade_jax.models.random_init import random_model
from cascade_jax.nn.params import named_variables
from cascade_jax.training import get_task, load_config, register_task, train
from cascade_jax.training.cli import main as train_main
from cascade_jax.training.cli import reporting_errors
from cascade_jax.training.config import training_configs_dir
from cascade_jax.training.export import export_generator
from cascade_jax.training.finite_guard import NonFiniteError
from cascade_jax.training.loop import build_run, checkpointer_for
from cascade_jax.training import run_lock as run_lock_module
from cascade_jax.training.resume_check import IDENTITY_KEYS, ResumeError, check_resume_config
from cascade_jax.training.run_checks import check_run
from cascade_jax.training.run_lock import RunLock, RunLockedError
from cascade_jax.training.storage_errors import DiskFullError, QuietDiskFull
from cascade_jax.training.validation import CONTROLNET_FILTERS, ConfigError

FAST_S = 3.0  # a refusal at load: no model built, nothing compiled (a tiny compile alone takes longer)


def refused(call, match: str, error=ConfigError):
    start = time.perf_counter()
    with pytest.raises(error, match=match) as info:
        call()
    elapsed = time.perf_counter() - start
    assert elapsed < FAST_S, f"refused after {elapsed:.1f} s"
    return str(info.value)


@pytest.mark.parametrize("override, match", [
    ("updates=0", r"updates=0: use a whole number >= 1"),
    ("updates=-5", r"updates=-5: use a whole number >= 1"),
    ("save_every=0", r"save_every=0: use a whole number >= 1"),
    ("log_every=0", r"log_every=0: use a whole number >= 1"),
    ("keep_checkpoints=0", r"keep_checkpoints=0"),
    ("lr=.nan", r"lr=nan: use a finite number > 0"),
    ("lr=-.inf", r"lr=-inf: use a finite number > 0"),
    ("rank=0", r"rank=0: use a whole number >= 1 \(the LoRA rank\)"),
    ("compute_dtype=float17", r"compute_dtype='float17': use one of float32, bfloat16"),
    ("param_dtype=float16", r"param_dtype='float16'.*overflows"),
    ("seed=-1", r"seed=-1: use a whole number >= 0"),
    ("train_tokens=[['(', null]]", r"train_tokens: '\(' is not a valid regular expression"),
    ("train_filter=['down_blocks[']", r"train_filter: 'down_blocks\[' is not a valid regular expression"),
    ("controlnet_filter_params={resize: -5}", r"controlnet_filter_params.resize=-5: use a whole number >= 1"),
    ("controlnet_filter_params={thresold: [0.5, 0.1]}", r"thresold=\[0.5, 0.1\]: use \[low, high\]"),
    ("controlnet_blocks=[0, -1]", r"controlnet_blocks=\[0, -1\]"),
    ("mesh.data=0", r"mesh.data=0"),
    ("adam_eps=0", r"adam_eps=0"),
    ("multi_aspect_ratio=[1/0]", r"multi_aspect_ratio: aspect ratio '1/0'"),
    ("remat=dots_savable", r"remat='dots_savable' is not a policy"),
    ("dropout=maybe", r"dropout must be true or false, got 'maybe'"),
])
def test_values_are_refused_by_name_at_load(override, match):
    message = refused(lambda: load_config("tiny_c", [override]), match)
    assert "tiny_c.yaml" in message  # and the file they came from


def test_contradictory_keys_are_refused_naming_both():
    message = refused(lambda: load_config("tiny_c", ["generator_checkpoint_path=models/stage_c.safetensors"]),
                      "init='scratch' and generator_checkpoint_path='models/stage_c.safetensors' contradict")
    assert "init: checkpoint" in message
    refused(lambda: load_config("tiny_c", ["ema_iters=1"]), "EMA needs all of ema_start_iters, ema_iters and ema_beta")
    refused(lambda: load_config("finetune_c_3b_lora", ["cached_conditions=true"]),
            "train_tokens=.* cached_conditions")


def test_every_shipped_config_loads():
    for path in sorted(training_configs_dir().glob("*.yaml")):
        load_config(path.stem)


@pytest.mark.parametrize("name, overrides, match", [
    # Item 9: the default init with no weights used to train random weights without a word.
    ("tiny_c", ["init=checkpoint"], r"init: checkpoint \(the default\) needs generator_checkpoint_path.*init: scratch"),
    ("tiny_b", ["init=checkpoint", "generator_checkpoint_path=missing/stage_b.safetensors"],
     r"generator_checkpoint_path=missing/stage_b.safetensors: no such file"),
    ("tiny_c", ["effnet_checkpoint_path=missing/effnet.safetensors"], r"effnet_checkpoint_path=.*no such file"),
    ("tiny_a", ["init=official"], r"init: official does not apply to stage 'a'"),
    # Item 15: ResBlocks the Stage C does not have (the tiny one has 4).
    ("controlnet_tiny", ["controlnet_blocks=[0, 99]"], r"\[99\] do not fit this Stage C, which has 4 ResBlocks"),
    ("controlnet_tiny", ["init=checkpoint"], r"needs generator_checkpoint_path: the stage_c weights"),
    ("tiny_c", ["controlnet_blocks=[0]"], r"controlnet_blocks is set but stage 'c' trains no ControlNet"),
])
def test_task_checks_refuse_before_data_or_models(name, overrides, match):
    import cascade_jax.training.controlnet  # noqa: F401  (registers c_controlnet)

    cfg = load_config(name, overrides)
    # train() itself refuses (its data is never read: there is none here).
    refused(lambda: train(cfg, data=iter(()), progress=False), match,
            error=FileNotFoundError if "no such file" in match else ConfigError)


def test_generator_weights_of_another_size_name_both_structures(tmp_path):
    cfg = load_config("tiny_c")
    wider = {**cfg.model_config, "c_hidden": [48], "c_cond": 48}
    model = random_model("stage_c", wider, seed=0)
    folder, file = export_generator(tmp_path / "wide", "stage_c", wider,
                                    {k: np.asarray(v[...]) for k, v in named_variables(model).items()})
    for path in (folder, file):
        bad = load_config("tiny_c", ["init=checkpoint", f"generator_checkpoint_path={path}"])
        message = refused(lambda: check_run(bad, get_task("c")), "generator_checkpoint_path")
        assert "down [1], up [1]; widths [48]" in message and "down [1], up [1]; widths [32]" in message, message
        assert "lite" not in message and "3.6B" not in message


def test_empty_and_broken_yaml_name_the_file(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    refused(lambda: load_config(str(empty)), f"{empty} is empty", error=ValueError)
    broken = tmp_path / "broken.yaml"
    broken.write_text("stage: c\nlr: 1e-4\nbatch_size: [4\nupdates: 3\n")
    message = refused(lambda: load_config(str(broken)), f"{broken}, line 4, column 8: not valid YAML", error=ValueError)
    assert "<unicode string>" not in message


def test_cli_refusals_are_one_line_and_exit_2(tmp_path, capsys):
    export = tmp_path / "export"
    export.mkdir()
    (export / "generator").write_text("my notes")  # a user's file where the export goes
    args = ["tiny_c", f"checkpoint_path={tmp_path}/ckpt", f"output_path={tmp_path}/out"]
    start = time.perf_counter()
    assert train_main([*args, "--export", str(export)], "c") == 2
    assert train_main([*args, "updates=0"], "c") == 2
    assert train_main([*args, "init=checkpoint"], "c") == 2
    assert time.perf_counter() - start < 3 * FAST_S
    err = capsys.readouterr().err
    assert f"cannot export to {export} at the end of training" in err and "--export" in err and "--output" not in err
    assert "updates=0" in err and "generator_checkpoint_path" in err and "Traceback" not in err
    assert (export / "generator").read_text() == "my notes" and not (tmp_path / "ckpt").exists()


def test_a_users_safetensors_file_in_the_export_folder_is_refused(tmp_path, capsys):
    # An export replaces its whole folder: a folder holding anything no export of this run wrote is refused.
    export = tmp_path / "export"
    export.mkdir()
    (export / "generator.safetensors").write_bytes(b"user weights")
    args = ["tiny_c", f"checkpoint_path={tmp_path}/ckpt", f"output_path={tmp_path}/out", "--export", str(export)]
    assert train_main(args, "c") == 2
    err = capsys.readouterr().err
    assert f"{export} already holds generator.safetensors, which no export of this run wrote" in err
    assert "Traceback" not in err
    assert (export / "generator.safetensors").read_bytes() == b"user weights" and not (tmp_path / "ckpt").exists()


# ---- on the way: NaN, a second trainer, resume, a full disk ----------------------------------------------

class NaNAfter(ToyData):
    """Rows from position ``start`` on are NaN: the loss of the update that reads them is NaN."""

    def __init__(self, batch: int, start: int):
        super().__init__(batch)
        self.start = start

    def __next__(self):
        batch = super().__next__()
        if self.position > self.start:
            batch["x"] = np.full_like(batch["x"], np.nan)
        return batch


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    # Update 4 reads NaN rows; it is due a checkpoint (save_every 2) but not a log line (log_every 3).
    cfg = toy_config(tmp_path, updates=8, save_every=2, log_every=3)
    assert reporting_errors(lambda: train(cfg, data=NaNAfter(8, start=3 * 8), progress=False)) == 1
    err = capsys.readouterr().err
    assert "training stopped at update 4: loss = nan, grad_norm = nan" in err
    assert "the last good checkpoint is step 2" in err and "Traceback" not in err
    checkpointer = checkpointer_for(cfg)
    try:
        assert checkpointer.manager.all_steps() == [1, 2]  # (Orbax saves a run's first update) not update 4
        run = build_run(cfg)
        state, _, _ = checkpointer.restore(2, run.state, run.state_shardings)
    finally:
        checkpointer.close()
    assert all(np.isfinite(v).all() for v in host_params(state.params).values())


def test_a_second_trainer_on_the_same_run_is_refused_until_the_first_dies(tmp_path):
    cfg = toy_config(tmp_path)
    folder = Path(cfg.checkpoint_path) / cfg.experiment_id
    holder_code = ("import importlib.util, sys, time\n"  # run_lock.py alone: a holder that starts in milliseconds
                   "spec = importlib.util.spec_from_file_location('run_lock', sys.argv[1])\n"
                   "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
                   "module.RunLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", holder_code, run_lock_module.__file__, str(folder)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        message = refused(lambda: train(cfg, data=ToyData(8), progress=False), "is in use by", error=RunLockedError)
        assert str(folder) in message and f"pid {holder.pid} on" in message and "experiment_id" in message
    finally:
        holder.kill()  # kill -9: the kernel drops its flock, the lock file stays behind
        holder.wait()
    assert (folder / ".lock").is_file()
    with RunLock(folder):  # a stale lock file blocks nothing
        pass


class WideToyTask(ToyTask):
    """The toy with a wider hidden layer: its checkpoint does not fit the toy's."""

    def build(self, cfg):
        from flax import nnx

        import training_testing

        modules = super().build(cfg)
        rngs = nnx.Rngs(cfg.seed)
        old = training_testing.D_HIDDEN
        training_testing.D_HIDDEN = 48
        try:
            modules.generator = ToyNet(rngs=rngs)
        finally:
            training_testing.D_HIDDEN = old
        return modules


register_task("toy_wide", WideToyTask)


def test_resume_prints_changes_and_refuses_another_run(tmp_path, capfd):
    cfg = toy_config(tmp_path, updates=2, save_every=2)
    train(cfg, data=ToyData(8), progress=False)
    folder = Path(cfg.checkpoint_path) / cfg.experiment_id
    capfd.readouterr()
    # lr and updates may change: printed, and the run goes on.
    check_resume_config(folder, toy_config(tmp_path, updates=3, lr=0.01))
    out = capfd.readouterr().out
    assert "with a changed config" in out and "lr: 0.05 -> 0.01" in out and "updates: 2 -> 3" in out
    # Another batch size continues another run: refused before anything is built, unless forced.
    changed = toy_config(tmp_path, updates=4, batch_size=16)
    message = refused(lambda: train(changed, data=ToyData(16), progress=False), "batch_size: 8 -> 16",
                      error=ResumeError)
    assert "--force-resume" in message
    check_resume_config(folder, changed, force=True)
    # Another model cannot resume at all, forced or not: the entries and both shapes, no Orbax noise.
    wide = toy_config(tmp_path, updates=4, stage="toy_wide")
    with pytest.raises(ResumeError, match=r"does not fit this config's model") as info:  # (after the build)
        train(wide, data=ToyData(8), progress=False, force_resume=True)
    assert "params.generator.w1.value: the checkpoint has (16, 32), this config's model needs (16, 48)" in str(info.value)
    assert "Event loop is closed" not in capfd.readouterr().err
    assert set(IDENTITY_KEYS) <= set(cfg.to_dict())


def test_a_full_disk_is_one_message_and_orbax_logs_stay_quiet(tmp_path, monkeypatch, caplog):
    cfg = toy_config(tmp_path, updates=4, save_every=1)
    import orbax.checkpoint as ocp

    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step >= 3:  # what tensorstore raises when the disk fills
            raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: Failed to write 371 bytes: "
                             "No space left on device [os_error_code='28']")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    folder = Path(cfg.checkpoint_path) / cfg.experiment_id
    with pytest.raises(DiskFullError, match=rf"disk full at {folder}: .*intact \(steps \[1, 2\]\)"):
        train(cfg, data=ToyData(8), progress=False)
    # Orbax's background threads log their tracebacks through absl: the out-of-space ones are dropped.
    quiet = QuietDiskFull()
    full = logging.LogRecord("absl", logging.ERROR, "", 0, "thread failed", (),
                             (OSError, OSError(errno.ENOSPC, "No space left on device"), None))
    other = logging.LogRecord("absl", logging.ERROR, "", 0, "something else failed", (), None)
    assert not quiet.filter(full) and quiet.filter(other)
    assert os.listdir(folder / "2")  # the checkpoints before the full disk are complete


def test_the_validation_knows_the_controlnet_filters():
    from cascade_jax.training.controlnet import FILTERS

    assert set(FILTERS) == set(CONTROLNET_FILTERS)
