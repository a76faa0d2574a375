"""Training options of the U-Nets: dropout (train mode, explicit key, no RNG state) and per-block remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cascade_jax.models.random_init import random_model
from cascade_jax.nn.attention import _attention_with_dropout
from cascade_jax.nn.blocks import Dropout

TINY_C = {"c_in": 4, "c_out": 4, "c_r": 8, "patch_size": 1, "c_cond": 16, "c_hidden": [16, 16], "nhead": [2, 2],
          "blocks": [[1, 1], [1, 1]], "block_repeat": [[1, 1], [1, 2]], "level_config": ["CTA", "CTA"],
          "c_clip_text": 8, "c_clip_text_pooled": 8, "c_clip_img": 8, "c_clip_seq": 2, "kernel_size": 3,
          "dropout": [0.1, 0.1], "self_attn": True, "t_conds": ["sca"], "switch_level": [False]}
TINY_B = {"c_in": 4, "c_out": 4, "c_r": 8, "patch_size": 2, "c_cond": 16, "c_hidden": [8, 16], "nhead": [-1, 2],
          "blocks": [[1, 1], [1, 1]], "block_repeat": [[1, 1], [2, 1]], "level_config": ["CT", "CTA"],
          "c_clip": 8, "c_clip_seq": 2, "c_effnet": 4, "c_pixels": 3, "kernel_size": 3, "dropout": [0.0, 0.1],
          "self_attn": True, "t_conds": ["sca"]}


def _inputs(name):
    keys = jax.random.split(jax.random.key(3), 5)
    x = jax.random.normal(keys[0], (2, 8, 8, 4))
    r = jnp.array([0.3, 0.8])
    if name == "stage_c":
        return (x, r, jax.random.normal(keys[1], (2, 5, 8)), jax.random.normal(keys[2], (2, 1, 8)),
                jax.random.normal(keys[3], (2, 1, 8)))
    return x, r, jax.random.normal(keys[1], (2, 4, 4, 4)), jax.random.normal(keys[2], (2, 1, 8))


@pytest.mark.parametrize("name, config", [("stage_c", TINY_C), ("stage_b", TINY_B)])
def test_train_mode_dropout(name, config):
    model = random_model(name, config, seed=0)
    state_before = jax.tree.structure(nnx.state(model))
    inputs = _inputs(name)
    eval_out = model(*inputs)
    model.train()
    # Training mode draws masks from the key it is given: no RNG variables enter the model state.
    assert jax.tree.structure(nnx.state(model)) == state_before
    with pytest.raises(ValueError, match="no key was given"):
        model(*inputs)
    a = model(*inputs, rngs=nnx.Rngs(dropout=1))
    a_again = model(*inputs, rngs=nnx.Rngs(dropout=1))
    b = model(*inputs, rngs=nnx.Rngs(dropout=2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a_again))
    diff = float(jnp.max(jnp.abs(a - b)))
    print(f"{name}: train-mode outputs under two keys differ by up to {diff:.3e}")
    assert diff > 1e-3 and float(jnp.max(jnp.abs(a - eval_out))) > 1e-3
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(*inputs, rngs=nnx.Rngs(dropout=2))), np.asarray(eval_out))


def test_dropout_rate_and_scale():
    layer = Dropout(0.25)
    x = jnp.ones((200_000,))
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(x))  # inference by default
    layer.deterministic = False
    y = np.asarray(layer(x, jax.random.key(0)))
    zero_fraction = float(np.mean(y == 0))
    assert abs(zero_fraction - 0.25) < 0.005, zero_fraction
    np.testing.assert_allclose(y[y != 0], 1 / 0.75, rtol=1e-6)


def test_attention_dropout_path_matches_fused_attention_at_rate_zero():
    q, k, v = (jax.random.normal(key, (2, 6, 2, 4)) for key in jax.random.split(jax.random.key(0), 3))
    ours = _attention_with_dropout(q, k, v, 1e-12, jax.random.key(1))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(jax.nn.dot_product_attention(q, k, v)), atol=1e-6)


def test_remat_gradients_equal(remat="dots_with_no_batch_dims_saveable"):
    model = random_model("stage_c", TINY_C, seed=0)
    model.train()
    inputs = _inputs("stage_c")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def grads_of(graphdef):
        def loss(params):
            out = nnx.merge(graphdef, params, rest)(*inputs, rngs=jax.random.key(5))
            return jnp.mean(jnp.square(out))
        return jax.jit(jax.grad(loss))(params)

    plain = grads_of(graphdef)
    model.set_remat(remat)
    remat_graphdef = nnx.split(model, nnx.Param, ...)[0]
    assert remat_graphdef != graphdef
    rematted = grads_of(remat_graphdef)
    for g1, g2 in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="not a policy"):
        model.set_remat("dots_savable")


def test_grn_gradient_is_finite_for_an_all_zero_channel():
    """A hidden channel that is zero everywhere (GELU underflow) must not turn training NaN (torch gives 0)."""
    from cascade_jax.nn.layers import GlobalResponseNorm

    grn = GlobalResponseNorm(4, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(grn)
    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4)).at[..., 1].set(0.0)
    grads = jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) ** 2), argnums=(0, 1))(params, x)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
