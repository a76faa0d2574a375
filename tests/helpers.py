"""Test helpers shared across test files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


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


def randomize_torch_module(module, seed: int = 0):
    """Set every parameter and BatchNorm statistic of a torch module to seeded random values.

    Default inits zero some tensors (Stage A gammas, GRN), which hides bugs. Weights get
    N(0, 1/fan_in) so deep nets stay finite; BatchNorm running_var stays positive.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                value = torch.rand(tensor.shape, generator=generator) + 0.5
            elif tensor.ndim >= 2:
                value = torch.randn(tensor.shape, generator=generator) / tensor[0].numel() ** 0.5
            else:
                value = torch.randn(tensor.shape, generator=generator) * 0.5
            tensor.copy_(value)
    return module.eval()


def read_checkpoint_layout(path: Path) -> dict[str, tuple]:
    """``{key: torch shape}`` of a shared/reference/checkpoint_layouts tsv (``key\\tshape``, 'scalar' = 0-d)."""
    lines = Path(path).read_text().strip().split("\n")
    assert lines[0] == "key\tshape", f"{path}: unexpected header {lines[0]!r}"
    rows = (line.split("\t") for line in lines[1:])
    return {key: () if shape == "scalar" else tuple(int(d) for d in shape.split("x")) for key, shape in rows}


def assert_batch_equals_samples_alone(run, model, inputs: dict, bound: float = 1e-5):
    """``run(model, inputs)`` on the batch equals running each sample alone (within ``bound`` relative)."""
    batch = np.asarray(run(model, inputs))
    for i in range(batch.shape[0]):
        alone = run(model, {k: v[i:i + 1] for k, v in inputs.items()})
        err = relative_error(alone, batch[i:i + 1])
        assert err <= bound, f"sample {i} alone differs from the batch by {err:.2e}"
