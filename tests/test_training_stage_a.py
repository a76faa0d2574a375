"""Stage A and Previewer trainers (reconstruction tasks) and the BatchNorm calibration of a frozen
random EfficientNet: both learn on a folder of coloured-square images through the Grain loader and
the full step, export directories that load and reconstruct, and the frozen encoder never trains.

Runs on one device (a one-device mesh, not the suite's 8 virtual CPUs): the step compiles in
about half the time, which is most of this file's cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from safetensors import safe_open
from training_testing import ImageData

from cascade_jax.models.effnet import EfficientNetEncoder
from cascade_jax.models.random_init import random_model
from cascade_jax.nn.params import named_variables
from cascade_jax.training import build_run, export_run, load_config, train
from cascade_jax.demo.calibrate import calibrated_effnet, effnet_inputs
from cascade_jax.training.export import generator_arrays
from cascade_jax.training.previewer import resize_to
from cascade_jax.training.stage_a import codebook_usage, jit_stage_a_forward, normalize_latents
from cascade_jax.weights.checkpoint import load_model

STEPS = 24
N_IMAGES, SIZE = 48, 64
# Stem /2 and three stride-2 stages: a 64x64 image gives a 4x4x16 latent (the Previewer makes 32x32).
SMALL_EFFNET = {"c_latent": 16, "last_channels": 128,
                "stages": [[True, 1, 3, 1, 16, 16, 1], [True, 4, 3, 2, 16, 32, 1], [False, 4, 3, 2, 32, 48, 1],
                           [False, 4, 3, 2, 48, 64, 1]]}


def one_device_mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


@pytest.fixture(scope="module")
def images():
    return next(ImageData(batch=N_IMAGES, size=SIZE))["images"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, images):
    folder = tmp_path_factory.mktemp("shapes")
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text("a square")
    return folder


@pytest.fixture(scope="module")
def effnet_dir(tmp_path_factory, images):
    out = tmp_path_factory.mktemp("effnet") / "effnet"
    calibrated_effnet(SMALL_EFFNET, images, seed=3, out_dir=out)
    return out


# One jitted forward for every encoder of the same structure and input shape (a single compile).
_apply = nnx.jit(lambda model, x: model(x))


def effnet_latents(model, images):
    return np.asarray(_apply(model, jnp.asarray(effnet_inputs(images))))


@pytest.fixture(scope="module")
def calibrated(effnet_dir, images):
    """(the calibrated encoder read back from its directory, its latents of every image)."""
    model = load_model(effnet_dir)
    return model, effnet_latents(model, images)


def run_tiny(name, folder, tmp_path, *overrides):
    cfg = load_config(name, [f"checkpoint_path={tmp_path / 'ckpt'}", f"output_path={tmp_path / 'out'}",
                             f"updates={STEPS}", "lr=0.002", "save_every=1000", "batch_size=8",
                             f"data={{source: folder, paths: [{folder}], num_workers: 2, prefetch_batches: 1}}",
                             *overrides])
    run = train(cfg, mesh=one_device_mesh(), progress=False)
    losses = [h["loss"] for h in run.history]
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
    print(f"{name}: mean reconstruction MSE of updates 1-5 {first:.4f}, of {STEPS - 4}-{STEPS} {last:.4f}; "
          f"{run.history[-1]['steps_per_s']:.2f} steps/s")
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    return run, first, last


def check_export(run, out_dir):
    model_dir, safetensors_file = export_run(run, out_dir)["generator"]
    trained = generator_arrays(run.graphdef, run.state.params, run.frozen)
    model = load_model(model_dir)
    loaded = named_variables(model)
    assert set(loaded) == set(trained)
    for key, var in loaded.items():
        np.testing.assert_array_equal(np.asarray(var[...]), trained[key], err_msg=key)
    with safe_open(str(safetensors_file), "np") as f:
        assert set(f.keys()) == set(trained)  # official names
    return model


def test_stage_a_learns_and_exports(image_folder, images, tmp_path):
    # Measured: reconstruction MSE 0.265 over updates 1-5 -> 0.091 over 20-24 (exported model: 0.086).
    run, first, last = run_tiny("tiny_a", image_folder, tmp_path)
    assert last < 0.5 * first
    model = check_export(run, tmp_path / "export")
    x = jnp.asarray(images[:16].astype(np.float32) / 255.0)
    out = jit_stage_a_forward(model, x)
    mse = float(jnp.mean(jnp.square(out.reconstruction - x)))
    usage = codebook_usage(out.indices, model.codebook_size)
    print(f"exported Stage A: reconstruction MSE {mse:.4f}, {usage}, latent std {float(jnp.std(out.latent)):.3f}")
    assert mse < 0.6 * first  # the loaded model reconstructs as the trained one did
    assert usage["codes_used"] >= 2
    # Folding a scale and shift into the model gives unit-variance latents and the same reconstruction.
    normalize_latents(model, x)
    normalized = jit_stage_a_forward(model, x)
    latent = np.asarray(normalized.latent)
    np.testing.assert_allclose(latent.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    assert abs(latent.std() - 1.0) < 1e-3
    np.testing.assert_allclose(np.asarray(normalized.reconstruction), np.asarray(out.reconstruction), atol=1e-4)
    assert np.mean(np.asarray(normalized.indices) == np.asarray(out.indices)) > 0.99


def test_stage_a_refuses_adaptive_loss_weight(tmp_path):
    cfg = load_config("tiny_a", ["adaptive_loss_weight=true", f"output_path={tmp_path}"])
    with pytest.raises(ValueError, match="adaptive_loss_weight.*stage 'a'"):
        build_run(cfg, mesh=one_device_mesh())


def test_previewer_learns_from_frozen_calibrated_effnet(image_folder, images, effnet_dir, calibrated, tmp_path):
    # Measured: MSE 0.248 over updates 1-5 -> 0.081 over 20-24 (exported model: 0.068).
    run, first, last = run_tiny("tiny_previewer", image_folder, tmp_path, f"effnet_checkpoint_path={effnet_dir}")
    assert last < 0.5 * first
    # The frozen EfficientNet has no gradient, optimizer state or change: only generator paths train.
    trained_paths = {path[0] for path, _ in nnx.to_flat_state(run.state.params)}
    assert trained_paths == {"generator"}
    frozen = nnx.merge(run.graphdef, run.state.params, run.frozen).effnet
    reference, latents = calibrated  # the encoder as exported; the frozen one must still equal it
    reference = named_variables(reference)
    for key, var in named_variables(frozen).items():
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(reference[key][...]), err_msg=key)
    previewer = check_export(run, tmp_path / "export")
    preview = np.asarray(_apply(previewer, jnp.asarray(latents)))
    assert preview.shape == (N_IMAGES, 32, 32, 3)
    target = np.asarray(resize_to(jnp.asarray(images.astype(np.float32) / 255.0), (32, 32)))
    mse = float(np.mean(np.square(preview - target)))
    print(f"exported Previewer: MSE {mse:.4f} against the 32x32 images")
    assert mse < 0.6 * first


def test_calibrated_effnet_latents_are_normalised_and_informative(images, calibrated):
    model, latents = calibrated  # the calibrated encoder, through its exported directory
    assert isinstance(model, EfficientNetEncoder) and model.backbone.length == 6  # stem, 4 stages, head
    assert latents.shape == (N_IMAGES, 4, 4, 16)
    mean, var = latents.mean(axis=(0, 1, 2)), latents.var(axis=(0, 1, 2))
    np.testing.assert_allclose(mean, 0.0, atol=1e-3)
    np.testing.assert_allclose(var, 1.0, atol=1e-2)
    # Uncalibrated, the same random encoder's latents are nearly constant (measured variance ~1e-4).
    raw = effnet_latents(random_model("effnet", SMALL_EFFNET, seed=3), images)
    assert raw.var(axis=(0, 1, 2)).max() < 0.1
    # Informative: images differ in the colour and position of their square, and so do their latents.
    flat = latents.reshape(N_IMAGES, -1)
    distinct = [(i, j) for i in range(N_IMAGES) for j in range(i) if not np.array_equal(images[i], images[j])]
    distance = np.array([np.sqrt(np.mean(np.square(flat[i] - flat[j]))) for i, j in distinct])
    print(f"calibrated effnet: latent RMS distance between different images min {distance.min():.3f}, "
          f"median {np.median(distance):.3f}; between-image share of the variance {flat.var(0).mean():.3f}")
    assert distance.min() > 0.2 and np.median(distance) > 0.8
    assert flat.var(axis=0).mean() > 0.5  # most of the variance is between images, not fixed spatial pattern


def test_effnet_stage_rows_are_checked():
    rows = SMALL_EFFNET["stages"]
    with pytest.raises(ValueError, match=r"stages\[1\]: c_in 17 must equal the c_out 16"):
        EfficientNetEncoder(stages=[rows[0], [True, 4, 3, 2, 17, 32, 1]], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"stages\[0\] = .*expected 7 entries"):
        EfficientNetEncoder(stages=[[True, 1, 3, 1, 16, 16]], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"stages\[0\]: stride must be 1 or 2"):
        EfficientNetEncoder(stages=[[True, 1, 3, 3, 16, 16, 1]], rngs=nnx.Rngs(0))


def latent_object_weights(images01, latent_hw, object_weight, edge_weight=1.0):
    """The demo plug-in's pixel weights pooled per latent position, as the Stage B / C tasks pool them."""
    from cascade_jax.demo.loss_weights import object_weights
    from cascade_jax.training.pixel_weights import pooled_weights

    return pooled_weights(object_weights(images01, object_weight, edge_weight), latent_hw)


def test_object_weighted_reconstruction_loss_matches_hand_computed():
    from cascade_jax.demo.loss_weights import object_weights
    from cascade_jax.training.stage_a import reconstruction_loss

    # A 4x4 grey image with one red pixel: the median is the grey, the red pixel is the object.
    target = np.full((1, 4, 4, 3), 0.5, np.float32)
    target[0, 1, 2] = (1.0, 0.0, 0.0)
    prediction = np.full_like(target, 0.5)  # wrong only at the object: error (0.5, -0.5, -0.5)
    prediction[0, 0, 0] = (0.6, 0.5, 0.5)   # and slightly at one background pixel: error (0.1, 0, 0)
    weights = np.asarray(object_weights(jnp.asarray(target), 10.0))[0, ..., 0]
    expected = np.ones((4, 4)); expected[1, 2] = 10.0
    np.testing.assert_allclose(weights, expected / expected.mean(), rtol=1e-6)
    mse, total = reconstruction_loss(jnp.asarray(prediction), jnp.asarray(target),
                                     weights=object_weights(jnp.asarray(target), 10.0))
    sq = ((prediction - target) ** 2)[0]
    np.testing.assert_allclose(float(mse[0]), sq.mean(), rtol=1e-6)  # the logged value stays plain MSE
    np.testing.assert_allclose(float(total[0]), (sq * (expected / expected.mean())[..., None]).mean(), rtol=1e-6)
    plain_mse, plain_total = reconstruction_loss(jnp.asarray(prediction), jnp.asarray(target))
    assert float(plain_total[0]) == float(plain_mse[0]) == float(mse[0])
    # the plug-in is imported and tried when the config loads: a bad value, argument or path is named then
    with pytest.raises(ValueError, match="object_weight=0.5"):
        load_config("tiny_a", ['pixel_weights={function: "cascade_jax.demo.loss_weights:object_weights", object_weight: 0.5}'])
    with pytest.raises(ValueError, match="refused its arguments"):
        load_config("tiny_a", ['pixel_weights={function: "cascade_jax.demo.loss_weights:object_weights", object_wieght: 2}'])
    with pytest.raises(ValueError, match="cannot be imported"):
        load_config("tiny_a", ['pixel_weights={function: "cascade_jax.demo.loss_weights:nothing"}'])
    with pytest.raises(ValueError, match="package.module:name"):
        load_config("tiny_a", ["pixel_weights={object_weight: 2}"])


def test_latent_object_weights_and_weighted_denoising_loss():
    """Stage B / C: the pixel weights averaged per latent position weigh the denoising error; logs stay plain."""
    from cascade_jax.training.losses import denoising_loss, make_gdf

    images = np.full((1, 8, 8, 3), 0.5, np.float32)
    images[0, :2, :2] = (1.0, 0.0, 0.0)  # a 2x2 object in the top-left 4x4 cell of a 2x2 latent
    weights = np.asarray(latent_object_weights(jnp.asarray(images), (2, 2), 10.0))[0, ..., 0]
    cell = (4 * 10 + 12 * 1) / 16  # the object cell's mean pixel weight; the other cells have 1
    expected = np.array([[cell, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(weights, expected / expected.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="image 8x8 is not a multiple of the latent 3x3"):
        latent_object_weights(jnp.asarray(images), (3, 3), 10.0)

    rng = np.random.default_rng(0)
    x0, eps, pred = (jnp.asarray(rng.standard_normal((2, 2, 2, 4)), jnp.float32) for _ in range(3))
    t = jnp.asarray([0.3, 0.8])
    w = jnp.asarray(np.stack([expected / expected.mean(), np.ones((2, 2))])[..., None], jnp.float32)
    gdf = make_gdf(False)
    loss, aux = denoising_loss(lambda noised, cond: pred, x0, t, eps, gdf, weights=w)
    plain_loss, plain_aux = denoising_loss(lambda noised, cond: pred, x0, t, eps, gdf)
    d = gdf.diffuse(x0, eps, t)
    squared = np.asarray(jnp.square(pred - d.target))
    weighted = (squared * np.asarray(w)).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(float(loss), float(np.mean(weighted * np.asarray(d.loss_weight))), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(aux.per_sample_loss), squared.mean(axis=(1, 2, 3)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(aux.per_sample_loss), np.asarray(plain_aux.per_sample_loss))
    assert abs(float(loss) - float(plain_loss)) > 1e-4  # the weights change what is optimised
    with pytest.raises(ValueError, match="cached_conditions batches do not carry"):
        load_config("tiny_b", ['pixel_weights={function: "cascade_jax.demo.loss_weights:object_weights", object_weight: 10}', "cached_conditions=true"])


def test_edge_weights_mark_the_outline_band_of_the_object():
    """``edge_weight``: the pixels within OUTLINE_RADIUS of the object's boundary, inside and outside."""
    from cascade_jax.demo.loss_weights import OUTLINE_RADIUS, object_weights, outline

    far = np.zeros((1, 16, 16, 1), bool)
    far[0, 6:10, 5:12] = True  # a 4x7 object
    band = np.asarray(outline(jnp.asarray(far)))[0, ..., 0]
    r = OUTLINE_RADIUS
    dilated = np.zeros((16, 16), bool); dilated[6 - r:10 + r, 5 - r:12 + r] = True
    eroded = np.zeros((16, 16), bool); eroded[6 + r:10 - r, 5 + r:12 - r] = True
    np.testing.assert_array_equal(band, dilated & ~eroded)

    image = np.full((1, 16, 16, 3), 0.5, np.float32)
    image[far[..., 0]] = (1.0, 0.0, 0.0)
    weights = np.asarray(object_weights(jnp.asarray(image), 5.0, 20.0))[0, ..., 0]
    expected = np.where(band, 20.0, np.where(far[0, ..., 0], 5.0, 1.0))
    np.testing.assert_allclose(weights, expected / expected.mean(), rtol=1e-6)
    # edge weight 1 leaves the object weights as they were; the latent weights average the pixel weights
    np.testing.assert_array_equal(np.asarray(object_weights(jnp.asarray(image), 5.0, 1.0)),
                                  np.asarray(object_weights(jnp.asarray(image), 5.0)))
    cells = expected.reshape(4, 4, 4, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(np.asarray(latent_object_weights(jnp.asarray(image), (4, 4), 5.0, 20.0))[0, ..., 0],
                               cells / cells.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="edge_weight=0.5"):
        load_config("tiny_b", ['pixel_weights={function: "cascade_jax.demo.loss_weights:object_weights", object_weight: 1, edge_weight: 0.5}'])
    with pytest.raises(ValueError, match="pixel_weights needs the images"):
        load_config("tiny_b", ['pixel_weights={function: "cascade_jax.demo.loss_weights:object_weights", object_weight: 1, edge_weight: 4}', "cached_conditions=true"])


def test_median_without_sorting_equals_jnp_median_bit_for_bit():
    """``demo.loss_weights.median`` (bisection on integer keys, the object weights' median colour) against ``jnp.median``:
    ties (uint8 images), negative values and zeros, odd and even lengths, one element."""
    from cascade_jax.demo.loss_weights import median

    rng = np.random.default_rng(0)
    cases = [rng.integers(0, 256, (4, 300, 3)).astype(np.float32) / 255.0,  # many ties, as in images
             rng.standard_normal((3, 7, 2)).astype(np.float32),
             rng.standard_normal((2, 8, 5)).astype(np.float32) * 1e-30,
             np.array([[[0.0], [-0.0], [-1.5], [2.0]]], np.float32),
             rng.standard_normal((5, 1, 3)).astype(np.float32)]
    for x in cases:
        for axis in (1, 2):
            np.testing.assert_array_equal(np.asarray(median(jnp.asarray(x), axis)),
                                          np.asarray(jnp.median(jnp.asarray(x), axis=axis)))
