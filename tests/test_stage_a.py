"""Stage A (VQGAN): official fixture parity, the released checkpoint layout, the quantiser."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cascade_jax.models.stage_a import VectorQuantize
from helpers import fixture, load_fixture_model, nchw_to_nhwc, relative_error

TOL = 1e-4  # max|Δ| ≤ TOL · max|ref|, float32


@pytest.fixture(scope="module")
def official(fixtures_dir, tmp_path_factory):
    config, io, weights = fixture(fixtures_dir, "stage_a")
    model = load_fixture_model("stage_a", config["config"], weights, tmp_path_factory.mktemp("stage_a"))
    return model, {k: nchw_to_nhwc(v) for k, v in io.items()}


def test_encode_matches_official(official):
    model, io = official
    err = relative_error(model.encode(io["image"]), io["latent"])
    print(f"stage_a latent rel err {err:.2e}")
    assert err <= TOL


def test_quantized_encode_matches_official(official):
    model, io = official
    quantized, latent, indices, vq_loss = model.encode(io["image"], quantize=True)
    np.testing.assert_array_equal(np.asarray(indices), io["indices"])
    err = relative_error(quantized, io["quantized_latent"])
    print(f"stage_a quantized_latent rel err {err:.2e}")
    assert err <= TOL
    assert relative_error(latent, io["latent"]) <= TOL
    # Both loss terms equal mean((q - z)²) in value; the official weighting is 1 + 0.25.
    s = model.scale_factor
    expected_loss = 1.25 * np.mean((io["quantized_latent"] * s - io["latent"] * s) ** 2)
    np.testing.assert_allclose(float(vq_loss), expected_loss, rtol=1e-4)


def test_decode_matches_official(official):
    model, io = official
    err = relative_error(model.decode(io["latent"]), io["decoded"])
    print(f"stage_a decoded rel err {err:.2e}")
    assert err <= TOL


def test_quantizer_straight_through_gradient():
    vq = nnx.eval_shape(lambda: VectorQuantize(3, 5, rngs=nnx.Rngs(0)))
    codebook = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    vq.codebook.weight.set_value(jnp.asarray(codebook))
    z = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 3)).astype(np.float32))
    quantized, _, indices = vq(z)
    np.testing.assert_array_equal(np.asarray(quantized), codebook[np.asarray(indices)])  # exact rows
    weights = jnp.arange(z.size, dtype=jnp.float32).reshape(z.shape)
    grad = jax.grad(lambda z: jnp.sum(vq(z)[0] * weights))(z)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(weights))


