"""scan_blocks: a level's repeated units as one scan over stacked parameters gives the unrolled U-Net's outputs
and gradients (float32 reassociation only) with dropout, remat, ControlNet residuals and block_repeat, and
leaves the parameters (checkpoint keys) untouched; units that differ (the skip ResBlock, a LoRA on some
blocks only) split the runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.models.lora import init_lora
from cascade_jax.models.random_init import random_model
from cascade_jax.models.unet_scan import runs, unit_period
from cascade_jax.models.unet_stack import stack_units, unstack_flat, unstack_units
from cascade_jax.nn.params import named_variables

STAGE_C = {"c_in": 4, "c_out": 4, "c_r": 8, "patch_size": 1, "c_cond": 16, "c_hidden": [16, 16], "nhead": [2, 2],
           "blocks": [[2, 2], [2, 2]], "block_repeat": [[1, 1], [1, 1]], "level_config": ["CTA", "CTA"],
           "c_clip_text": 8, "c_clip_text_pooled": 8, "c_clip_img": 8, "c_clip_seq": 2, "kernel_size": 3,
           "dropout": [0.1, 0.1], "self_attn": True, "t_conds": ["sca"], "switch_level": [False]}
STAGE_B = {"c_in": 4, "c_out": 4, "c_r": 8, "patch_size": 2, "c_cond": 16, "c_hidden": [8, 16], "nhead": [-1, 2],
           "blocks": [[1, 2], [2, 1]], "block_repeat": [[1, 1], [2, 2]], "level_config": ["CT", "CTA"],
           "c_clip": 8, "c_clip_seq": 2, "c_effnet": 4, "c_pixels": 3, "kernel_size": 3, "dropout": [0.0, 0.1],
           "self_attn": True, "t_conds": ["sca"]}


def _inputs(name):
    keys = jax.random.split(jax.random.key(3), 5)
    x, r = jax.random.normal(keys[0], (2, 8, 8, 4)), jnp.array([0.3, 0.8])
    if name == "stage_c":
        return (x, r, jax.random.normal(keys[1], (2, 5, 8)), jax.random.normal(keys[2], (2, 1, 8)),
                jax.random.normal(keys[3], (2, 1, 8)))
    return x, r, jax.random.normal(keys[1], (2, 4, 4, 4)), jax.random.normal(keys[2], (2, 1, 8))


def _output_and_grads(model, inputs, **kwargs):
    graphdef, state = nnx.split(model)

    def loss(state):
        out = nnx.merge(graphdef, state)(*inputs, **kwargs)
        return jnp.sum(out ** 2), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    return out, dict(nnx.to_flat_state(grads))


def _close(a, b, rtol):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.max(np.abs(b))) + 1e-12)


def test_stacked_units_equal_the_unrolled_unet_and_unstack_to_the_same_keys():
    """Training's layout (stack_units): dropout on, remat full, ControlNet residuals (some None)."""
    unrolled, stacked = (random_model("stage_c", STAGE_C, seed=0) for _ in range(2))
    keys = named_variables(unrolled)
    layout = stack_units(stacked)
    assert len(jax.tree.leaves(nnx.state(stacked))) < len(jax.tree.leaves(nnx.state(unrolled)))
    cnet_keys = jax.random.split(jax.random.key(7), 8)  # one residual per ResBlock visit: 4 down, 4 up
    kwargs = {"rngs": jax.random.key(5),
              "cnet": [None if i % 3 == 0 else jax.random.normal(k, (2, 4, 4, 16)) for i, k in enumerate(cnet_keys)]}
    results = []
    for model in (unrolled, stacked):
        model.train()  # the stacked blocks must draw the unrolled blocks' dropout keys
        model.set_remat("full")
        results.append(_output_and_grads(model, _inputs("stage_c"), **kwargs))
    (out_a, grads_a), (out_b, grads_b) = results
    _close(out_b, out_a, 1e-5)
    grads_b = unstack_flat(grads_b, layout)
    assert set(grads_b) == set(grads_a)
    for path, grad in grads_a.items():
        _close(np.asarray(grads_b[path][...]), np.asarray(grad[...]), 1e-4)
    unstack_units(stacked)
    restored = named_variables(stacked)
    assert sorted(restored) == sorted(keys) and all(np.array_equal(restored[k][...], keys[k][...]) for k in keys)


def test_scanned_stage_b_with_block_repeat_equals_the_unrolled_forward():
    model = random_model("stage_b", STAGE_B, seed=0)
    inputs = _inputs("stage_b")
    graphdef, state = nnx.split(model)
    unrolled = jax.jit(lambda s: nnx.merge(graphdef, s)(*inputs))(state)
    model.set_scan_blocks(True)
    graphdef, state = nnx.split(model)
    scanned = jax.jit(lambda s: nnx.merge(graphdef, s)(*inputs))(state)
    _close(scanned, unrolled, 1e-5)


def test_runs_split_where_units_differ():
    model = random_model("stage_c", STAGE_C, seed=0)
    down, up = list(model.down_blocks[1]), list(model.up_blocks[1])
    assert unit_period(down) == 3
    assert runs(down, 3, first_alone=False) == [(0, 2)]
    assert runs(up, 3, first_alone=True) == [(0, 1), (1, 1)]  # the first unit takes the skip connection
    assert runs(list(model.up_blocks[0]), 3, first_alone=False) == [(0, 2)]
    init_lora(model, "lora", filters=["up_blocks.0.2.attention"], rank=2)  # a LoRA on the first unit only
    assert runs(list(model.up_blocks[0]), 3, first_alone=False) == [(0, 1), (1, 1)]


class _CachedBatches:
    """Random cached-condition batches of the planned shapes (no encoders), with the loader's state API."""

    def __init__(self, cfg):
        from cascade_jax.training import get_task

        self.specs, self.position = get_task(cfg.stage).plan_batch(cfg), 0

    def __next__(self):
        rng = np.random.default_rng(self.position)
        self.position += 1
        return {k: rng.standard_normal(shape).astype(np.float32) for k, (shape, _) in self.specs.items()}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def test_scan_blocks_training_equals_unrolled_training_and_exports_the_same_keys(tmp_path):
    """Two updates of a tiny one-level Stage C (dropout on), its two units stacked against unrolled: the same
    losses and exported arrays (float32 reassociation, through AdamW), the exported keys per block."""
    import dataclasses

    from cascade_jax.sharding import make_mesh
    from cascade_jax.training import load_config, train
    from cascade_jax.training.export import generator_arrays

    exports, losses = [], []
    for scan in (False, True):
        cfg = load_config("tiny_c", ["cached_conditions=true", "updates=2", "compute_dtype=float32",
                                     f"scan_blocks={str(scan).lower()}", f"output_path={tmp_path}/{scan}/out",
                                     f"checkpoint_path={tmp_path}/{scan}/ckpt", "async_checkpointing=false"])
        cfg = dataclasses.replace(cfg, model_config={**STAGE_C, "c_hidden": [16], "nhead": [2], "blocks": [[2], [2]],
                                                     "block_repeat": [[1], [1]], "level_config": ["CTA"],
                                                     "dropout": [0.1], "c_in": 16, "c_out": 16, "c_clip_text": 1280,
                                                     "c_clip_text_pooled": 1280, "c_clip_img": 768})
        run = train(cfg, data=_CachedBatches(cfg), mesh=make_mesh(devices=jax.devices()[:1]), progress=False)
        losses.append([h["loss"] for h in run.history])
        exports.append(generator_arrays(run.graphdef, run.state.params, run.frozen))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert sorted(exports[1]) == sorted(exports[0])
    # Adam divides by sqrt(second moment): where a gradient is ~0 its float32 reassociation noise moves the
    # update by up to a few % of one step (lr 1e-3); 1e-4 is a tenth of a step.
    for key, value in exports[0].items():
        np.testing.assert_allclose(exports[1][key], value, rtol=1e-4, atol=1e-4)


def test_stacked_clip_layers_give_the_same_hidden_states_and_unstack_to_the_same_keys():
    """A frozen encoder stacked for scan_blocks training is written from memory by exports: unstacking gives
    back its per-layer keys and values."""
    from cascade_jax.nn.params import named_variables
    from cascade_jax.pipelines.loading import pipeline_set

    model = random_model(*pipeline_set("tiny")["text_encoder"], seed=0)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 7)), jnp.int32)
    before = model(ids, jnp.ones((2, 7), jnp.int32), output_hidden_states=True)
    arrays = {k: np.asarray(v[...]) for k, v in named_variables(model).items()}
    model.text_model.encoder.stack_layers()
    after = model(ids, jnp.ones((2, 7), jnp.int32), output_hidden_states=True)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        _close(a, b, 1e-5)
    model.text_model.encoder.unstack_layers()
    unstacked = {k: np.asarray(v[...]) for k, v in named_variables(model).items()}
    assert sorted(unstacked) == sorted(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(unstacked[key], value)
