"""Small layers shared by every model, PyTorch-equivalent in NHWC."""

from cascade_jax.nn.attention import MultiheadAttention
from cascade_jax.nn.blocks import AttnBlock, FeedForwardBlock, ResBlock, TimestepBlock, r_embedding
from cascade_jax.nn.functional import (gelu, layer_norm, pixel_shuffle, pixel_unshuffle,
                                       resize_bilinear_align_corners)
from cascade_jax.nn.layers import (GELU, BatchNorm2d, Conv2d, ConvTranspose2d, Embedding, GlobalResponseNorm, Identity,
                                   LayerNorm,
                                   LayerNorm2d, LeakyReLU, Linear, PixelShuffle, PixelUnshuffle,
                                   ReplicationPad2d, Sequential, SiLU)
