"""EfficientNetEncoder at its real size against torchvision's efficientnet_v2_s features + mapper."""

import json

import numpy as np
import torch
import torchvision
from flax import nnx

from cascade_jax.models.effnet import EfficientNetEncoder
from cascade_jax.models.registry import load_config
from cascade_jax.weights.tree import expected_torch_shapes, load_torch_state_dict, named_variables
from helpers import checkpoint_layout, nchw_to_nhwc, randomize_torch_module, relative_error

TOL = 1e-4  # max|Δ| ≤ TOL · max|ref|, float32


class TorchEfficientNetEncoder(torch.nn.Module):
    """The official EfficientNetEncoder without its pretrained download (weights are randomised)."""

    def __init__(self, c_latent=16):
        super().__init__()
        self.backbone = torchvision.models.efficientnet_v2_s().features
        self.mapper = torch.nn.Sequential(torch.nn.Conv2d(1280, c_latent, kernel_size=1, bias=False),
                                          torch.nn.BatchNorm2d(c_latent, affine=False))

    def forward(self, x):
        return self.mapper(self.backbone(x))


def test_matches_torchvision_at_real_size():
    reference = randomize_torch_module(TorchEfficientNetEncoder(), seed=0)  # eval mode, every tensor random
    # Built abstract, then filled from the official keys (backbone.*, mapper.*), strictly.
    model = nnx.eval_shape(lambda: EfficientNetEncoder(c_latent=16, rngs=nnx.Rngs(0)))
    load_torch_state_dict(model, reference.state_dict())
    # Non-square, not a multiple of 32 in width: exercises 'same' padding at every stride-2 conv.
    image = np.random.default_rng(0).standard_normal((2, 3, 64, 80)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(image)).numpy()
    assert expected.shape == (2, 16, 2, 3) and np.std(expected) > 0.1  # a live, non-degenerate output
    out = nnx.jit(lambda m, x: m(x))(model, nchw_to_nhwc(image))
    err = relative_error(out, nchw_to_nhwc(expected))
    print(f"effnet rel err {err:.2e}")
    assert err <= TOL


def test_preset_matches_released_checkpoint(shared_dir):
    model_name, config = load_config("effnet_encoder")
    assert model_name == "effnet"
    model = nnx.eval_shape(lambda: EfficientNetEncoder(**config, rngs=nnx.Rngs(0)))
    layout = checkpoint_layout(shared_dir, "effnet_encoder")
    assert expected_torch_shapes(model) == layout
    # summary.json counts every tensor but only trainable parameters (no BatchNorm statistics).
    summary = json.loads((shared_dir / "reference/checkpoint_layouts/summary.json").read_text())["effnet_encoder"]
    n_params = sum(int(np.prod(v.shape)) for v in named_variables(model).values() if isinstance(v, nnx.Param))
    assert (len(layout), n_params) == (summary["tensors"], summary["parameters"])
