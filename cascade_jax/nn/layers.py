"""PyTorch-equivalent layers in NHWC, with parameters named as in PyTorch.

Parameters keep the PyTorch names (``weight``, ``bias``, ``running_mean``...) so that a
module path joined with dots is the official checkpoint key. Containers mirror
``nn.Sequential`` index for index (parameterless layers included) for the same reason.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from cascade_jax.nn.functional import depthwise_conv_shifted, gelu, layer_norm, pixel_shuffle, pixel_unshuffle
from cascade_jax.nn.params import batch_stat, param


class Conv2d(nnx.Module):
    """``torch.nn.Conv2d`` on NHWC input; ``weight`` is stored HWIO."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0, groups=1, bias=True, *, rngs):
        self.stride, self.padding, self.groups = stride, padding, groups
        k = kernel_size
        self.weight = param(rngs, (k, k, c_in // groups, c_out), torch_layout="conv",
                            axes=("kernel_h", "kernel_w", "in", "out"))
        self.bias = param(rngs, (c_out,), torch_layout="same", axes=("out",)) if bias else None

    def __call__(self, x):
        w = self.weight[...]
        p = self.padding
        x = x.astype(w.dtype)
        if self._depthwise_as_shifts(x):
            y = depthwise_conv_shifted(x, w, p)
        else:
            y = jax.lax.conv_general_dilated(
                x, w, window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)
        return y if self.bias is None else y + self.bias[...]

    def _depthwise_as_shifts(self, x) -> bool:
        # XLA:CPU lowers grouped convolutions to a slow generic loop (10-18x slower than PyTorch on
        # the Stage B/C 3x3 depthwise convs, see benchmarks/); k*k shifted multiply-adds vectorise.
        # Accelerators keep the native convolution.
        depthwise = self.groups > 1 and self.groups == x.shape[-1] == self.weight.shape[-1]
        return depthwise and self.stride == 1 and jax.default_backend() == "cpu"


class ConvTranspose2d(nnx.Module):
    """``torch.nn.ConvTranspose2d`` (no groups, no output padding) on NHWC input.

    A transposed convolution is a convolution of the stride-dilated input with the spatially
    flipped kernel; ``weight`` holds that flipped kernel in HWIO so the forward is one conv.
    """

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0, bias=True, *, rngs):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        k = kernel_size
        self.weight = param(rngs, (k, k, c_in, c_out), torch_layout="conv_transpose",
                            axes=("kernel_h", "kernel_w", "in", "out"))
        self.bias = param(rngs, (c_out,), torch_layout="same", axes=("out",)) if bias else None

    def __call__(self, x):
        w = self.weight[...]
        edge = self.kernel_size - 1 - self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(w.dtype), w, window_strides=(1, 1), padding=((edge, edge), (edge, edge)),
            lhs_dilation=(self.stride, self.stride), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if self.bias is None else y + self.bias[...]


class Linear(nnx.Module):
    """``torch.nn.Linear``; ``weight`` is stored (in, out)."""

    def __init__(self, c_in, c_out, bias=True, *, rngs):
        self.weight = param(rngs, (c_in, c_out), torch_layout="linear", axes=("in", "out"))
        self.bias = param(rngs, (c_out,), torch_layout="same", axes=("out",)) if bias else None

    def __call__(self, x):
        w = self.weight[...]
        y = x.astype(w.dtype) @ w
        return y if self.bias is None else y + self.bias[...]


class LayerNorm2d(nnx.Module):
    """Channel LayerNorm without affine parameters (the official ``LayerNorm2d``)."""

    def __init__(self, eps=1e-6):
        self.eps = eps

    def __call__(self, x):
        return layer_norm(x, eps=self.eps)


class LayerNorm(nnx.Module):
    """``torch.nn.LayerNorm(c, eps)`` over the last axis, with ``weight``/``bias`` when affine."""

    def __init__(self, c, eps=1e-5, elementwise_affine=True, *, rngs=None):
        self.eps = eps
        self.weight = param(rngs, (c,), torch_layout="same", axes=("norm",), init="ones") if elementwise_affine else None
        self.bias = param(rngs, (c,), torch_layout="same", axes=("norm",), init="zeros") if elementwise_affine else None

    def __call__(self, x):
        y = layer_norm(x, eps=self.eps)
        if self.weight is not None:
            y = y * self.weight[...] + self.bias[...]
        return y


class Embedding(nnx.Module):
    """``torch.nn.Embedding``: ``weight`` (num, dim) indexed by integer ids."""

    def __init__(self, num, dim, *, rngs):
        self.weight = param(rngs, (num, dim), torch_layout="same", axes=("vocab", "embed"))

    def __call__(self, ids):
        return jnp.take(self.weight[...], ids, axis=0)


class BatchNorm2d(nnx.Module):
    """``torch.nn.BatchNorm2d`` in inference mode: normalises with the running statistics."""

    def __init__(self, c, eps=1e-5, affine=True, *, rngs):
        self.eps = eps
        self.weight = param(rngs, (c,), torch_layout="same", axes=("norm",), init="ones") if affine else None
        self.bias = param(rngs, (c,), torch_layout="same", axes=("norm",), init="zeros") if affine else None
        self.running_mean = batch_stat((c,), 0.0)
        self.running_var = batch_stat((c,), 1.0)
        # Kept only so that export reproduces the checkpoint exactly; unused in the forward.
        self.num_batches_tracked = batch_stat((), 0, dtype=jnp.int32)

    def __call__(self, x):
        mean, var = self.running_mean[...], self.running_var[...]
        scale = jax.lax.rsqrt(var.astype(jnp.float32) + self.eps)
        shift = -mean * scale
        if self.weight is not None:
            scale = scale * self.weight[...]
            shift = shift * self.weight[...] + self.bias[...]
        return (x * scale.astype(x.dtype) + shift.astype(x.dtype)).astype(x.dtype)


class GlobalResponseNorm(nnx.Module):
    """ConvNeXt-V2 GRN over the spatial axes of NHWC input (eps 1e-6)."""

    def __init__(self, dim, *, rngs):
        self.gamma = param(rngs, (1, 1, 1, dim), torch_layout="same", axes=(None, None, None, "out"))
        self.beta = param(rngs, (1, 1, 1, dim), torch_layout="same", axes=(None, None, None, "out"))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        squares = jnp.sum(jnp.square(x32), axis=(1, 2), keepdims=True)
        # A channel that is zero everywhere has norm 0, where sqrt's gradient is infinite and turns
        # training NaN; torch.norm's backward gives 0 there, and so does this (forward unchanged).
        nonzero = squares > 0
        gx = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squares, 1.0)), 0.0)
        nx = gx / (jnp.mean(gx, axis=-1, keepdims=True) + 1e-6)
        return (self.gamma[...] * (x32 * nx) + self.beta[...] + x32).astype(x.dtype)


class Lambda(nnx.Module):
    """A parameterless layer (activation, pixel shuffle, padding) that holds a list index."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def __call__(self, x):
        return self.fn(x)

    def __repr__(self):
        return f"Lambda({self.name})"


def GELU():
    return Lambda(gelu, "GELU")


def LeakyReLU(slope=0.2):
    return Lambda(lambda x: jax.nn.leaky_relu(x, slope), f"LeakyReLU({slope})")


def SiLU():
    return Lambda(jax.nn.silu, "SiLU")


def Identity():
    return Lambda(lambda x: x, "Identity")


def PixelUnshuffle(r):
    return Lambda(lambda x: pixel_unshuffle(x, r), f"PixelUnshuffle({r})")


def PixelShuffle(r):
    return Lambda(lambda x: pixel_shuffle(x, r), f"PixelShuffle({r})")


def ReplicationPad2d(p):
    return Lambda(lambda x: jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge"), f"ReplicationPad2d({p})")


class Sequential(nnx.Module):
    """``torch.nn.Sequential``: layer i is the attribute ``"i"``, so its path is the official key."""

    def __init__(self, *layers):
        self.length = len(layers)
        for i, layer in enumerate(layers):
            setattr(self, str(i), layer)

    def __getitem__(self, i):
        return getattr(self, str(i % self.length))

    def __len__(self):
        return self.length

    def __call__(self, x):
        for i in range(self.length):
            x = getattr(self, str(i))(x)
        return x
