"""Stage A from diffusers' PaellaVQModel: format adapter, config translation, numerical parity.

The parity tests run our StageA with diffusers' own scale factor (0.3764, from its config), as
diffusers' pipelines do; the official value 0.43 is what a converted diffusers folder gets by
default (see cascade_jax.weights.diffusers_vq).
"""

import json

import numpy as np
import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel

import cascade_jax
from cascade_jax.weights.convert import convert_checkpoint
from cascade_jax.weights.diffusers_vq import stage_a_config_from_paella
from cascade_jax.weights.formats import detect_format
from helpers import nchw_to_nhwc, randomize_torch_module, relative_error

TOL = 1e-4  # max|Δ| ≤ TOL · max|ref|, float32
TINY = dict(levels=2, bottleneck_blocks=2, embed_dim=32, latent_channels=4, num_vq_embeddings=64)


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A saved tiny PaellaVQModel (config.json + safetensors) with every tensor randomised."""
    vq = randomize_torch_module(PaellaVQModel(**TINY), seed=0)
    folder = tmp_path_factory.mktemp("paella") / "vqgan"
    vq.save_pretrained(folder, safe_serialization=True)
    return vq, folder


@pytest.fixture(scope="module")
def converted(diffusers_folder, tmp_path_factory):
    vq, folder = diffusers_folder
    config = stage_a_config_from_paella(dict(vq.config), scale_factor=None)  # diffusers' 0.3764
    out = convert_checkpoint("stage_a", config, folder, tmp_path_factory.mktemp("converted") / "stage_a")
    return vq, cascade_jax.load_model(out)


def _image():
    return np.random.default_rng(0).standard_normal((2, 3, 32, 24)).astype(np.float32)


def test_format_is_detected_and_config_translated(diffusers_folder):
    vq, _ = diffusers_folder
    keys = set(vq.state_dict())
    assert detect_format("stage_a", keys).name == "diffusers"
    assert stage_a_config_from_paella(dict(vq.config)) == dict(
        levels=2, bottleneck_blocks=2, c_hidden=32, c_latent=4, codebook_size=64, scale_factor=0.43)
    with pytest.raises(ValueError, match="up_down_scale_factor"):
        stage_a_config_from_paella({**vq.config, "up_down_scale_factor": 4})


def test_folder_converts_with_official_scale_factor(diffusers_folder, tmp_path):
    _, folder = diffusers_folder
    out = convert_checkpoint("stage_a", None, folder, tmp_path / "stage_a")  # config.json beside the weights
    meta = json.loads((out / "cascade_model.json").read_text())
    assert meta["source"]["format"] == "diffusers"
    assert meta["config"]["scale_factor"] == 0.43 and meta["config"]["c_hidden"] == 32


def test_encode_decode_match_diffusers(converted):
    vq, model = converted
    scale = vq.config.scale_factor
    assert model.scale_factor == scale == 0.3764
    image = _image()
    with torch.no_grad():
        latents = vq.encode(torch.from_numpy(image)).latents
        decoded = vq.decode(latents).sample.numpy()
    # diffusers' latents are unscaled: ours are latents / scale_factor, and decode undoes it.
    ours = model.encode(nchw_to_nhwc(image))
    err_encode = relative_error(np.asarray(ours) * scale, nchw_to_nhwc(latents.numpy()))
    err_decode = relative_error(model.decode(nchw_to_nhwc(latents.numpy()) / scale), nchw_to_nhwc(decoded))
    print(f"diffusers encode rel err {err_encode:.2e}, decode rel err {err_decode:.2e}")
    assert err_encode <= TOL and err_decode <= TOL


def test_quantization_matches_diffusers(converted):
    vq, model = converted
    scale = vq.config.scale_factor
    image = _image()
    with torch.no_grad():
        latents = vq.encode(torch.from_numpy(image)).latents
        quantized, _, (_, _, indices) = vq.vquantizer(latents)
        decoded = vq.decode(latents, force_not_quantize=False).sample.numpy()
    ours_quantized, _, ours_indices, _ = model.encode(nchw_to_nhwc(image), quantize=True)
    assert len(np.unique(indices.numpy())) >= 8  # many codebook rows in play, not one degenerate pick
    np.testing.assert_array_equal(np.asarray(ours_indices).reshape(-1), indices.numpy().reshape(-1))
    err_quantized = relative_error(np.asarray(ours_quantized) * scale, nchw_to_nhwc(quantized.numpy()))
    err_decode = relative_error(model.decode(ours_quantized), nchw_to_nhwc(decoded))
    print(f"diffusers quantized rel err {err_quantized:.2e}, quantized decode rel err {err_decode:.2e}")
    assert err_quantized <= TOL and err_decode <= TOL
