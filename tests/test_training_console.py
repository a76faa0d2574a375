"""What the trainer prints (``training/console.py``): the data line of a folder with a captionless
image, the config line of the scripts, every trainer script through the one front (``training/cli.py``), and no
Orbax ArrayMetadata warning. The start-up lines of a
whole tiny run are checked in test_training_interrupt.py (whose runs print them anyway)."""

from __future__ import annotations

import argparse
import logging
import runpy
import sys
from pathlib import Path

import jax
import pytest

from data_testing import write_folder

from cascade_jax.data import make_train_loader
from cascade_jax.training.cli import config_line
from cascade_jax.training.config import training_configs_dir
from cascade_jax.training.console import data_line
from cascade_jax.weights import checkpoint


def test_data_and_config_lines(tmp_path):
    folder = write_folder(tmp_path / "images", 4, skip_caption={3})
    it = iter(make_train_loader({"source": "folder", "paths": [str(folder)]}, global_batch_size=2, image_size=32))
    assert data_line(it) == (f"data: 4 images in {folder} (folder); 1 without a caption will be skipped "
                             f"(e.g. {folder / 'sub' / 'img_003.png'})")
    next(it), next(it)  # 4 usable samples out of 3 per epoch: the captionless one has been met
    assert data_line(it).endswith("; skipped so far: no_caption 1")
    it.close()
    args = argparse.Namespace(config="tiny_c", overrides=["updates=3", "lr=2e-4"])
    path = training_configs_dir() / "tiny_c.yaml"
    assert config_line(args) == f"config: tiny_c ({path}); overrides: updates=3 lr=2e-4"


def test_weights_writer_has_no_array_metadata_warning(caplog):
    """Orbax warns on every numpy-only writer (every export): the warning, and only it, is dropped."""
    with caplog.at_level(logging.WARNING):
        checkpoint._host_array_checkpointer()
        logging.getLogger("absl").warning("another warning")
    assert "ArrayMetadata" not in caplog.text and "another warning" in caplog.text
    assert not logging.getLogger("absl").filters


TRAIN = Path(__file__).resolve().parents[1] / "train"


@pytest.mark.parametrize("script, config", [("train_c.py", "tiny_c"), ("train_c_lora.py", "tiny_c_lora"),
                                            ("train_c_lcm.py", "lcm_c_3b_lora"), ("train_b_lcm.py", "lcm_b_3b_lora"),
                                            ("train_c_controlnet.py", "controlnet_tiny")])
def test_every_trainer_script_is_the_one_front(script, config, monkeypatch, capsys):
    """Each script joins a multi-host run when a coordinator is named, takes --plan and reports a bad value as
    one error line with exit status 2 (a LoRA and an LCM run once had a front of their own without these)."""
    joined = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: joined.append(True))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    monkeypatch.setattr(sys, "argv", [str(TRAIN / script), config, "--plan", "v9-8"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(TRAIN / script), run_name="__main__")
    assert exit_.value.code == 2 and joined == [True]
    assert capsys.readouterr().err.startswith("error: ")
