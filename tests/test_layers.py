"""cascade_jax.nn layers against their torch counterparts (NHWC vs NCHW, weights via official keys)."""

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from cascade_jax import nn
from cascade_jax.weights.tree import load_torch_state_dict
from helpers import nchw_to_nhwc, nhwc_to_nchw, randomize_torch_module, relative_error

TOL = 1e-5  # float32, one layer


def _abstract(build):
    """The layer with shapes only: every value then comes from torch's state dict, and no
    random init is compiled (threefry compiles take seconds per shape on the CPU)."""
    return nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0)))


def _image(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _compare(ours, theirs, x_nchw):
    """Load ``theirs``' state dict into ``ours`` by key, run both, return the relative error."""
    randomize_torch_module(theirs, seed=1)
    load_torch_state_dict(ours, theirs.state_dict())
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x_nchw)).numpy()
    return relative_error(nhwc_to_nchw(ours(nchw_to_nhwc(x_nchw))), ref)


@pytest.mark.parametrize("c_in,c_out,k,stride,padding,groups,bias", [
    (4, 8, 3, 1, 1, 1, True),
    (6, 12, 3, 2, 1, 3, True),
    (8, 8, 3, 1, 0, 8, True),  # depthwise, no padding (Stage A after ReplicationPad2d)
    (4, 6, 4, 2, 1, 1, True),  # Stage A downsampling
    (3, 5, 1, 1, 0, 1, False),
])
def test_conv2d(c_in, c_out, k, stride, padding, groups, bias):
    ours = _abstract(partial(nn.Conv2d, c_in, c_out, k, stride=stride, padding=padding, groups=groups, bias=bias))
    theirs = torch.nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, groups=groups, bias=bias)
    err = _compare(ours, theirs, _image((2, c_in, 9, 11)))
    print(f"Conv2d rel err {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("c_in,c_out,k,stride,padding", [
    (8, 4, 4, 2, 1),  # Stage A upsampling
    (8, 6, 2, 2, 0),  # Previewer upsampling
    (4, 4, 3, 1, 1),
    (4, 3, 3, 2, 0),
])
def test_conv_transpose2d(c_in, c_out, k, stride, padding):
    ours = _abstract(partial(nn.ConvTranspose2d, c_in, c_out, k, stride=stride, padding=padding))
    theirs = torch.nn.ConvTranspose2d(c_in, c_out, k, stride=stride, padding=padding)
    err = _compare(ours, theirs, _image((2, c_in, 5, 7)))
    print(f"ConvTranspose2d rel err {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("r", [2, 3])
def test_pixel_unshuffle_and_shuffle_channel_order(r):
    x = _image((2, 5, 3 * r, 2 * r))
    down = torch.nn.PixelUnshuffle(r)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(nhwc_to_nchw(nn.pixel_unshuffle(nchw_to_nhwc(x), r)), down)
    up = torch.nn.PixelShuffle(r)(torch.from_numpy(down)).numpy()
    np.testing.assert_array_equal(nhwc_to_nchw(nn.pixel_shuffle(nchw_to_nhwc(down), r)), up)


@pytest.mark.parametrize("size", [(11, 13), (4, 6), (1, 1), (7, 3), (5, 7)])
def test_resize_bilinear_align_corners(size):
    x = _image((2, 3, 5, 7))
    ref = F.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=True).numpy()
    err = relative_error(nhwc_to_nchw(nn.resize_bilinear_align_corners(nchw_to_nhwc(x), size)), ref)
    print(f"resize {size} rel err {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("eps,affine", [(1e-5, True), (1e-3, True), (1e-5, False)])
def test_batchnorm2d_inference(eps, affine):
    ours = _abstract(partial(nn.BatchNorm2d, 6, eps=eps, affine=affine))
    theirs = torch.nn.BatchNorm2d(6, eps=eps, affine=affine)
    err = _compare(ours, theirs, _image((2, 6, 4, 5)))
    print(f"BatchNorm2d rel err {err:.2e}")
    assert err <= TOL


class _TorchGRN(torch.nn.Module):
    """The official GlobalResponseNorm (ConvNeXt-V2), on channels-last input."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = torch.nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


def test_global_response_norm():
    ours, theirs = _abstract(partial(nn.GlobalResponseNorm, 8)), _TorchGRN(8)
    randomize_torch_module(theirs, seed=1)
    load_torch_state_dict(ours, theirs.state_dict())
    x = _image((2, 5, 6, 8))  # already channels-last on both sides
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x)).numpy()
    err = relative_error(ours(x), ref)
    print(f"GRN rel err {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("c,nhead", [(16, 4), (12, 1)])
def test_multihead_attention(c, nhead):
    ours = _abstract(partial(nn.MultiheadAttention, c, nhead))
    theirs = torch.nn.MultiheadAttention(c, nhead, bias=True, batch_first=True)
    randomize_torch_module(theirs, seed=1)
    load_torch_state_dict(ours, theirs.state_dict())
    q, kv = _image((2, 7, c), seed=2), _image((2, 9, c), seed=3)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(q), torch.from_numpy(kv), torch.from_numpy(kv), need_weights=False)[0].numpy()
    err = relative_error(ours(q, kv), ref)
    print(f"MultiheadAttention rel err {err:.2e}")
    assert err <= TOL


def test_linear_and_layer_norm():
    ours, theirs = _abstract(partial(nn.Linear, 6, 5)), torch.nn.Linear(6, 5)
    randomize_torch_module(theirs, seed=1)
    load_torch_state_dict(ours, theirs.state_dict())
    x = _image((3, 4, 6))
    with torch.no_grad():
        assert relative_error(ours(x), theirs(torch.from_numpy(x)).numpy()) <= TOL
        ln = torch.nn.LayerNorm(6, eps=1e-6, elementwise_affine=False)
        assert relative_error(nn.LayerNorm2d(eps=1e-6)(x), ln(torch.from_numpy(x)).numpy()) <= TOL
