"""Stage B: checkpoint layouts of the released models, parity with the official tiny fixture
(with and without pixels/sca), input-shape conventions and jit."""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import (assert_batch_equals_samples_alone, fixture, load_fixture_model, nchw_to_nhwc, nhwc_to_nchw,
                     relative_error)


PARITY = 1e-4  # max|Δ| / max|ref| against the official float32 outputs


@nnx.jit
def run(model, inputs: dict):
    return model(inputs["x"], inputs["r"], inputs["effnet"], inputs["clip"], pixels=inputs.get("pixels"),
                 **({"sca": inputs["sca"]} if "sca" in inputs else {}))


@pytest.fixture(scope="module")
def official(fixtures_dir, tmp_path_factory):
    """(model, NHWC inputs with pixels/sca, io arrays) of the official tiny Stage B."""
    config, io, weights = fixture(fixtures_dir, "stage_b")
    model = load_fixture_model("stage_b", config["config"], weights, tmp_path_factory.mktemp("stage_b"))
    inputs = {k: jnp.asarray(nchw_to_nhwc(io[k])) for k in ("x", "r", "effnet", "clip", "pixels", "sca")}
    return model, inputs, io


def test_official_fixture_parity(official):
    model, inputs, io = official
    err = relative_error(nhwc_to_nchw(run(model, inputs)), io["out"])
    plain = {k: v for k, v in inputs.items() if k not in ("pixels", "sca")}
    err_plain = relative_error(nhwc_to_nchw(run(model, plain)), io["out_no_pixels"])
    print(f"stage_b official: out {err:.2e}, out_no_pixels {err_plain:.2e} (bound {PARITY:.0e})")
    assert err <= PARITY and err_plain <= PARITY


def test_pooled_clip_2d_equals_3d(official):
    model, inputs, _ = official
    tokens = model.gen_c_embeddings(inputs["clip"])
    assert tokens.shape == (2, 4, 64)
    np.testing.assert_array_equal(np.asarray(model.gen_c_embeddings(inputs["clip"][:, 0])), np.asarray(tokens))


def test_batch_equals_samples_alone(official):
    model, inputs, _ = official
    assert_batch_equals_samples_alone(run, model, inputs)
