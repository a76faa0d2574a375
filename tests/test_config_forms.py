"""Model configs take every form the official constructors take, and refuse by name what they crash on.

Shapes only (``abstract_model``): nothing is allocated or compiled. The numerics of the per-level
forms are compared with a PyTorch reference in test_diffusers_unet.py (self_attn per level, scalar dropout).
"""

from __future__ import annotations

import re

import pytest
from flax import nnx

from cascade_jax.models.config_check import check_config, constructor_parameters
from cascade_jax.models.registry import MODEL_CLASSES, abstract_model, model_class
from cascade_jax.nn.blocks import AttnBlock, Dropout
from cascade_jax.pipelines import loading

TINY = {component[0]: dict(component[1]) for component in loading.pipeline_set("tiny").values()}
TINY["controlnet"] = {"c_in": 3, "c_proj": 64, "proj_blocks": [0, 1], "bottleneck_mode": "simple"}
TINY["saliency"] = {}

# (model, change): official forms (or this port's) that must build; the forms of one change are independent.
ACCEPTED = [
    ("stage_c", {"self_attn": [True, False], "dropout": 0.1, "block_repeat": None, "t_conds": ["sca"],
                 "level_config": [["C", "T", "A"], "CT"], "remat": "full"}),
    # the official code reads per-level lists up to the last level of c_hidden: longer ones build
    ("stage_c", {"self_attn": [1, 0], "dropout": [0, 0.1], "nhead": [2, 2, 2], "switch_level": [False, True],
                 "t_conds": []}),
    ("stage_c", {"self_attn": False, "dropout": 0, "c_hidden": (64, 64), "blocks": ((1, 1), (1, 1))}),
    ("stage_b", {"self_attn": [True, True, False, True], "dropout": 0.1, "block_repeat": None}),
    ("stage_b", {"self_attn": 0, "dropout": [0, 0, 0.1, 0.1, 0.5]}),
    ("stage_a", {"scale_factor": 1}), ("stage_a", {"scale_factor": 0.3764}),
    ("previewer", {"c_hidden": 16}),
    ("effnet", {"stages": [[True, 1, 3, 2, 24, 24, 1], [0, 4, 3, 2, 24, 32, 1]], "last_channels": 64}),
    ("controlnet", {"proj_blocks": (3,), "c_in": 1}),
    ("clip_text", {"layer_norm_eps": 1, "hidden_act": "quick_gelu"}), ("clip_vision", {"layer_norm_eps": 1e-6}),
    ("saliency", {}),
]

# (model, change, what the message must say): what the official constructor (or forward) crashes on.
REFUSED = [
    ("stage_c", {"self_attn": "yes"}, r"self_attn='yes' is not accepted \('yes' is not true or false\); "
                                      r"self_attn takes true or false, or a list of true/false values, one per level "
                                      r"of c_hidden"),
    ("stage_c", {"self_attn": [True]}, r"self_attn=\[True\] is not accepted \(it has 1 entry; c_hidden has 2 levels, "
                                       r"so 2 are needed\)"),
    ("stage_c", {"self_attn": [True, "no"]}, r"entry \[1\]: 'no' is not true or false"),
    ("stage_c", {"dropout": "0.1"}, r"dropout='0.1' is not accepted \('0.1' is not a number\); dropout takes a "
                                    r"number, or a list of numbers, one per level"),
    ("stage_c", {"t_conds": "sca"}, r"t_conds='sca' is not accepted \('sca' is not a list\); t_conds takes a list"),
    ("stage_c", {"level_config": ["CTX", "CTA"]}, r"entry \[0\]: 'CTX' has block types \['X'\]"),
    ("stage_c", {"blocks": [[1, 2]]}, r"blocks=\[\[1, 2\]\] is not accepted \(it has 1 entry\); blocks takes "
                                      r"\[down, up\]: two lists of integers, each one per level of c_hidden"),
    ("stage_c", {"block_repeat": [[1, 1], [1, "a"]]}, r"entry \[1\]\[1\]: 'a' is not an integer"),
    ("stage_c", {"switch_level": False}, r"switch_level=False is not accepted \(False is not a list\)"),
    ("stage_c", {"c_hidden": []}, r"c_hidden=\[\] is not accepted \(it has 0 entries\)"),
    ("stage_c", {"nhead": 2}, r"nhead=2 is not accepted \(2 is not a list\)"),
    ("stage_c", {"c_cond": 64.0}, r"c_cond=64.0 is not accepted \(64.0 is not an integer\)"),
    ("stage_b", {"self_attn": [True, False]}, r"self_attn=\[True, False\] is not accepted \(it has 2 entries; "
                                              r"c_hidden has 4 levels"),
    ("stage_b", {"c_effnet": True}, r"c_effnet=True is not accepted \(True is not an integer\)"),
    ("stage_a", {"scale_factor": "0.43"}, r"scale_factor='0.43' is not accepted \('0.43' is not a number\)"),
    ("stage_a", {"levels": 2.5}, r"levels=2.5 is not accepted"),
    ("previewer", {"c_out": [3]}, r"c_out=\[3\] is not accepted"),
    ("effnet", {"stages": [[1, 1, 3, 1, 24, 24]]}, r"stages=.* is not accepted \(entry \[0\]: it has 6 entries\); "
                                                   r"stages takes null, or a list of lists"),
    ("controlnet", {"proj_blocks": None}, r"proj_blocks=None is not accepted"),
    ("controlnet", {"proj_blocks": []}, r"proj_blocks=\[\] is not accepted \(it has 0 entries\)"),
    ("controlnet", {"bottleneck_mode": "huge"}, r"bottleneck_mode='huge' is not accepted .*takes null, or one of "
                                                r"'effnet', 'simple', 'large'"),
    ("clip_text", {"hidden_act": "swish"}, r"hidden_act='swish' is not accepted \('swish' is not one of them\); "
                                           r"hidden_act takes one of"),
    ("clip_text", {"eos_token_id": [49407]}, r"eos_token_id=\[49407\] is not accepted"),
    ("clip_vision", {"image_size": "224"}, r"image_size='224' is not accepted"),
    ("saliency", {"c": 1}, r"unknown config keys \['c'\]"),
]


def test_every_constructor_argument_has_its_forms():
    for name in MODEL_CLASSES:
        cls = model_class(name)
        assert set(cls.CONFIG_FORMS) == set(constructor_parameters(cls)), name


@pytest.mark.parametrize("model, change", ACCEPTED, ids=[f"{m}-{'-'.join(c) or 'none'}" for m, c in ACCEPTED])
def test_official_forms_build(model, change):
    abstract_model(model, {**TINY[model], **change})


def test_controlnet_takes_the_official_default_bottleneck():
    # null means the EfficientNet bottleneck (built by the presets in test_controlnet.py; 1.5 s to trace here)
    check_config(model_class("controlnet"), {**TINY["controlnet"], "bottleneck_mode": None}, "controlnet")


@pytest.mark.parametrize("model, change, message", REFUSED, ids=[f"{m}-{'-'.join(c)}" for m, c, _ in REFUSED])
def test_what_the_official_code_crashes_on_is_refused_by_name(model, change, message):
    with pytest.raises(ValueError, match=message):
        abstract_model(model, {**TINY[model], **change})


def test_a_value_no_form_takes_names_key_value_and_forms():
    for model, config in TINY.items():
        for key in config:
            with pytest.raises(ValueError, match=rf": {key}=\{{'x': 1\}} is not accepted \(.*\); {key} takes "):
                abstract_model(model, {**config, key: {"x": 1}})


def test_a_default_that_does_not_fit_the_given_levels_names_itself():
    three_levels = {**TINY["stage_c"], "c_hidden": [64, 64, 64], "nhead": [2, 2, 2], "blocks": [[1] * 3, [1] * 3],
                    "level_config": ["CTA"] * 3, "switch_level": [False, False]}
    del three_levels["block_repeat"], three_levels["dropout"]
    with pytest.raises(ValueError, match=re.escape("the default block_repeat=((1, 1), (1, 1)) does not fit this "
                                                   "config (entry [0]: it has 2 entries; c_hidden has 3 levels")):
        abstract_model("stage_c", three_levels)
    del three_levels["self_attn"]
    three_levels["block_repeat"] = None
    with pytest.raises(ValueError, match=re.escape("the default dropout=(0.1, 0.1) does not fit this config")):
        abstract_model("stage_c", three_levels)


def _levels_attr(blocks, kind, attr):
    return [[getattr(b, attr) for b in level if isinstance(b, kind)] for level in blocks]


@pytest.mark.parametrize("model", ["stage_c", "stage_b"])
def test_scalar_and_per_level_forms_are_expanded_as_officially(model):
    config = TINY[model]
    levels = len(config["c_hidden"])
    attn = [i % 2 == 0 for i in range(levels)]
    net = abstract_model(model, {**config, "self_attn": attn, "dropout": 0.25})
    down = _levels_attr(net.down_blocks, AttnBlock, "self_attn")
    up = _levels_attr(net.up_blocks, AttnBlock, "self_attn")[::-1]  # up_blocks run from the deepest level
    for i, letters in enumerate(config["level_config"]):
        has_attention = "A" in letters
        assert down[i] == [attn[i]] * (config["blocks"][0][i] if has_attention else 0)
        assert up[i] == [attn[i]] * (config["blocks"][1][::-1][i] if has_attention else 0)
    rates = {m.rate for _, m in nnx.iter_graph(net) if isinstance(m, Dropout)}
    assert rates == {0.25}
    assert _levels_attr(abstract_model(model, {**config, "self_attn": False}).down_blocks, AttnBlock,
                        "self_attn") == [[False] * len(level) for level in down]
