"""EfficientNetEncoder: the image encoder whose 16-channel features condition Stage B.

The official ``modules/effnet.py`` wraps ``torchvision.models.efficientnet_v2_s().features``
as ``backbone`` and adds a ``mapper`` (1×1 conv, then BatchNorm without affine so the
features are roughly N(0, 1)). This is an NHWC port of that network in inference mode:
the module tree reproduces torchvision's names (``backbone.N.M.block.K.L...``) so the
official checkpoint loads key for key. Stochastic depth and dropout are training-only and
absent; input is an ImageNet-normalised image, output is (B, ceil(H/32), ceil(W/32), c_latent).

``stages`` (rows ``[fused, expand_ratio, kernel, stride, c_in, c_out, num_layers]``) and
``last_channels`` give smaller encoders of the same family, e.g. for a frozen random encoder
whose BatchNorm statistics are measured on data (as the embedded demo does); the default is
V2-S, the official network. The stem halves the resolution and so does every stride-2 stage.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cascade_jax.models.config_forms import FLAG, INT, Either, Seq, optional
from cascade_jax.nn.layers import BatchNorm2d, Conv2d, Sequential, SiLU

# torchvision builds EfficientNet's BatchNorm with eps 1e-3 (the TF default), not 1e-5.
_BN_EPS = 1e-3


class _StageConfig(NamedTuple):
    fused: bool
    expand_ratio: int
    kernel: int
    stride: int
    c_in: int
    c_out: int
    num_layers: int


# EfficientNetV2-S, Table 4 of the EfficientNetV2 paper (torchvision ``efficientnet_v2_s``).
V2_S_STAGES = (
    _StageConfig(True, 1, 3, 1, 24, 24, 2),
    _StageConfig(True, 4, 3, 2, 24, 48, 4),
    _StageConfig(True, 4, 3, 2, 48, 64, 4),
    _StageConfig(False, 4, 3, 2, 64, 128, 6),
    _StageConfig(False, 6, 3, 1, 128, 160, 9),
    _StageConfig(False, 6, 3, 2, 160, 256, 15),
)
V2_S_LAST_CHANNELS = 1280
STAGE_FIELDS = _StageConfig._fields


def stage_configs(stages) -> tuple[_StageConfig, ...]:
    """``stages`` rows as stage configs, each checked (a wrong row names its index and field)."""
    if stages is None:
        return V2_S_STAGES
    if not isinstance(stages, (list, tuple)) or not stages:
        raise ValueError(f"effnet stages must be a non-empty list of rows {list(STAGE_FIELDS)}, got {stages!r}")
    rows = []
    for i, row in enumerate(stages):
        if not isinstance(row, (list, tuple)) or len(row) != len(STAGE_FIELDS):
            raise ValueError(f"effnet stages[{i}] = {row!r}: expected {len(STAGE_FIELDS)} entries "
                             f"{list(STAGE_FIELDS)}")
        fused, *numbers = row
        if not isinstance(fused, (bool, int)) or fused not in (0, 1):
            raise ValueError(f"effnet stages[{i}]: fused must be true or false, got {fused!r}")
        for name, value in zip(STAGE_FIELDS[1:], numbers):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"effnet stages[{i}]: {name} must be a positive integer, got {value!r}")
        cfg = _StageConfig(bool(fused), *numbers)
        if cfg.stride not in (1, 2):
            raise ValueError(f"effnet stages[{i}]: stride must be 1 or 2, got {cfg.stride}")
        if rows and cfg.c_in != rows[-1].c_out:
            raise ValueError(f"effnet stages[{i}]: c_in {cfg.c_in} must equal the c_out {rows[-1].c_out} of "
                             f"stages[{i - 1}]")
        rows.append(cfg)
    return tuple(rows)


def conv_norm_act(c_in, c_out, kernel, stride=1, groups=1, activation=True, *, rngs):
    """torchvision ``Conv2dNormActivation``: conv (no bias, 'same' padding) → BatchNorm → SiLU."""
    layers = [Conv2d(c_in, c_out, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups, bias=False,
                     rngs=rngs),
              BatchNorm2d(c_out, eps=_BN_EPS, rngs=rngs)]
    if activation:
        layers.append(SiLU())
    return Sequential(*layers)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding (to a multiple of 8, never below 90% of ``v``)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class SqueezeExcitation(nnx.Module):
    """torchvision ``SqueezeExcitation`` with SiLU: channel gates from globally pooled features."""

    def __init__(self, c, c_squeeze, *, rngs):
        self.fc1 = Conv2d(c, c_squeeze, 1, rngs=rngs)
        self.fc2 = Conv2d(c_squeeze, c, 1, rngs=rngs)

    def __call__(self, x):
        scale = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        scale = self.fc2(jax.nn.silu(self.fc1(scale)))
        return x * jax.nn.sigmoid(scale)


class MBConv(nnx.Module):
    """Inverted residual block: [1×1 expand] → depthwise → squeeze-excitation → 1×1 project."""

    def __init__(self, cfg: _StageConfig, c_in, stride, *, rngs):
        self.use_residual = stride == 1 and c_in == cfg.c_out
        c_mid = _make_divisible(c_in * cfg.expand_ratio)
        layers = []
        if c_mid != c_in:
            layers.append(conv_norm_act(c_in, c_mid, 1, rngs=rngs))
        layers += [conv_norm_act(c_mid, c_mid, cfg.kernel, stride, groups=c_mid, rngs=rngs),
                   SqueezeExcitation(c_mid, max(1, c_in // 4), rngs=rngs),
                   conv_norm_act(c_mid, cfg.c_out, 1, activation=False, rngs=rngs)]
        self.block = Sequential(*layers)

    def __call__(self, x):
        y = self.block(x)
        return y + x if self.use_residual else y


class FusedMBConv(nnx.Module):
    """EfficientNetV2's fused block: one full k×k conv expands (or maps, at ratio 1), 1×1 projects."""

    def __init__(self, cfg: _StageConfig, c_in, stride, *, rngs):
        self.use_residual = stride == 1 and c_in == cfg.c_out
        c_mid = _make_divisible(c_in * cfg.expand_ratio)
        if c_mid != c_in:
            layers = [conv_norm_act(c_in, c_mid, cfg.kernel, stride, rngs=rngs),
                      conv_norm_act(c_mid, cfg.c_out, 1, activation=False, rngs=rngs)]
        else:
            layers = [conv_norm_act(c_in, cfg.c_out, cfg.kernel, stride, rngs=rngs)]
        self.block = Sequential(*layers)

    def __call__(self, x):
        y = self.block(x)
        return y + x if self.use_residual else y


def _stage(cfg: _StageConfig, *, rngs):
    block = FusedMBConv if cfg.fused else MBConv
    # Only the first block of a stage changes width and resolution.
    return Sequential(*[block(cfg, cfg.c_in if i == 0 else cfg.c_out, cfg.stride if i == 0 else 1, rngs=rngs)
                        for i in range(cfg.num_layers)])


def efficientnet_features(stages=V2_S_STAGES, last_channels=V2_S_LAST_CHANNELS, *, rngs):
    """torchvision ``EfficientNet.features``: stem, one ``Sequential`` per stage, 1×1 head."""
    stem = conv_norm_act(3, stages[0].c_in, 3, stride=2, rngs=rngs)
    head = conv_norm_act(stages[-1].c_out, last_channels, 1, rngs=rngs)
    return Sequential(stem, *[_stage(cfg, rngs=rngs) for cfg in stages], head)


class EfficientNetEncoder(nnx.Module):
    """``EfficientNetEncoder(x)``: (B, H, W, 3) normalised image → (B, ⌈H/32⌉, ⌈W/32⌉, c_latent) for V2-S."""

    # The official constructor takes c_latent only; stages / last_channels are this port's (see stage_configs).
    CONFIG_FORMS = {"c_latent": INT, "last_channels": INT,
                    "stages": optional(Seq(Seq(Either(FLAG, INT), length=len(STAGE_FIELDS)), min_length=1))}

    def __init__(self, c_latent=16, stages=None, last_channels=V2_S_LAST_CHANNELS, *, rngs):
        self.backbone = efficientnet_features(stage_configs(stages), last_channels, rngs=rngs)
        self.mapper = Sequential(Conv2d(last_channels, c_latent, 1, bias=False, rngs=rngs),
                                 BatchNorm2d(c_latent, eps=1e-5, affine=False, rngs=rngs))

    def __call__(self, x):
        return self.mapper(self.backbone(x))

