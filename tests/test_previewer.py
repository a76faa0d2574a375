"""Previewer: official fixture parity and the released checkpoint layout."""

import json

import numpy as np
from flax import nnx

from cascade_jax.models.previewer import Previewer
from cascade_jax.models.registry import load_config
from cascade_jax.weights.tree import expected_torch_shapes, named_variables
from helpers import checkpoint_layout, fixture, load_fixture_model, nchw_to_nhwc, relative_error

TOL = 1e-4  # max|Δ| ≤ TOL · max|ref|, float32


def test_matches_official(fixtures_dir, tmp_path):
    config, io, weights = fixture(fixtures_dir, "previewer")
    model = load_fixture_model("previewer", config["config"], weights, tmp_path)
    out = model(nchw_to_nhwc(io["latent"]))  # 6x5 latent: non-square, odd size
    err = relative_error(out, nchw_to_nhwc(io["out"]))
    print(f"previewer out rel err {err:.2e}")
    assert err <= TOL


def test_preset_matches_released_checkpoint(shared_dir):
    model_name, config = load_config("previewer")
    assert model_name == "previewer"
    model = nnx.eval_shape(lambda: Previewer(**config, rngs=nnx.Rngs(0)))
    layout = checkpoint_layout(shared_dir, "previewer")
    assert expected_torch_shapes(model) == layout
    # summary.json counts every tensor but only trainable parameters (no BatchNorm statistics).
    summary = json.loads((shared_dir / "reference/checkpoint_layouts/summary.json").read_text())["previewer"]
    n_params = sum(int(np.prod(v.shape)) for v in named_variables(model).values() if isinstance(v, nnx.Param))
    assert (len(layout), n_params) == (summary["tensors"], summary["parameters"])
