"""scan_blocks: a level's repeated units as one scan over stacked parameters gives the unrolled U-Net's outputs
and gradients (float32 reassociation only) with dropout, remat, ControlNet residuals and block_repeat, and
leaves the parameters (checkpoint keys) untouched; units that differ (the skip ResBlock, a LoRA on some
blocks only) split the runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cascade_jax.models.lora import init_lora
from cascade_jax.models.random_init import random_model
from cascade_jax.models.unet_scan import runs, unit_period
from cascade_jax.nn.params import named_variables

STAGE_C = {"c_in": 4, "c_out": 4, "c_r": 8, "patch_size": 1, "c_cond": 16, "c_hidden": [16, 16], "nhead": [2, 2],
           "blocks": [[2, 3], [3, 2]], "block_repeat": [[1, 1], [1, 1]], "level_config": ["CTA", "CTA"],
           "c_clip_text": 8, "c_clip_text_pooled": 8, "c_clip_img": 8, "c_clip_seq": 2, "kernel_size": 3,
           "dropout": [0.1, 0.1], "self_attn": True, "t_conds": ["sca"], "switch_level": [False]}
STAGE_B = {"c_in": 4, "c_out": 4, "c_r": 8, "patch_size": 2, "c_cond": 16, "c_hidden": [8, 16], "nhead": [-1, 2],
           "blocks": [[2, 3], [3, 2]], "block_repeat": [[1, 1], [2, 2]], "level_config": ["CT", "CTA"],
           "c_clip": 8, "c_clip_seq": 2, "c_effnet": 4, "c_pixels": 3, "kernel_size": 3, "dropout": [0.0, 0.1],
           "self_attn": True, "t_conds": ["sca"]}


def _inputs(name):
    keys = jax.random.split(jax.random.key(3), 5)
    x, r = jax.random.normal(keys[0], (2, 8, 8, 4)), jnp.array([0.3, 0.8])
    if name == "stage_c":
        return (x, r, jax.random.normal(keys[1], (2, 5, 8)), jax.random.normal(keys[2], (2, 1, 8)),
                jax.random.normal(keys[3], (2, 1, 8)))
    return x, r, jax.random.normal(keys[1], (2, 4, 4, 4)), jax.random.normal(keys[2], (2, 1, 8))


def _output_and_grads(model, scan: bool, inputs, **kwargs):
    model.set_scan_blocks(scan)
    graphdef, state = nnx.split(model)

    def loss(state):
        out = nnx.merge(graphdef, state)(*inputs, **kwargs)
        return jnp.sum(out ** 2), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    return out, grads


@pytest.mark.parametrize("name, config, remat, controlnet", [("stage_c", STAGE_C, "full", True),
                                                              ("stage_b", STAGE_B, None, False)])
def test_scanned_units_equal_the_unrolled_unet(name, config, remat, controlnet):
    model = random_model(name, config, seed=0)
    model.train()  # dropout on: the scanned blocks must draw the unrolled blocks' keys
    model.set_remat(remat)
    keys_before = sorted(named_variables(model))
    kwargs = {"rngs": jax.random.key(5)}
    if controlnet:  # one residual per ResBlock visit (5 down, 5 up), some None
        cnet_keys = jax.random.split(jax.random.key(7), 10)
        kwargs["cnet"] = [None if i % 3 == 0 else jax.random.normal(k, (2, 4, 4, 16)) for i, k in enumerate(cnet_keys)]
    inputs = _inputs(name)
    unrolled, grads_unrolled = _output_and_grads(model, False, inputs, **kwargs)
    scanned, grads_scanned = _output_and_grads(model, True, inputs, **kwargs)
    np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(unrolled))))
    for a, b in zip(jax.tree.leaves(grads_scanned), jax.tree.leaves(grads_unrolled)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-12)
    assert sorted(named_variables(model)) == keys_before  # parameters and their names are unchanged


def test_runs_split_where_units_differ():
    model = random_model("stage_c", STAGE_C, seed=0)
    down, up = list(model.down_blocks[1]), list(model.up_blocks[1])
    assert unit_period(down) == 3
    assert runs(down, 3, first_alone=False) == [(0, 3)]
    assert runs(up, 3, first_alone=True) == [(0, 1), (1, 1)]  # the first unit takes the skip connection
    init_lora(model, "lora", filters=["up_blocks.0.2.attention"], rank=2)  # a LoRA on the first unit only
    assert runs(list(model.up_blocks[0]), 3, first_alone=False) == [(0, 1), (1, 2)]
