"""The Previewer: a small convolutional decoder from a Stage C latent to a quick RGB preview.

NHWC port of the official ``modules/previewer.py``; 16×24×24 → 3×192×192 (×8 upsampling).
``blocks`` mirrors the official ``nn.Sequential`` index for index (GELU layers included) so
parameter paths are the official keys.
"""

from __future__ import annotations

from flax import nnx

from cascade_jax.models.config_forms import INT
from cascade_jax.nn.layers import GELU, BatchNorm2d, Conv2d, ConvTranspose2d, Sequential


def _gelu_norm(c, *, rngs):
    return [GELU(), BatchNorm2d(c, eps=1e-5, rngs=rngs)]


class Previewer(nnx.Module):
    """``Previewer(z)``: (B, h, w, c_in) latent → (B, 8h, 8w, c_out) image, BatchNorm in inference mode."""

    CONFIG_FORMS = {"c_in": INT, "c_hidden": INT, "c_out": INT}

    def __init__(self, c_in=16, c_hidden=512, c_out=3, *, rngs):
        c2, c4 = c_hidden // 2, c_hidden // 4
        self.blocks = Sequential(
            Conv2d(c_in, c_hidden, 1, rngs=rngs), *_gelu_norm(c_hidden, rngs=rngs),
            Conv2d(c_hidden, c_hidden, 3, padding=1, rngs=rngs), *_gelu_norm(c_hidden, rngs=rngs),
            ConvTranspose2d(c_hidden, c2, 2, stride=2, rngs=rngs), *_gelu_norm(c2, rngs=rngs),
            Conv2d(c2, c2, 3, padding=1, rngs=rngs), *_gelu_norm(c2, rngs=rngs),
            ConvTranspose2d(c2, c4, 2, stride=2, rngs=rngs), *_gelu_norm(c4, rngs=rngs),
            Conv2d(c4, c4, 3, padding=1, rngs=rngs), *_gelu_norm(c4, rngs=rngs),
            ConvTranspose2d(c4, c4, 2, stride=2, rngs=rngs), *_gelu_norm(c4, rngs=rngs),
            Conv2d(c4, c4, 3, padding=1, rngs=rngs), *_gelu_norm(c4, rngs=rngs),
            Conv2d(c4, c_out, 1, rngs=rngs),
        )

    def __call__(self, z):
        return self.blocks(z)
