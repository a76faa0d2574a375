"""Stage A: the VQGAN that maps RGB images to 4-channel latents at 1/4 resolution and back.

NHWC port of the official ``modules/stage_a.py`` with the same parameter names. The
official vector quantiser comes from ``torchtools`` (``VectorQuantize``): nearest codebook
vector by euclidean distance, its table stored as ``vquantizer.codebook.weight``.

Public API (NHWC):

* ``encode(x)`` → ``latent / scale_factor`` (B, H/4, W/4, c_latent), the Stage B target.
* ``encode(x, quantize=True)`` → ``(quantized / scale_factor, latent / scale_factor,
  indices (B, H/4, W/4) int32, vq_loss)``, the order of the official tuple; ``vq_loss`` is the
  official training term (codebook loss + 0.25 · commitment loss).
* ``decode(z)`` → RGB image (B, H, W, 3) from a ``latent / scale_factor`` tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cascade_jax.models.config_forms import INT, NUMBER
from cascade_jax.nn.functional import layer_norm
from cascade_jax.nn.layers import (GELU, BatchNorm2d, Conv2d, ConvTranspose2d, Embedding, Linear, PixelShuffle,
                                   PixelUnshuffle, ReplicationPad2d, Sequential)
from cascade_jax.nn.params import param


class StageAResBlock(nnx.Module):
    """The official Stage A ``ResBlock``: two gated residual branches, depthwise then channelwise.

    ``gammas`` = (scale₁, shift₁, gate₁, scale₂, shift₂, gate₂) modulate each branch; the
    official init zeroes them (the block starts as the identity), we draw them at random.
    """

    def __init__(self, c, c_hidden, *, rngs):
        self.depthwise = Sequential(ReplicationPad2d(1), Conv2d(c, c, 3, groups=c, rngs=rngs))
        self.channelwise = Sequential(Linear(c, c_hidden, rngs=rngs), GELU(), Linear(c_hidden, c, rngs=rngs))
        self.gammas = param(rngs, (6,), torch_layout="same", axes=(None,))

    def __call__(self, x):
        g = self.gammas[...]
        h = layer_norm(x, eps=1e-6) * (1 + g[0]) + g[1]
        x = x + self.depthwise(h) * g[2]
        h = layer_norm(x, eps=1e-6) * (1 + g[3]) + g[4]
        return x + self.channelwise(h) * g[5]


@jax.custom_vjp
def _straight_through(x, quantized):
    """Returns ``quantized`` exactly, with the gradient passed to ``x`` unchanged.

    ``x + stop_gradient(q - x)`` would be off by rounding; torchtools returns the codebook
    rows themselves and copies the gradient to the input, which this reproduces.
    """
    return quantized


def _straight_through_fwd(x, quantized):
    return quantized, None


def _straight_through_bwd(_, g):
    return g, jnp.zeros_like(g)


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


class VectorQuantize(nnx.Module):
    """torchtools ``VectorQuantize(embedding_size, k)`` at inference: nearest codebook row."""

    def __init__(self, embedding_size, k, *, rngs):
        self.codebook = Embedding(k, embedding_size, rngs=rngs)

    def __call__(self, x):
        """``(quantized, (vq_loss, commit_loss), indices)`` for channels-last ``x``."""
        codebook = self.codebook.weight[...]
        flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        # Same expansion as torchtools (|c|² + |x|² − 2 x·c) so near-ties resolve the same way.
        dist = (jnp.sum(codebook ** 2, axis=1)[None, :] + jnp.sum(flat ** 2, axis=1, keepdims=True)
                - 2.0 * jnp.matmul(flat, codebook.T, precision=jax.lax.Precision.HIGHEST))
        indices = jnp.argmin(dist, axis=1)
        nearest = jnp.take(codebook, indices, axis=0)
        vq_loss = jnp.mean(jnp.square(nearest - jax.lax.stop_gradient(flat)))
        commit_loss = jnp.mean(jnp.square(flat - jax.lax.stop_gradient(nearest)))
        quantized = _straight_through(flat, jax.lax.stop_gradient(nearest)).astype(x.dtype)
        return quantized.reshape(x.shape), (vq_loss, commit_loss), indices.reshape(x.shape[:-1]).astype(jnp.int32)


def _down_blocks(c_levels, c_latent, *, rngs):
    blocks = []
    for i, c in enumerate(c_levels):
        if i > 0:
            blocks.append(Conv2d(c_levels[i - 1], c, 4, stride=2, padding=1, rngs=rngs))
        blocks.append(StageAResBlock(c, c * 4, rngs=rngs))
    # 1x1 projection to the latent, then BatchNorm so latents are roughly N(0, 1).
    blocks.append(Sequential(Conv2d(c_levels[-1], c_latent, 1, bias=False, rngs=rngs),
                             BatchNorm2d(c_latent, eps=1e-5, rngs=rngs)))
    return Sequential(*blocks)


def _up_blocks(c_levels, c_latent, bottleneck_blocks, *, rngs):
    levels = len(c_levels)
    blocks = [Sequential(Conv2d(c_latent, c_levels[-1], 1, rngs=rngs))]
    for i in range(levels):
        c = c_levels[levels - 1 - i]
        for _ in range(bottleneck_blocks if i == 0 else 1):
            blocks.append(StageAResBlock(c, c * 4, rngs=rngs))
        if i < levels - 1:
            blocks.append(ConvTranspose2d(c, c_levels[levels - 2 - i], 4, stride=2, padding=1, rngs=rngs))
    return Sequential(*blocks)


class StageA(nnx.Module):
    """The official ``StageA`` (Paella VQGAN); see the module docstring for the API."""

    CONFIG_FORMS = {"levels": INT, "bottleneck_blocks": INT, "c_hidden": INT, "c_latent": INT, "codebook_size": INT,
                    "scale_factor": NUMBER}

    def __init__(self, levels=2, bottleneck_blocks=12, c_hidden=384, c_latent=4, codebook_size=8192,
                 scale_factor=0.43, *, rngs):
        self.c_latent, self.codebook_size, self.scale_factor = c_latent, codebook_size, scale_factor
        c_levels = [c_hidden // (2 ** i) for i in reversed(range(levels))]
        self.in_block = Sequential(PixelUnshuffle(2), Conv2d(3 * 4, c_levels[0], 1, rngs=rngs))
        self.down_blocks = _down_blocks(c_levels, c_latent, rngs=rngs)
        self.vquantizer = VectorQuantize(c_latent, codebook_size, rngs=rngs)
        self.up_blocks = _up_blocks(c_levels, c_latent, bottleneck_blocks, rngs=rngs)
        self.out_block = Sequential(Conv2d(c_levels[0], 3 * 4, 1, rngs=rngs), PixelShuffle(2))

    def encode(self, x, quantize=False):
        latent = self.down_blocks(self.in_block(x))
        if not quantize:
            return latent / self.scale_factor
        quantized, (vq_loss, commit_loss), indices = self.vquantizer(latent)
        return (quantized / self.scale_factor, latent / self.scale_factor, indices,
                vq_loss + 0.25 * commit_loss)

    def decode(self, z):
        return self.out_block(self.up_blocks(z * self.scale_factor))

    def __call__(self, x, quantize=False):
        """Reconstruction ``(image, vq_loss)`` as the official ``forward`` (loss None unquantised)."""
        if not quantize:
            return self.decode(self.encode(x)), None
        quantized, _, _, vq_loss = self.encode(x, quantize=True)
        return self.decode(quantized), vq_loss
