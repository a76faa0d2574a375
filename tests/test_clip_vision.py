"""CLIPVisionEncoder and CLIP preprocessing: parity with transformers, full-size layout.

Model parity bound: max|Δ| ≤ 1e-4·max|ref| (helpers.relative_error), tiny random config, float32,
every parameter randomised, ``.eval()``. Preprocessing: against ``CLIPImageProcessorPil``
(transformers' PIL backend), which it reproduces step for step.
"""


import numpy as np
import pytest
from flax import nnx
from PIL import Image, ImageDraw

from cascade_jax.data.clip_preprocess import preprocess_image, preprocess_images
from cascade_jax.models.clip import CLIPVisionEncoder, vision_kwargs_from_hf_config

from clip_testing import load_converted, randomise_torch_model, save_torch_model
from helpers import nchw_to_nhwc, relative_error

TOL = 1e-4


def tiny_config(**overrides):
    config = dict(hidden_size=64, intermediate_size=96, projection_dim=40, num_hidden_layers=2, num_attention_heads=4,
                  num_channels=3, image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    config.update(overrides)
    return config


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_parity_with_transformers(tmp_path, hidden_act):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.CLIPVisionConfig(**tiny_config(hidden_act=hidden_act))
    ref = randomise_torch_model(transformers.CLIPVisionModelWithProjection(hf_config), seed=3)
    weights = save_torch_model(ref, tmp_path / "clip_vision.safetensors")
    ours = load_converted("clip_vision", vision_kwargs_from_hf_config(hf_config.to_dict()), weights, tmp_path)

    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)  # NCHW for torch
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
    got = nnx.jit(lambda m, x: m(x, output_hidden_states=True))(ours, nchw_to_nhwc(pixels))
    errors = {
        "image_embeds": relative_error(got.image_embeds, want.image_embeds.numpy()),
        "last_hidden_state": relative_error(got.last_hidden_state, want.last_hidden_state.numpy()),
        "hidden_states": max(relative_error(g, w.numpy()) for g, w in zip(got.hidden_states, want.hidden_states)),
    }
    print(f"vision {hidden_act}: relative errors {errors}")
    assert got.image_embeds.shape == (3, 40) and len(got.hidden_states) == len(want.hidden_states) == 3
    for name, err in errors.items():
        assert err <= TOL, f"{name}: {err:.2e} > {TOL}"


def test_wrong_image_size_is_named():
    model = nnx.eval_shape(lambda: CLIPVisionEncoder(**tiny_config(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="32x32"):
        model(np.zeros((1, 48, 32, 3), np.float32))


# ------------------------------------------------------------------------------ preprocessing
def test_image(width, height, mode="RGB"):
    """A non-square picture with gradients, hard edges and text-like detail (bicubic rings on edges)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / (width - 1), 255 * y / (height - 1), 127 + 120 * np.sin(x / 7.0) * np.cos(y / 11.0)], -1)
    image = Image.fromarray(rgb.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse([width // 5, height // 6, width // 2, height // 2], fill=(250, 20, 30), outline=(0, 0, 0), width=3)
    draw.rectangle([width // 2, height // 2, width - 10, height - 5], fill=(10, 200, 40))
    draw.line([0, height - 1, width - 1, 0], fill=(255, 255, 255), width=2)
    for i in range(0, width, 9):
        draw.point([(i, (i * 7) % height)], fill=(0, 0, 255))
    if mode == "RGBA":
        image = image.convert("RGBA")
        alpha = Image.fromarray((255 * (x / (width - 1))).astype(np.uint8))
        image.putalpha(alpha)
    return image.convert(mode) if mode not in ("RGB", "RGBA") else image


test_image.__test__ = False  # a helper, not a test


@pytest.mark.parametrize("width,height,mode", [(333, 250, "RGB"), (200, 517, "RGB"), (640, 640, "RGB"),
                                               (150, 120, "RGB"), (301, 260, "RGBA"), (260, 300, "L")])
def test_preprocessing_matches_transformers_pil_backend(width, height, mode):
    transformers = pytest.importorskip("transformers")
    processor = transformers.CLIPImageProcessorPil()
    image = test_image(width, height, mode)
    want = processor(images=image, return_tensors="np")["pixel_values"]  # (1, 3, 224, 224)
    got = preprocess_images([image])
    assert got.shape == (1, 224, 224, 3) and got.dtype == np.float32
    diff = float(np.max(np.abs(got - nchw_to_nhwc(want))))
    print(f"preprocess {width}x{height} {mode}: max|Δ| = {diff}")
    assert diff == 0.0


def test_preprocessing_of_uint8_arrays_matches():
    transformers = pytest.importorskip("transformers")
    processor = transformers.CLIPImageProcessorPil()
    arrays = [np.asarray(test_image(280, 240)), np.asarray(test_image(240, 300, "RGBA"))]
    want = processor(images=arrays, return_tensors="np")["pixel_values"]
    got = preprocess_images(arrays)
    np.testing.assert_array_equal(got, nchw_to_nhwc(want))
    np.testing.assert_array_equal(preprocess_image(arrays[0]), got[0])


def test_float_arrays_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(np.zeros((64, 64, 3), np.float32))
