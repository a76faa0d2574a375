"""The whole cascade: prompt (or image) -> Stage C -> Stage B -> Stage A -> pixels.

Defaults are the official ones (Stage C 20 steps, cfg 4, shift 2; Stage B 10 steps, cfg
1.1, shift 1; DDPM; CFG rescale 0.7; the unconditional branch is the encoding of "" with
zero image embeddings and zero EfficientNet latents). Each stage's sampling loop is one
compiled program (see ``stage_runner``); the batch is sharded over the local devices.

One deliberate difference from the official sampler: the CFG rescale uses each image's own
standard deviation (``cfg_std_per_sample=True``) rather than the whole batch's, so an image
does not depend on what else is in its batch. At batch size 1 the two are identical; pass
``StageSettings(cfg_std_per_sample=False)`` for the official batch-wide statistic.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.conditioning import TextConditioner
from cascade_jax.diffusion import GDF, SamplerSettings
from cascade_jax.pipelines import images as image_ops
from cascade_jax.pipelines.sizes import latent_shapes
from cascade_jax.pipelines.stage_runner import StageRunner, StageTiming


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """What a user sets per stage; ``steps``/``cfg``/``shift`` default to the official values."""

    steps: int
    cfg: Any
    shift: float
    sampler: str = "ddpm"
    eta: float | None = None
    cfg_rho: float = 0.7
    cfg_std_per_sample: bool = True
    t_start: float = 1.0

    def sampler_settings(self) -> SamplerSettings:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        cfg = None if self.cfg is None else self.cfg
        return SamplerSettings(steps=self.steps, cfg=cfg, cfg_rho=self.cfg_rho,
                               cfg_std_per_sample=self.cfg_std_per_sample, shift=self.shift, sampler=self.sampler,
                               eta=self.eta, t_start=self.t_start)


PRIOR_DEFAULTS = StageSettings(steps=20, cfg=4.0, shift=2.0)
DECODER_DEFAULTS = StageSettings(steps=10, cfg=1.1, shift=1.0)


@dataclasses.dataclass
class CascadeOutput:
    images: np.ndarray  # (B, H, W, 3) uint8
    stage_c_latents: np.ndarray  # (B, h, w, 16) float32
    stage_b_latents: np.ndarray | None  # (B, H/4, W/4, 4) float32
    timings: dict  # stage name -> StageTiming
    seeds: list


def _apply(graphdef, state, method: str | None, *args):
    module = nnx.merge(graphdef, state)
    return (module if method is None else getattr(module, method))(*args)


_apply_jit = jax.jit(_apply, static_argnums=(0, 2))


def jitted_call(module: nnx.Module, *args, method: str | None = None):
    """``module(*args)`` (or ``module.method(*args)``) as one compiled program per input shapes.

    The image encoders, Stage A and the previewer would otherwise run op by op; compiling them is
    faster even for a single call (EfficientNet on a CPU: ~5 s to compile, ~15 s for a first eager
    call). The module is split at each call, so changed weights or attributes are picked up.
    """
    graphdef, state = nnx.split(module)
    return _apply_jit(graphdef, state, method, *args)


def _prompt_list(prompt) -> list[str]:
    if not isinstance(prompt, (str, list, tuple)):
        raise ValueError(f"prompts must be strings: pass a string or a list of strings, got {type(prompt).__name__}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("no prompt given: pass a string or a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
    return prompts


def _batch(groups: int, num_images_per_prompt) -> int:
    if not isinstance(num_images_per_prompt, int) or isinstance(num_images_per_prompt, bool) \
            or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
    return groups * num_images_per_prompt


def _seeds(seed: int | Sequence[int], count: int) -> list[int]:
    """One seed per image: consecutive seeds from an int, or an explicit list."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != count:
            raise ValueError(f"{len(seed)} seeds for {count} images")
        return [int(s) for s in seed]
    return [int(seed) + i for i in range(count)]


class StableCascadePipeline:
    """Text-to-image, image variation, image-to-image, reconstruction and previews.

    Build it from models (``StableCascadePipeline(stage_c=..., ...)``), from a weights folder or
    repository (``from_pretrained``, see ``loading``), or with random weights (``random``).
    """

    def __init__(self, *, stage_c, stage_b, stage_a, text_encoder, tokenizer, image_encoder=None, effnet=None,
                 previewer=None, gdf: GDF = GDF()):
        self.stage_a, self.effnet, self.previewer, self.image_encoder = stage_a, effnet, previewer, image_encoder
        self.text = TextConditioner(text_encoder, tokenizer)
        self.prior = StageRunner("Stage C", stage_c)
        self.decoder = StageRunner("Stage B", stage_b)
        self.gdf = gdf
        self.c_clip_img = stage_c.clip_img_mapper.weight.shape[0]
        self.c_latent_c = stage_c.clf[1].weight.shape[-1]  # Stage C's patch size is 1
        self.c_latent_b = stage_a.c_latent

    @classmethod
    def from_pretrained(cls, source, *, lite: bool = False, dtype: str = "bfloat16",
                        configs=None) -> "StableCascadePipeline":
        """From a folder (converted directories, official safetensors or diffusers folders) or a
        Hugging Face repository id; unconverted weights are converted once and cached. ``configs``
        names the pipeline set (configs/pipelines/) giving the architecture of official single files
        (default ``full``, or ``lite`` with ``lite=True``; ``tiny`` for the tiny test weights)."""
        from cascade_jax.pipelines.loading import load_components
        return cls(**load_components(source, lite=lite, dtype=dtype, configs=configs))

    @classmethod
    def random(cls, set_name: str = "tiny", *, seed: int = 0, dtype: str = "float32",
               tokenizer_dir=None) -> "StableCascadePipeline":
        """Random weights with the structure of ``configs/pipelines/<set_name>.yaml`` (tiny, lite, full)."""
        from cascade_jax.pipelines.loading import random_components
        return cls(**random_components(set_name, seed=seed, dtype=dtype, tokenizer_dir=tokenizer_dir))

    # ---- building blocks -------------------------------------------------------------------
    def _text(self, prompts, negative_prompt, repeat: int):
        cond, uncond = self.text.with_unconditional(prompts, negative_prompt)
        rep = lambda a: jnp.repeat(a, repeat, axis=0)
        return jax.tree.map(rep, cond), jax.tree.map(rep, uncond)

    def _sample_prior(self, cond_text, uncond_text, clip_img, shape, seeds, settings: StageSettings, timings,
                      x_init=None):
        zeros_img = jnp.zeros((shape[0], 1, self.c_clip_img), jnp.float32)
        clip_img = zeros_img if clip_img is None else clip_img
        cond = {**cond_text.stage_c(), "clip_img": clip_img}
        uncond = {**uncond_text.stage_c(), "clip_img": zeros_img}
        timings["stage_c"] = StageTiming()
        return self.prior(settings.sampler_settings(), tuple(shape[1:]), seeds, cond, uncond, x_init,
                          timings["stage_c"])

    def _sample_decoder(self, effnet_latents, cond_text, uncond_text, shape, seeds, settings, timings):
        cond = {"effnet": effnet_latents, **cond_text.stage_b()}
        uncond = {"effnet": jnp.zeros_like(effnet_latents), **uncond_text.stage_b()}
        timings["stage_b"] = StageTiming()
        # Stage B's noise must differ from Stage C's for the same seed.
        return self.decoder(settings.sampler_settings(), tuple(shape[1:]), [s + (1 << 30) for s in seeds],
                            cond, uncond, None, timings["stage_b"])

    def decode(self, stage_b_latents) -> np.ndarray:
        return image_ops.to_uint8(jitted_call(self.stage_a, jnp.asarray(stage_b_latents), method="decode"))

    def preview(self, stage_c_latents) -> np.ndarray:
        """Quick RGB previews (8x the Stage C latent size) of Stage C latents."""
        if self.previewer is None:
            raise ValueError("this pipeline has no previewer; load one (previewer.safetensors)")
        return image_ops.to_uint8(jitted_call(self.previewer, jnp.asarray(stage_c_latents)))

    def _finish(self, c_latents, cond, uncond, b_shape, seeds, decoder, timings, decode: bool) -> CascadeOutput:
        b_latents = self._sample_decoder(c_latents, cond, uncond, b_shape, seeds, decoder, timings)
        images = self.decode(b_latents) if decode else None
        return CascadeOutput(images, np.asarray(c_latents), np.asarray(b_latents), timings, seeds)

    # ---- modes -----------------------------------------------------------------------------
    def text_to_image(self, prompt, negative_prompt=None, *, height=1024, width=1024, num_images_per_prompt=1,
                      seed=0, prior: StageSettings = PRIOR_DEFAULTS, decoder: StageSettings = DECODER_DEFAULTS,
                      prior_x_init=None, decode=True) -> CascadeOutput:
        prompts = _prompt_list(prompt)
        batch = _batch(len(prompts), num_images_per_prompt)
        c_shape, b_shape = latent_shapes(height, width, batch, self.c_latent_c, self.c_latent_b)
        seeds = _seeds(seed, batch)
        cond, uncond = self._text(prompts, negative_prompt, num_images_per_prompt)
        timings = {}
        c_latents = self._sample_prior(cond, uncond, None, c_shape, seeds, prior, timings, prior_x_init)
        return self._finish(c_latents, cond, uncond, b_shape, seeds, decoder, timings, decode)

    def image_variation(self, images, *, prompt="", height=1024, width=1024, num_images_per_prompt=1, seed=0,
                        prior: StageSettings = PRIOR_DEFAULTS, decoder: StageSettings = DECODER_DEFAULTS):
        """New images like ``images``: Stage C conditioned on their CLIP-L image embeddings."""
        if self.image_encoder is None:
            raise ValueError("image variation needs the CLIP-L image encoder (image_encoder/)")
        arrays = image_ops.as_uint8_batch(images)
        batch = _batch(len(arrays), num_images_per_prompt)
        c_shape, b_shape = latent_shapes(height, width, batch, self.c_latent_c, self.c_latent_b)  # check first
        pixels = image_ops.clip_pixels(arrays)
        embeds = jitted_call(self.image_encoder, jnp.asarray(pixels)).image_embeds[:, None, :]
        seeds = _seeds(seed, batch)
        cond, uncond = self._text([prompt] * pixels.shape[0], None, num_images_per_prompt)
        timings = {}
        c_latents = self._sample_prior(cond, uncond, jnp.repeat(embeds, num_images_per_prompt, axis=0), c_shape,
                                       seeds, prior, timings)
        return self._finish(c_latents, cond, uncond, b_shape, seeds, decoder, timings, True)

    def encode_effnet(self, images, height: int, width: int):
        """EfficientNet latents sized like Stage C latents of a (height, width) image."""
        if self.effnet is None:
            raise ValueError("this mode needs the EfficientNet encoder (effnet_encoder.safetensors)")
        (_, hc, wc, _), _ = latent_shapes(height, width, 1, self.c_latent_c, self.c_latent_b)
        pixels = image_ops.effnet_pixels(images, (hc * 32, wc * 32))
        return jitted_call(self.effnet, jnp.asarray(pixels)).astype(jnp.float32)

    def image_to_image(self, images, prompt, negative_prompt=None, *, strength=0.8, height=None, width=None,
                       seed=0, prior: StageSettings = PRIOR_DEFAULTS, decoder: StageSettings = DECODER_DEFAULTS):
        """Stage C starts from the images' EfficientNet latents noised to t = ``strength`` and runs
        ``round(steps * strength)`` steps of the same schedule."""
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        arrays = image_ops.as_uint8_batch(images)
        height = height or image_ops.round_size(arrays.shape[1])
        width = width or image_ops.round_size(arrays.shape[2])
        prompts = _prompt_list(prompt)
        if len(prompts) not in (1, len(arrays)):
            raise ValueError(f"{len(prompts)} prompts for {len(arrays)} images")
        prompts = prompts * len(arrays) if len(prompts) == 1 else prompts
        batch = len(arrays)
        c_shape, b_shape = latent_shapes(height, width, batch, self.c_latent_c, self.c_latent_b)
        seeds = _seeds(seed, batch)
        effnet_latents = self.encode_effnet(arrays, height, width)
        with jax.threefry_partitionable(False):  # as the stage runner draws its noise (fast to compile)
            eps = jax.vmap(lambda s: jax.random.normal(jax.random.key(s + (1 << 29)), c_shape[1:]))(jnp.asarray(seeds))
        x_init = self.gdf.diffuse(effnet_latents, epsilon=eps, t=jnp.full((batch,), strength), shift=prior.shift).noised
        steps = max(1, round(prior.steps * strength))
        settings = dataclasses.replace(prior, steps=steps, t_start=strength)
        cond, uncond = self._text(prompts, negative_prompt, 1)
        timings = {}
        c_latents = self._sample_prior(cond, uncond, None, c_shape, seeds, settings, timings, x_init)
        return self._finish(c_latents, cond, uncond, b_shape, seeds, decoder, timings, True)

    def reconstruct(self, images, *, prompt="", seed=0, decoder: StageSettings = DECODER_DEFAULTS):
        """Image -> EfficientNet latents (the 42.67x code) -> Stage B -> Stage A: the codec round trip."""
        arrays = image_ops.as_uint8_batch(images)
        height, width = image_ops.round_size(arrays.shape[1]), image_ops.round_size(arrays.shape[2])
        batch = len(arrays)
        _, b_shape = latent_shapes(height, width, batch, self.c_latent_c, self.c_latent_b)
        seeds = _seeds(seed, batch)
        effnet_latents = self.encode_effnet(arrays, height, width)
        cond, uncond = self._text([prompt] * batch, None, 1)
        return self._finish(effnet_latents, cond, uncond, b_shape, seeds, decoder, {}, True)
