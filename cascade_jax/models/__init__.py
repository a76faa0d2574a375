"""The Stable Cascade networks (Flax NNX, NHWC), constructed with the official argument names."""

from cascade_jax.models.clip import CLIPTextEncoder, CLIPVisionEncoder
from cascade_jax.models.effnet import EfficientNetEncoder
from cascade_jax.models.previewer import Previewer
from cascade_jax.models.stage_a import StageA
from cascade_jax.models.stage_b import StageB
from cascade_jax.models.stage_c import StageC

__all__ = ["StageA", "StageB", "StageC", "Previewer", "EfficientNetEncoder", "CLIPTextEncoder", "CLIPVisionEncoder",
           "CLIPTokenizer"]


def __getattr__(name):
    # The tokenizer is data code (cascade_jax.data); it stays reachable here for existing imports
    # without models/ importing the data layer when it loads.
    if name == "CLIPTokenizer":
        from cascade_jax.data.clip_tokenizer import CLIPTokenizer
        return CLIPTokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
