"""ControlNet: the official tiny fixture (residual list and Stage C with them), the effnet bottleneck
with 1-, 3- and 4-channel stems against torchvision built the official way, the released layouts, and
convert/convert.py on a random full-size canny file of the released layout against the official module."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx

from cascade_jax.models.controlnet import ControlNet, adapt_stem_weight
from cascade_jax.models.registry import abstract_model, load_config
from cascade_jax.weights.tree import expected_torch_shapes, load_torch_state_dict, named_variables
from helpers import (fixture, load_fixture_model, nchw_to_nhwc, nhwc_to_nchw, randomize_torch_module,
                     read_checkpoint_layout, relative_error)

PARITY = 1e-4  # max|Δ| / max|ref| against the official float32 outputs

# preset -> released layout file in shared/reference/checkpoint_layouts
PRESET_LAYOUTS = {"controlnet_canny": "controlnet_canny", "controlnet_inpainting": "controlnet_inpainting",
                  "controlnet_sr": "controlnet_super_resolution", "controlnet_identity": "controlnet_identity"}


@pytest.fixture(scope="module")
def official(fixtures_dir, tmp_path_factory):
    config, io, weights = fixture(fixtures_dir, "controlnet")
    model = load_fixture_model("controlnet", config["config"], weights, tmp_path_factory.mktemp("controlnet"))
    return model, io


def _fixture_residuals(io):
    count = sum(k.startswith("cnet_") for k in io)
    return [io[f"cnet_{i}"] if io[f"cnet_{i}"].size else None for i in range(count)]


def test_converted_fixture_reproduces_residual_list(official):
    model, io = official
    expected = _fixture_residuals(io)
    residuals = nnx.jit(lambda m, h: m(h))(model, jnp.asarray(nchw_to_nhwc(io["hint"])))
    assert [r is None for r in residuals] == [e is None for e in expected]
    errors = [relative_error(nhwc_to_nchw(r), e) for r, e in zip(residuals, expected) if e is not None]
    print(f"controlnet residuals: max rel err {max(errors):.2e} (bound {PARITY:.0e})")
    assert max(errors) <= PARITY


def test_residuals_drive_the_official_stage_c(official, fixtures_dir, tmp_path):
    model, io = official
    c_config, c_io, c_weights = fixture(fixtures_dir, "stage_c")
    stage_c = load_fixture_model("stage_c", c_config["config"], c_weights, tmp_path)
    inputs = {k: jnp.asarray(nchw_to_nhwc(c_io[k])) for k in
              ("x", "r", "clip_text", "clip_text_pooled", "clip_img", "sca", "crp")}

    @nnx.jit
    def run(cnet_model, unet, hint, inputs):
        return unet(inputs["x"], inputs["r"], inputs["clip_text"], inputs["clip_text_pooled"], inputs["clip_img"],
                    cnet=cnet_model(hint), sca=inputs["sca"], crp=inputs["crp"])

    out = run(model, stage_c, jnp.asarray(nchw_to_nhwc(io["hint"])), inputs)
    err = relative_error(nhwc_to_nchw(out), io["out_with_cnet"])
    print(f"stage_c with converted ControlNet: rel err {err:.2e} (bound {PARITY:.0e})")
    assert err <= PARITY


def _official_effnet_backbone(c_in: int, seed: int):
    """What the official ControlNet builds for ``bottleneck_mode='effnet'`` (randomised, not downloaded)."""
    features = randomize_torch_module(torchvision.models.efficientnet_v2_s().features, seed=seed)
    rgb = features[0][0].weight.data.clone()
    if c_in != 3:
        features[0][0] = torch.nn.Conv2d(c_in, 24, kernel_size=3, stride=2, bias=False)
        with torch.no_grad():
            if c_in > 3:
                features[0][0].weight.zero_()
                features[0][0].weight[:, :3] = rgb[:, :3]
            else:
                features[0][0].weight.copy_(rgb[:, :c_in])
    return features.eval(), rgb


@pytest.mark.parametrize("c_in", [1, 3, 4])
def test_effnet_bottleneck_matches_torchvision(c_in):
    reference, rgb = _official_effnet_backbone(c_in, seed=c_in)
    model = nnx.eval_shape(lambda: ControlNet(c_in=c_in, c_proj=8, proj_blocks=[1], rngs=nnx.Rngs(0)))
    state = {f"backbone.{k}": v for k, v in reference.state_dict().items()}
    projection = torch.nn.Conv2d(1280, 1280, 1, bias=False)
    state["projections.0.0.weight"] = torch.randn(1280, 1280, 1, 1, generator=torch.Generator().manual_seed(1)) / 36
    state["projections.0.2.weight"] = torch.randn(8, 1280, 1, 1, generator=torch.Generator().manual_seed(2)) / 36
    load_torch_state_dict(model, state)
    # 80x72 is odd after the un-padded replacement stem: exercises its smaller feature map.
    hint = np.random.default_rng(c_in).standard_normal((1, c_in, 72, 80)).astype(np.float32)
    with torch.no_grad():
        features = reference(torch.from_numpy(hint))
        projection.weight.copy_(state["projections.0.0.weight"])
        hidden = torch.nn.functional.leaky_relu(projection(features), 0.2)
        expected = torch.nn.functional.conv2d(hidden, state["projections.0.2.weight"]).numpy()
    residuals = nnx.jit(lambda m, h: m(h))(model, nchw_to_nhwc(hint))
    assert residuals[0] is None and np.std(expected) > 0.05
    err = relative_error(nhwc_to_nchw(residuals[1]), expected)
    print(f"effnet bottleneck c_in={c_in}: out {tuple(expected.shape)}, rel err {err:.2e}")
    assert err <= PARITY
    if c_in != 3:  # the weight surgery for starting from RGB weights is the official one
        ours = adapt_stem_weight(rgb.numpy().transpose(2, 3, 1, 0), c_in)
        np.testing.assert_array_equal(ours, reference[0][0].weight.detach().numpy().transpose(2, 3, 1, 0))


@pytest.mark.parametrize("preset", sorted(PRESET_LAYOUTS))
def test_preset_reproduces_released_layout(preset, shared_dir):
    layouts = shared_dir / "reference" / "checkpoint_layouts"
    model_name, config = load_config(preset)
    assert model_name == "controlnet"
    model = abstract_model(model_name, config)
    shapes = expected_torch_shapes(model)
    expected = read_checkpoint_layout(layouts / f"{PRESET_LAYOUTS[preset]}.tsv")
    assert sorted(set(expected) - set(shapes)) == [], "tensors the model lacks"
    assert sorted(set(shapes) - set(expected)) == [], "tensors the checkpoint lacks"
    assert {k: (v, expected[k]) for k, v in shapes.items() if v != expected[k]} == {}
    summary = json.loads((layouts / "summary.json").read_text())[PRESET_LAYOUTS[preset]]
    trainable = sum(int(np.prod(v.shape)) for v in named_variables(model).values() if isinstance(v, nnx.Param))
    assert (len(shapes), trainable) == (summary["tensors"], summary["parameters"])


def test_fresh_controlnet_adds_nothing():
    with jax.threefry_partitionable(False):  # the classic RNG lowering compiles ~3x faster on a CPU
        model = ControlNet(c_in=3, c_proj=16, proj_blocks=[0, 2], bottleneck_mode="simple", rngs=nnx.Rngs(0))
    residuals = model(jnp.ones((1, 4, 4, 3)))
    assert residuals[1] is None and len(residuals) == 3
    assert all(float(jnp.abs(r).max()) == 0.0 for r in residuals if r is not None)
    assert float(jnp.abs(jax.tree.leaves(nnx.state(model.projections[0][0], nnx.Param))[0]).max()) > 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="bottleneck_mode"):
        ControlNet(proj_blocks=[0], bottleneck_mode="huge", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="proj_blocks"):
        ControlNet(proj_blocks=[], bottleneck_mode="simple", rngs=nnx.Rngs(0))
    with jax.threefry_partitionable(False):
        model = ControlNet(c_in=3, c_proj=4, proj_blocks=[0], bottleneck_mode="simple", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="3 channels"):
        model(jnp.ones((1, 4, 4, 1)))


def _random_official_file(path, preset: str, seed: int = 0):
    """A random file of the released layout (bfloat16, as the other released checkpoints), official keys."""
    import ml_dtypes
    from safetensors.numpy import save_file

    shapes = expected_torch_shapes(abstract_model(*load_config(preset)))
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            tensors[key] = np.zeros(shape, np.int64)
            continue
        value = rng.uniform(0.5, 1.5, shape) if key.endswith("running_var") else \
            rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]) if len(shape) > 1 else 4.0)
        tensors[key] = value.astype(ml_dtypes.bfloat16)
    save_file(tensors, str(path))


def test_convert_cli_turns_an_official_canny_file_into_the_official_residuals(tmp_path):
    """convert/convert.py --model controlnet --config controlnet_canny on a random full-size file of the
    released layout; the result matches the official module (torchvision-built) loaded from the same file."""
    import importlib.util

    from safetensors.torch import load_file

    import cascade_jax
    from helpers import REPO

    source = tmp_path / "canny.safetensors"
    _random_official_file(source, "controlnet_canny")
    spec = importlib.util.spec_from_file_location("convert_script", REPO / "convert" / "convert.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--model", "controlnet", "--config", "controlnet_canny", "--input", str(source),
                        "--output", str(tmp_path / "canny")]) in (0, None)
    model = cascade_jax.load_model(tmp_path / "canny")

    state = {k: v.float() for k, v in load_file(str(source)).items()}
    backbone, _ = _official_effnet_backbone(1, seed=0)
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    hint = np.random.default_rng(0).random((1, 1, 64, 96)).astype(np.float32)
    with torch.no_grad():
        features = backbone(torch.from_numpy(hint))
        expected = [torch.nn.functional.conv2d(torch.nn.functional.leaky_relu(torch.nn.functional.conv2d(
            features, state[f"projections.{i}.0.weight"]), 0.2), state[f"projections.{i}.2.weight"]).numpy()
            for i in range(8)]
    residuals = nnx.jit(lambda m, h: m(h))(model, nchw_to_nhwc(hint))
    blocks = [0, 4, 8, 12, 51, 55, 59, 63]
    assert len(residuals) == 64 and [i for i, r in enumerate(residuals) if r is not None] == blocks
    errors = [relative_error(nhwc_to_nchw(residuals[b]), e) for b, e in zip(blocks, expected)]
    print(f"converted canny (random official file): residuals {expected[0].shape}, max rel err {max(errors):.2e}")
    assert max(errors) <= PARITY
    # The pipeline's loader converts an official file with the control's preset on the fly: same weights.
    from cascade_jax.pipelines.controlnet import load_controlnet
    loaded = load_controlnet(source, "canny", dtype="float32")
    ours, theirs = named_variables(loaded), named_variables(model)
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k][...], theirs[k][...]) for k in ours)
