"""Full-size models without weights: every released checkpoint's tensor names and shapes.

For each preset, ``abstract_model`` (shapes only) plus the key map (module paths = official
keys, ``torch_layout`` metadata) must reproduce the real file's layout exactly, and the
parameter counts in summary.json (which count trainable parameters, not BatchNorm statistics).
"""

import json

import numpy as np
import pytest
from flax import nnx

from cascade_jax.models.registry import abstract_model, load_config
from cascade_jax.weights.tree import expected_torch_shapes, named_variables
from helpers import read_checkpoint_layout

PRESETS = ["stage_a", "stage_b", "stage_b_lite", "stage_c", "stage_c_lite", "effnet_encoder", "previewer",
           "clip_text_bigg14", "clip_vision_l14"]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_reproduces_released_layout(preset, shared_dir):
    layouts = shared_dir / "reference" / "checkpoint_layouts"
    model_name, config = load_config(preset)
    model = abstract_model(model_name, config)
    shapes = expected_torch_shapes(model)
    expected = read_checkpoint_layout(layouts / f"{preset}.tsv")
    assert sorted(set(expected) - set(shapes)) == [], "tensors the model lacks"
    assert sorted(set(shapes) - set(expected)) == [], "tensors the checkpoint lacks"
    assert {k: (v, expected[k]) for k, v in shapes.items() if v != expected[k]} == {}
    summary = json.loads((layouts / "summary.json").read_text())[preset]
    trainable = sum(int(np.prod(v.shape)) for v in named_variables(model).values() if isinstance(v, nnx.Param))
    assert (len(shapes), trainable) == (summary["tensors"], summary["parameters"])
    if "config" in summary:  # the transformers config.json maps onto the preset
        from cascade_jax.weights.model_configs import translate_config
        assert translate_config(summary["config"]) == config
