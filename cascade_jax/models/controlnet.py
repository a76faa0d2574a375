"""ControlNet for Stage C (official ``modules/controlnet.py``), NHWC.

A hint image (canny edges, masked image + mask, EfficientNet latents, face-identity map) goes
through a *bottleneck* to an embedding, and one 1×1 projection per entry of ``proj_blocks``
turns that embedding into the residual added before the n-th ResBlock call of Stage C (ResBlocks
counted down the U-Net, then up; see ``CascadeUNet._run_unet``). ``model(hint)`` returns the list
``StageC(..., cnet=...)`` takes: entry n is the residual for ResBlock n, None where it gets none.

Bottlenecks (``bottleneck_mode``), as released:

* ``effnet`` (canny, inpainting): torchvision EfficientNetV2-S features, BatchNorm in inference
  mode (the official code keeps it in eval mode even while training). For ``c_in != 3`` the
  official code swaps the stem conv for ``Conv2d(c_in, 24, 3, stride=2, bias=False)`` — note:
  *without* the original's padding of 1, so the feature map is one pixel smaller on odd sizes;
  reproduced here. :func:`adapt_stem_weight` is its weight surgery for starting from RGB weights.
* ``simple`` (identity): conv3×3 c→4c, LeakyReLU 0.2, conv3×3 4c→c.
* ``large`` (super-resolution): 1×1 c→16384, LeakyReLU, 1×1 →1024, 8 residual blocks, 1×1 →1280.

The last layer of every projection starts at zero (official init), so an untrained ControlNet
adds nothing; every other parameter is random (see ``nn.params``).
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from cascade_jax.models.config_forms import INT, Choice, Seq, optional
from cascade_jax.models.effnet import V2_S_LAST_CHANNELS, efficientnet_features
from cascade_jax.nn.layers import GELU, Conv2d, LayerNorm, LeakyReLU, Sequential
from cascade_jax.nn.params import param

BOTTLENECK_MODES = ("effnet", "simple", "large")
_STEM_CHANNELS = 24  # EfficientNetV2-S stem width
_LARGE_HIDDEN, _LARGE_WIDTH, _LARGE_BLOCKS = 4096 * 4, 1024, 8


class CNetResBlock(nnx.Module):
    """Pre-norm residual block of the ``large`` bottleneck; its LayerNorms are affine, eps 1e-5
    (the official ``LayerNorm2d(c)`` with torch defaults, unlike Stage C's affine-free ones)."""

    def __init__(self, c, *, rngs):
        self.blocks = Sequential(LayerNorm(c, eps=1e-5, rngs=rngs), GELU(), Conv2d(c, c, 3, padding=1, rngs=rngs),
                                 LayerNorm(c, eps=1e-5, rngs=rngs), GELU(), Conv2d(c, c, 3, padding=1, rngs=rngs))

    def __call__(self, x):
        return x + self.blocks(x)


class _ZeroConv1x1(Conv2d):
    """A bias-free 1×1 conv whose weight starts at zero (the official projection output)."""

    def __init__(self, c_in, c_out, *, rngs):
        super().__init__(c_in, c_out, 1, bias=False, rngs=rngs)
        self.weight = param(rngs, (1, 1, c_in, c_out), torch_layout="conv", axes=("kernel_h", "kernel_w", "in", "out"),
                            init="zeros")


def effnet_bottleneck(c_in: int, *, rngs) -> Sequential:
    """EfficientNetV2-S features; for ``c_in != 3`` the stem conv is the official replacement."""
    features = efficientnet_features(rngs=rngs)
    if c_in != 3:
        stem = features[0]
        setattr(stem, "0", Conv2d(c_in, _STEM_CHANNELS, 3, stride=2, padding=0, bias=False, rngs=rngs))
    return features


def simple_bottleneck(c_in: int, *, rngs) -> Sequential:
    return Sequential(Conv2d(c_in, c_in * 4, 3, padding=1, rngs=rngs), LeakyReLU(0.2),
                      Conv2d(c_in * 4, c_in, 3, padding=1, rngs=rngs))


def large_bottleneck(c_in: int, *, rngs) -> Sequential:
    return Sequential(Conv2d(c_in, _LARGE_HIDDEN, 1, rngs=rngs), LeakyReLU(0.2),
                      Conv2d(_LARGE_HIDDEN, _LARGE_WIDTH, 1, rngs=rngs),
                      *[CNetResBlock(_LARGE_WIDTH, rngs=rngs) for _ in range(_LARGE_BLOCKS)],
                      Conv2d(_LARGE_WIDTH, V2_S_LAST_CHANNELS, 1, rngs=rngs))


def adapt_stem_weight(rgb_weight: np.ndarray, c_in: int) -> np.ndarray:
    """The official stem surgery on an HWIO (3, 3, 3, 24) RGB stem weight for a ``c_in``-channel hint:
    the first ``c_in`` input channels for fewer than 3, else the RGB weights then zeros."""
    rgb_weight = np.asarray(rgb_weight)
    if rgb_weight.shape[2] != 3:
        raise ValueError(f"adapt_stem_weight: expected an RGB stem weight (kh, kw, 3, out), got {rgb_weight.shape}")
    if c_in <= 3:
        return rgb_weight[:, :, :c_in].copy()
    out = np.zeros(rgb_weight.shape[:2] + (c_in, rgb_weight.shape[3]), rgb_weight.dtype)
    out[:, :, :3] = rgb_weight
    return out


class ControlNet(nnx.Module):
    """``ControlNet(c_in, c_proj, proj_blocks, bottleneck_mode)(hint)`` → list of residuals.

    ``hint``: (B, H, W, c_in). Residuals are (B, h, w, c_proj) at the bottleneck's resolution
    (H/32 for ``effnet``, H for ``simple``/``large``, whose hints are already latent-sized);
    Stage C resizes each to the block it feeds.
    """

    # proj_blocks: the official default None crashes (len(None)); an empty list crashes in its forward (max([])).
    CONFIG_FORMS = {"c_in": INT, "c_proj": INT, "proj_blocks": Seq(INT, min_length=1),
                    "bottleneck_mode": optional(Choice(*BOTTLENECK_MODES))}

    def __init__(self, c_in=3, c_proj=2048, proj_blocks=None, bottleneck_mode=None, *, rngs):
        bottleneck_mode = "effnet" if bottleneck_mode is None else bottleneck_mode
        if bottleneck_mode not in BOTTLENECK_MODES:
            raise ValueError(f"unknown bottleneck_mode {bottleneck_mode!r}; use one of {BOTTLENECK_MODES}")
        if not proj_blocks or any(int(i) != i or i < 0 for i in proj_blocks):
            raise ValueError(f"proj_blocks must be a non-empty list of ResBlock indices (>= 0), got {proj_blocks!r}")
        self.c_in, self.bottleneck_mode = c_in, bottleneck_mode
        self.proj_blocks = tuple(int(i) for i in proj_blocks)
        if bottleneck_mode == "effnet":
            self.backbone, c_embed = effnet_bottleneck(c_in, rngs=rngs), V2_S_LAST_CHANNELS
        elif bottleneck_mode == "simple":
            self.backbone, c_embed = simple_bottleneck(c_in, rngs=rngs), c_in
        else:
            self.backbone, c_embed = large_bottleneck(c_in, rngs=rngs), V2_S_LAST_CHANNELS
        self.projections = nnx.List([
            Sequential(Conv2d(c_embed, c_embed, 1, bias=False, rngs=rngs), LeakyReLU(0.2),
                       _ZeroConv1x1(c_embed, c_proj, rngs=rngs))
            for _ in self.proj_blocks])

    @property
    def num_residuals(self) -> int:
        return max(self.proj_blocks) + 1

    def __call__(self, hint):
        if hint.ndim != 4 or hint.shape[-1] != self.c_in:
            raise ValueError(f"ControlNet expects an NHWC hint with {self.c_in} channels, got shape {hint.shape}")
        embedding = self.backbone(hint)
        residuals = [None] * self.num_residuals
        for index, projection in zip(self.proj_blocks, self.projections):
            residuals[index] = projection(embedding)
        return residuals
