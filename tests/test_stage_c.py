"""Stage C: checkpoint layouts of the released models, parity with the official tiny fixture
(with and without sca/crp, ControlNet residuals), input-shape conventions, bfloat16 and jit."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import (assert_batch_equals_samples_alone, fixture, load_fixture_model, nchw_to_nhwc, nhwc_to_nchw,
                     relative_error)


PARITY = 1e-4  # max|Δ| / max|ref| against the official float32 outputs
BF16_BOUND = 1e-2


@nnx.jit
def run(model, inputs: dict, cnet=None):
    conds = {name: inputs[name] for name in ("sca", "crp") if name in inputs}
    return model(inputs["x"], inputs["r"], inputs["clip_text"], inputs["clip_text_pooled"], inputs["clip_img"],
                 cnet=cnet, **conds)


@pytest.fixture(scope="module")
def official(fixtures_dir, tmp_path_factory):
    """(model, NHWC inputs with sca/crp, io arrays) of the official tiny Stage C."""
    config, io, weights = fixture(fixtures_dir, "stage_c")
    model = load_fixture_model("stage_c", config["config"], weights, tmp_path_factory.mktemp("stage_c"))
    inputs = {k: jnp.asarray(nchw_to_nhwc(io[k])) for k in
              ("x", "r", "clip_text", "clip_text_pooled", "clip_img", "sca", "crp")}
    return model, inputs, io


def test_official_fixture_parity(official):
    model, inputs, io = official
    err = relative_error(nhwc_to_nchw(run(model, inputs)), io["out"])
    # Omitted t_conds are zeros (checked below); passing zeros reuses the compiled function.
    zeros = jnp.zeros_like(inputs["r"])
    err_plain = relative_error(nhwc_to_nchw(run(model, {**inputs, "sca": zeros, "crp": zeros})), io["out_no_tconds"])
    print(f"stage_c official: out {err:.2e}, out_no_tconds {err_plain:.2e} (bound {PARITY:.0e})")
    assert err <= PARITY and err_plain <= PARITY


def test_omitted_tconds_are_zeros(official):
    model, inputs, _ = official
    r = inputs["r"]
    omitted = model._embed_noise_levels(r, {}, r.shape[0])
    explicit = model._embed_noise_levels(r, {"sca": jnp.zeros_like(r), "crp": 0.0}, r.shape[0])
    np.testing.assert_array_equal(np.asarray(omitted), np.asarray(explicit))


def test_controlnet_residuals(official, fixtures_dir):
    model, inputs, _ = official
    _, io, _ = fixture(fixtures_dir, "controlnet")
    n_residuals = sum(k.startswith("cnet_") for k in io)
    cnet = [jnp.asarray(nchw_to_nhwc(io[f"cnet_{i}"])) if io[f"cnet_{i}"].size else None for i in range(n_residuals)]
    # The fixture passes sca/crp too (without them the output differs by O(1)).
    err = relative_error(nhwc_to_nchw(run(model, inputs, cnet)), io["out_with_cnet"])
    print(f"stage_c + ControlNet residuals: {err:.2e} (bound {PARITY:.0e})")
    assert err <= PARITY


def test_pooled_embeddings_2d_equal_3d(official):
    # Pooled text and image embeddings reach the network only through the condition tokens.
    model, inputs, _ = official
    tokens = model.gen_c_embeddings(inputs["clip_text"], inputs["clip_text_pooled"], inputs["clip_img"])
    flat = model.gen_c_embeddings(inputs["clip_text"], inputs["clip_text_pooled"][:, 0], inputs["clip_img"][:, 0])
    assert tokens.shape == (2, 7 + 4 + 4, 64)
    np.testing.assert_array_equal(np.asarray(flat), np.asarray(tokens))


def test_batch_equals_samples_alone(official):
    model, inputs, _ = official
    assert_batch_equals_samples_alone(run, model, inputs)


def test_bfloat16_close_to_float32(official):
    model, inputs, _ = official
    graphdef, state = nnx.split(model)
    model_bf16 = nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(jnp.bfloat16), state))
    ref = run(model, inputs)
    # Noise levels stay float32 (the design's rule): a bfloat16 r alone moves the output by O(1).
    out = run(model_bf16, {k: v if k in ("r", "sca", "crp") else v.astype(jnp.bfloat16) for k, v in inputs.items()})
    assert out.dtype == jnp.bfloat16
    err = relative_error(np.asarray(out, np.float32), ref)
    print(f"stage_c bfloat16 vs float32: {err:.2e} (bound {BF16_BOUND:.0e})")
    assert err <= BF16_BOUND


def test_unknown_condition_is_an_error(official):
    model, inputs, _ = official
    with pytest.raises(TypeError, match="unknown conditions"):
        model(inputs["x"], inputs["r"], inputs["clip_text"], inputs["clip_text_pooled"], inputs["clip_img"],
              sac=inputs["sca"])
