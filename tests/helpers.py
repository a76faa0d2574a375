"""Test helpers shared across test files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def nchw_to_nhwc(x):
    x = np.asarray(x)
    return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


def nhwc_to_nchw(x):
    x = np.asarray(x)
    return x.transpose(0, 3, 1, 2) if x.ndim == 4 else x


def relative_error(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the parity figure every test states its bound in."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference {ref.shape}"
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def fixture(fixtures_dir: Path, name: str):
    """(config dict, io arrays, weights path) of one official fixture folder."""
    folder = fixtures_dir / name
    config = json.loads((folder / "config.json").read_text())
    return config, dict(np.load(folder / "io.npz")), folder / "weights.safetensors"


def load_fixture_model(model_name: str, config: dict, weights: Path, tmp_path: Path, dtype="float32"):
    """Convert official-format ``weights`` with the real converter and load the result."""
    import cascade_jax
    from cascade_jax.weights.convert import convert_checkpoint

    out = tmp_path / f"{model_name}_converted"
    convert_checkpoint(model_name, config, weights, out, dtype=dtype)
    return cascade_jax.load_model(out)
