"""Sampling pipelines: the whole cascade from prompts or images to pixels."""

from cascade_jax.diffusion import SamplerSettings
from cascade_jax.pipelines.cascade import DECODER_DEFAULTS, PRIOR_DEFAULTS, CascadeOutput, StableCascadePipeline
from cascade_jax.pipelines.sizes import check_image_size, latent_shapes, stage_b_latent_hw, stage_c_latent_hw
from cascade_jax.pipelines.stage_runner import StepEvent
