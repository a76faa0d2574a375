"""Diffusion framework (official GDF) as pure float32 JAX functions, and the sampling loop.

``GDF`` holds which schedule / target / noise conditioning / loss weight a model uses and
gives ``diffuse`` (training) and ``undiffuse``; ``sample`` runs a stage's jitted sampling
loop with classifier-free guidance; the step functions and pieces are importable on their own.
"""

from cascade_jax.diffusion.gdf import GDF, Diffused
from cascade_jax.diffusion.guidance import apply_cfg, cfg_active, cfg_scales, concat_conditions
from cascade_jax.diffusion.loss_weights import (
    AdaptiveLossWeightState,
    adaptive_bucket_index,
    adaptive_loss_weight,
    adaptive_loss_weight_init,
    adaptive_loss_weight_update,
    p2_loss_weight,
)
from cascade_jax.diffusion.noise_conditions import cosine_t_noise_cond
from cascade_jax.diffusion.sample_loop import SampleOutput, StepHook, sample, sample_steps, sample_with_settings
from cascade_jax.diffusion.settings import (
    STAGE_B_DEFAULTS,
    STAGE_C_DEFAULTS,
    SamplerSettings,
    SamplingPlan,
    sampling_plan,
)
from cascade_jax.diffusion.samplers import ddim_step, ddpm_step, get_sampler, lcm_step
from cascade_jax.diffusion.scalers import vp_scalers
from cascade_jax.diffusion.schedule import cosine_logsnr, cosine_logsnr_limits, sample_train_t, torch_linspace
from cascade_jax.diffusion.targets import EPSILON, TARGETS, V, X0, Target, get_target

__all__ = [
    "GDF", "Diffused", "apply_cfg", "cfg_active", "cfg_scales", "concat_conditions",
    "AdaptiveLossWeightState", "adaptive_bucket_index", "adaptive_loss_weight", "adaptive_loss_weight_init",
    "adaptive_loss_weight_update", "p2_loss_weight", "cosine_t_noise_cond", "STAGE_B_DEFAULTS",
    "STAGE_C_DEFAULTS", "SampleOutput", "SamplerSettings", "SamplingPlan", "StepHook", "sample", "sample_steps",
    "sample_with_settings", "sampling_plan", "ddim_step", "ddpm_step", "get_sampler", "lcm_step", "vp_scalers", "cosine_logsnr",
    "cosine_logsnr_limits", "sample_train_t", "torch_linspace", "EPSILON", "TARGETS", "V", "X0", "Target",
    "get_target",
]
