"""The inpainting ControlNet's saliency network (official ``modules/cnet_modules/inpainting/saliency_model.py``,
``MicroResNet``), NHWC, for the automatic masks of ``cascade_jax.data.hints.inpainting.saliency_mask``.

Input: RGB in [0, 1] whose short side the filter has resized to 240; output: saliency in [0, 1]
at 1/8 of the input size. The official weights ship as a PyTorch pickle
(``saliency_model.pt``), which this project does not unpickle: re-save its state dict as
safetensors with your own PyTorch, then ``convert/convert.py --model saliency --config saliency``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cascade_jax.nn.layers import Conv2d, Lambda, Sequential
from cascade_jax.nn.params import param


def ReflectionPad2d(p):
    return Lambda(lambda x: jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect"), f"ReflectionPad2d({p})")


def ReLU():
    return Lambda(jax.nn.relu, "ReLU")


def Sigmoid():
    return Lambda(jax.nn.sigmoid, "Sigmoid")


def UpsampleNearest2x():
    return Lambda(lambda x: jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), "Upsample(2, nearest)")


class InstanceNorm2d(nnx.Module):
    """``torch.nn.InstanceNorm2d(c, affine=True)``: per sample and channel over H, W (biased var, eps 1e-5)."""

    def __init__(self, c, eps=1e-5, *, rngs):
        self.eps = eps
        self.weight = param(rngs, (c,), torch_layout="same", axes=("norm",), init="ones")
        self.bias = param(rngs, (c,), torch_layout="same", axes=("norm",), init="zeros")

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2), keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]
        return y.astype(x.dtype)


class SaliencyResBlock(nnx.Module):
    def __init__(self, c, *, rngs):
        self.resblock = Sequential(ReflectionPad2d(1), Conv2d(c, c, 3, rngs=rngs), InstanceNorm2d(c, rngs=rngs), ReLU(),
                                   ReflectionPad2d(1), Conv2d(c, c, 3, rngs=rngs), InstanceNorm2d(c, rngs=rngs))

    def __call__(self, x):
        return self.resblock(x) + x


def _down(c_in, c_out, kernel, stride, pad, *, rngs):
    return [ReflectionPad2d(pad), Conv2d(c_in, c_out, kernel, stride=stride, rngs=rngs),
            InstanceNorm2d(c_out, rngs=rngs), ReLU()]


class MicroResNet(nnx.Module):
    """``MicroResNet()(x)``: (B, H, W, 3) in [0, 1] -> (B, ~H/8, ~W/8, 1) saliency in [0, 1]."""

    CONFIG_FORMS = {}  # the official constructor takes no arguments

    def __init__(self, *, rngs):
        self.downsampler = Sequential(*_down(3, 8, 9, 4, 4, rngs=rngs), *_down(8, 16, 3, 2, 1, rngs=rngs),
                                      *_down(16, 32, 3, 2, 1, rngs=rngs))
        self.residual = Sequential(SaliencyResBlock(32, rngs=rngs), Conv2d(32, 64, 1, groups=32, bias=False, rngs=rngs),
                                   SaliencyResBlock(64, rngs=rngs))
        self.segmentator = Sequential(ReflectionPad2d(1), Conv2d(64, 16, 3, rngs=rngs), InstanceNorm2d(16, rngs=rngs),
                                      ReLU(), UpsampleNearest2x(), ReflectionPad2d(4), Conv2d(16, 1, 9, rngs=rngs),
                                      Sigmoid())

    def __call__(self, x):
        return self.segmentator(self.residual(self.downsampler(x)))
