"""The Stable Cascade networks (Flax NNX, NHWC), constructed with the official argument names."""

from cascade_jax.models.clip import CLIPTextEncoder, CLIPVisionEncoder
from cascade_jax.models.effnet import EfficientNetEncoder
from cascade_jax.models.previewer import Previewer
from cascade_jax.models.stage_a import StageA
from cascade_jax.models.stage_b import StageB
from cascade_jax.models.stage_c import StageC

__all__ = ["StageA", "StageB", "StageC", "Previewer", "EfficientNetEncoder", "CLIPTextEncoder", "CLIPVisionEncoder"]

