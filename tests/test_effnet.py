"""EfficientNetEncoder at its real size against torchvision's efficientnet_v2_s features + mapper."""


import numpy as np
import torch
import torchvision
from flax import nnx

from cascade_jax.models.effnet import EfficientNetEncoder
from cascade_jax.weights.tree import load_torch_state_dict
from helpers import nchw_to_nhwc, randomize_torch_module, relative_error

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


