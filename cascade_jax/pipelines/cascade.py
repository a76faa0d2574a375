"""The whole cascade: prompt (or image) -> Stage C -> Stage B -> Stage A -> pixels.

Defaults are the official ones (``PRIOR_DEFAULTS`` / ``DECODER_DEFAULTS``, from
``cascade_jax.diffusion.STAGE_C_DEFAULTS`` / ``STAGE_B_DEFAULTS``: Stage C 20 steps, cfg 4,
shift 2; Stage B 10 steps, cfg 1.1, shift 1; DDPM; CFG rescale 0.7; the unconditional branch
is the encoding of "" with zero image embeddings and zero EfficientNet latents). A stage's
settings are one ``SamplerSettings``, passed as it is to the stage's sampling loop; change a
field with ``PRIOR_DEFAULTS.replace(steps=30)``. A pipeline's own defaults (``prior_defaults`` /
``decoder_defaults``: what a call without ``prior=`` / ``decoder=`` uses) are these, or what its
weights folder's ``sampling.json`` recommends (see ``defaults``; the demo cascade has one). Each
stage's sampling loop is one compiled program (see ``stage_runner``); the batch is sharded over the
local devices.

Model-parallel sampling: ``mesh=`` (a ``Mesh`` or ``"fsdp=4,tensor=2"`` / ``{"data": 2, "fsdp": 4}``) and
``rules=`` (logical axis -> mesh axis, as a training config's ``mesh`` and ``sharding_rules``) place every
network's variables by their logical axes as the trainer does, and split the batch over data and fsdp.
``from_pretrained`` restores the weights straight into that layout (no replicated copy on one device).

One deliberate difference from the official sampler: the CFG rescale uses each image's own
standard deviation (``cfg_std_per_sample=True``) rather than the whole batch's, so an image
does not depend on what else is in its batch. At batch size 1 the two are identical; pass
``PRIOR_DEFAULTS.replace(cfg_std_per_sample=False)`` for the official batch-wide statistic.

Noise: image i with seed s draws Stage C's noise from ``key(s)``, Stage B's from
``fold_in(key(s), 1)`` and img2img's image noise from ``fold_in(key(s), 2)``; every seed in
[0, 2**32) works for every stage. ``prior_x_init`` / ``decoder_x_init`` replace a stage's
initial noise (diffusers' ``latents=`` of its prior / decoder pipeline), e.g. to reproduce
another implementation's run.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.conditioning import TextConditioner
from cascade_jax.diffusion import GDF, SamplerSettings
from cascade_jax.pipelines import arguments as checks
from cascade_jax.pipelines import images as image_ops
from cascade_jax.pipelines.defaults import DECODER_DEFAULTS, PRIOR_DEFAULTS
from cascade_jax.pipelines.programs import MAX_PROGRAMS, ProgramCache, fresh_jit
from cascade_jax.pipelines.sizes import latent_shapes
from cascade_jax.pipelines.stage_runner import StageRunner, StageTiming, StepEvent, image_keys
from cascade_jax.sharding import make_mesh, place_model

STAGE_B_STREAM, IMG2IMG_STREAM = 1, 2  # noise streams of a seed besides Stage C's (image_keys)


@dataclasses.dataclass
class CascadeOutput:
    images: np.ndarray  # (B, H, W, 3) uint8
    stage_c_latents: np.ndarray  # (B, h, w, 16) float32
    stage_b_latents: np.ndarray | None  # (B, H/4, W/4, 4) float32
    timings: dict  # stage name -> StageTiming
    seeds: list


@dataclasses.dataclass
class _Call:
    """Per-call state shared by the stages of one pipeline call."""

    seeds: list
    callback: Callable[[StepEvent], None] | None = None
    callback_x0: bool = False
    long_prompts: bool = False
    timings: dict = dataclasses.field(default_factory=dict)


def _apply(graphdef, state, method: str | None, *args):
    module = nnx.merge(graphdef, state)
    return (module if method is None else getattr(module, method))(*args)


_APPLY_PROGRAMS = ProgramCache(4 * MAX_PROGRAMS)  # encoders, Stage A, previewer, ControlNets: a few per size


def _avals(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(a), jnp.result_type(a), getattr(a, "sharding", None)) for a in leaves)


def jitted_call(module: nnx.Module, *args, method: str | None = None):
    """``module(*args)`` (or ``module.method(*args)``) as one compiled program per input shapes.

    The image encoders, Stage A and the previewer would otherwise run op by op; compiling them is
    faster even for a single call (EfficientNet on a CPU: ~5 s to compile, ~15 s for a first eager
    call). The module is split at each call, so changed weights or attributes are picked up. The
    programs live in one bounded cache (``programs``): a process that meets many sizes keeps a few.
    """
    graphdef, state = nnx.split(module)
    signature = (graphdef, method, _avals(state), _avals(args))
    compiled = _APPLY_PROGRAMS.get(signature)
    if compiled is None:
        compiled = fresh_jit(_apply, static_argnums=(0, 2)).lower(graphdef, state, method, *args).compile()
        _APPLY_PROGRAMS.put(signature, compiled)
    return compiled(state, *args)


class StableCascadePipeline:
    """Text-to-image, image variation, image-to-image, reconstruction and previews.

    Build it from models (``StableCascadePipeline(stage_c=..., ...)``), from a weights folder or
    repository (``from_pretrained``, see ``loading``), or with random weights (``random``).
    """

    def __init__(self, *, stage_c, stage_b, stage_a, text_encoder, tokenizer, image_encoder=None, effnet=None,
                 previewer=None, gdf: GDF = GDF(), mesh=None, rules: dict | None = None,
                 prior_defaults: SamplerSettings = PRIOR_DEFAULTS,
                 decoder_defaults: SamplerSettings = DECODER_DEFAULTS):
        checks.check_settings("prior_defaults", prior_defaults)
        checks.check_settings("decoder_defaults", decoder_defaults)
        self.prior_defaults, self.decoder_defaults = prior_defaults, decoder_defaults
        self.mesh, self.rules = (None if mesh is None else make_mesh(mesh)), rules
        if self.mesh is not None:  # the encoders, Stage A and the previewer by the same rules as the stages
            for module in (stage_a, text_encoder, image_encoder, effnet, previewer):
                if module is not None:
                    place_model(module, self.mesh, rules)
        self.stage_a, self.effnet, self.previewer, self.image_encoder = stage_a, effnet, previewer, image_encoder
        self.text = TextConditioner(text_encoder, tokenizer)
        self.prior = StageRunner("Stage C", stage_c, self.mesh, rules)
        self.decoder = StageRunner("Stage B", stage_b, self.mesh, rules)
        self.gdf = gdf
        self.c_clip_img = stage_c.clip_img_mapper.weight.shape[0]
        self.c_latent_c = stage_c.clf[1].weight.shape[-1]  # Stage C's patch size is 1
        self.c_latent_b = stage_a.c_latent

    @classmethod
    def from_pretrained(cls, source, *, lite: bool = False, dtype: str = "bfloat16", configs=None, mesh=None,
                        rules: dict | None = None) -> "StableCascadePipeline":
        """From a folder (converted directories, official safetensors or diffusers folders) or a
        Hugging Face repository id; unconverted weights are converted once and cached. ``configs``
        names the pipeline set (configs/pipelines/) giving the architecture of official single files
        (default ``full``, or ``lite`` with ``lite=True``; ``tiny`` for the tiny test weights).
        ``mesh``/``rules``: see the module docstring; the weights are restored directly into that layout.
        The folder's sampling.json, if any, sets the pipeline's default sampler settings."""
        from cascade_jax.pipelines.loading import load_components
        mesh = None if mesh is None else make_mesh(mesh)
        components = load_components(source, lite=lite, dtype=dtype, configs=configs, mesh=mesh, rules=rules)
        return cls(**components, mesh=mesh, rules=rules)

    @classmethod
    def random(cls, set_name: str = "tiny", *, seed: int = 0, dtype: str = "float32", tokenizer_dir=None,
               mesh=None, rules: dict | None = None) -> "StableCascadePipeline":
        """Random weights with the structure of ``configs/pipelines/<set_name>.yaml`` (tiny, lite, full);
        ``mesh``/``rules``: see the module docstring."""
        from cascade_jax.pipelines.loading import random_components
        return cls(**random_components(set_name, seed=seed, dtype=dtype, tokenizer_dir=tokenizer_dir),
                   mesh=mesh, rules=rules)

    def load_loras(self, loras) -> "StableCascadePipeline":
        """Sample with these Stage C LoRAs (``"FILE[:STRENGTH]"`` strings or (path, strength) pairs),
        merged for full speed; their new tokens work in prompts. ``[]`` restores the base weights.
        ``self.loras`` then lists what each applied (``AppliedLoRA``: weights, token rows, new tokens)."""
        from cascade_jax.pipelines.lora import apply_loras
        apply_loras(self, loras)
        return self

    # ---- building blocks -------------------------------------------------------------------
    def _text(self, prompts, negative_prompt, repeat: int, call: _Call):
        cond, uncond = self.text.with_unconditional(prompts, negative_prompt, long_prompts=call.long_prompts)
        rep = lambda a: jnp.repeat(a, repeat, axis=0)
        return jax.tree.map(rep, cond), jax.tree.map(rep, uncond)

    def _stage(self, runner, key: str, settings, shape, cond, uncond, x_init, call: _Call, stream: int):
        call.timings[key] = StageTiming()
        return runner(settings, tuple(shape[1:]), call.seeds, cond, uncond, x_init, call.timings[key], stream=stream,
                      callback=call.callback, callback_x0=call.callback_x0)

    def _sample_prior(self, cond_text, uncond_text, clip_img, shape, settings, call: _Call, x_init=None):
        zeros_img = jnp.zeros((shape[0], 1, self.c_clip_img), jnp.float32)
        clip_img = zeros_img if clip_img is None else clip_img
        cond = {**cond_text.stage_c(), "clip_img": clip_img}
        uncond = {**uncond_text.stage_c(), "clip_img": zeros_img}
        return self._stage(self.prior, "stage_c", settings, shape, cond, uncond, x_init, call, 0)

    def _sample_decoder(self, effnet_latents, cond_text, uncond_text, shape, settings, call: _Call, x_init=None):
        cond = {"effnet": effnet_latents, **cond_text.stage_b()}
        uncond = {"effnet": jnp.zeros_like(effnet_latents), **uncond_text.stage_b()}
        # Stage B's noise must differ from Stage C's for the same seed: its own stream of the seed's key.
        return self._stage(self.decoder, "stage_b", settings, shape, cond, uncond, x_init, call, STAGE_B_STREAM)

    def decode(self, stage_b_latents) -> np.ndarray:
        return image_ops.to_uint8(jitted_call(self.stage_a, jnp.asarray(stage_b_latents), method="decode"))

    def preview(self, stage_c_latents) -> np.ndarray:
        """Quick RGB previews (8x the Stage C latent size) of Stage C latents."""
        if self.previewer is None:
            raise ValueError("this pipeline has no previewer; load one (previewer.safetensors)")
        return image_ops.to_uint8(jitted_call(self.previewer, jnp.asarray(stage_c_latents)))

    def _finish(self, c_latents, cond, uncond, b_shape, decoder, decoder_x_init, call: _Call,
                decode: bool) -> CascadeOutput:
        b_latents = self._sample_decoder(c_latents, cond, uncond, b_shape, decoder, call, decoder_x_init)
        images = self.decode(b_latents) if decode else None
        return CascadeOutput(images, np.asarray(c_latents), np.asarray(b_latents), call.timings, call.seeds)

    def _resolve(self, prior, decoder):
        """A call's settings: the given ones, else this pipeline's defaults."""
        return (self.prior_defaults if prior is None else prior,
                self.decoder_defaults if decoder is None else decoder)

    @staticmethod
    def _call(seed, batch: int, prior, decoder, callback, callback_x0, long_prompts=False) -> _Call:
        """Check what every mode shares (before any work) and start the call's state."""
        for name, settings in (("prior", prior), ("decoder", decoder)):
            if settings is not None:
                checks.check_settings(name, settings)
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be a function of one StepEvent, got {type(callback).__name__}")
        checks.check_flag("callback_x0", callback_x0)
        checks.check_flag("long_prompts", long_prompts)
        return _Call(checks.seeds_for(seed, batch), callback, callback_x0, long_prompts)

    # ---- modes -----------------------------------------------------------------------------
    def text_to_image(self, prompt, negative_prompt=None, *, height=1024, width=1024, num_images_per_prompt=1,
                      seed=0, prior: SamplerSettings | None = None, decoder: SamplerSettings | None = None,
                      prior_x_init=None, decoder_x_init=None, decode=True, callback=None, callback_x0=False,
                      long_prompts=False) -> CascadeOutput:
        """Prompts -> images. ``callback(StepEvent)`` is called after every step of each stage (with the
        step's predicted x0 when ``callback_x0``); ``long_prompts`` encodes prompts past CLIP's 77 tokens
        in windows (see ``TextConditioner``) instead of truncating them."""
        prompts = checks.prompt_list(prompt)
        batch = checks.batch_size(len(prompts), num_images_per_prompt)
        c_shape, b_shape = latent_shapes(height, width, batch, self.c_latent_c, self.c_latent_b)
        prior, decoder = self._resolve(prior, decoder)
        call = self._call(seed, batch, prior, decoder, callback, callback_x0, long_prompts)
        prior_x_init = checks.check_x_init("prior_x_init", prior_x_init, c_shape)
        decoder_x_init = checks.check_x_init("decoder_x_init", decoder_x_init, b_shape)
        checks.check_flag("decode", decode)
        cond, uncond = self._text(prompts, negative_prompt, num_images_per_prompt, call)
        c_latents = self._sample_prior(cond, uncond, None, c_shape, prior, call, prior_x_init)
        return self._finish(c_latents, cond, uncond, b_shape, decoder, decoder_x_init, call, decode)

    def image_variation(self, images, *, prompt="", height=1024, width=1024, num_images_per_prompt=1, seed=0,
                        prior: SamplerSettings | None = None, decoder: SamplerSettings | None = None,
                        prior_x_init=None, decoder_x_init=None, callback=None, callback_x0=False, long_prompts=False):
        """New images like ``images``: Stage C conditioned on their CLIP-L image embeddings."""
        if self.image_encoder is None:
            raise ValueError("image variation needs the CLIP-L image encoder (image_encoder/)")
        arrays = image_ops.as_uint8_batch(images)
        batch = checks.batch_size(len(arrays), num_images_per_prompt)
        c_shape, b_shape = latent_shapes(height, width, batch, self.c_latent_c, self.c_latent_b)  # check first
        prior, decoder = self._resolve(prior, decoder)
        call = self._call(seed, batch, prior, decoder, callback, callback_x0, long_prompts)
        prior_x_init = checks.check_x_init("prior_x_init", prior_x_init, c_shape)
        decoder_x_init = checks.check_x_init("decoder_x_init", decoder_x_init, b_shape)
        pixels = image_ops.clip_pixels(arrays)
        embeds = jitted_call(self.image_encoder, jnp.asarray(pixels)).image_embeds[:, None, :]
        cond, uncond = self._text([prompt] * pixels.shape[0], None, num_images_per_prompt, call)
        c_latents = self._sample_prior(cond, uncond, jnp.repeat(embeds, num_images_per_prompt, axis=0), c_shape,
                                       prior, call, prior_x_init)
        return self._finish(c_latents, cond, uncond, b_shape, decoder, decoder_x_init, call, True)

    def encode_effnet(self, images, height: int, width: int):
        """EfficientNet latents sized like Stage C latents of a (height, width) image."""
        if self.effnet is None:
            raise ValueError("this mode needs the EfficientNet encoder (effnet_encoder.safetensors)")
        (_, hc, wc, _), _ = latent_shapes(height, width, 1, self.c_latent_c, self.c_latent_b)
        pixels = image_ops.effnet_pixels(images, (hc * 32, wc * 32))
        return jitted_call(self.effnet, jnp.asarray(pixels)).astype(jnp.float32)

    def _image_size(self, arrays, height, width):
        """The output size: as given, else the input's size rounded down to a multiple of 8."""
        height = image_ops.round_size(arrays.shape[1]) if height is None else height
        width = image_ops.round_size(arrays.shape[2]) if width is None else width
        return height, width

    def image_to_image(self, images, prompt, negative_prompt=None, *, strength=0.8, height=None, width=None,
                       seed=0, prior: SamplerSettings | None = None, decoder: SamplerSettings | None = None,
                       decoder_x_init=None, callback=None, callback_x0=False, long_prompts=False):
        """Stage C starts from the images' EfficientNet latents noised to t = ``strength`` and runs
        ``round(steps * strength)`` steps of the same schedule. The output is ``height`` x ``width``
        (default: the input's size rounded down to a multiple of 8); the input is resized to it."""
        checks.check_strength(strength)
        arrays = image_ops.as_uint8_batch(images)
        height, width = self._image_size(arrays, height, width)
        prompts = checks.prompt_list(prompt)
        if len(prompts) not in (1, len(arrays)):
            raise ValueError(f"{len(prompts)} prompts for {len(arrays)} images")
        prompts = prompts * len(arrays) if len(prompts) == 1 else prompts
        batch = len(arrays)
        c_shape, b_shape = latent_shapes(height, width, batch, self.c_latent_c, self.c_latent_b)
        prior, decoder = self._resolve(prior, decoder)
        call = self._call(seed, batch, prior, decoder, callback, callback_x0, long_prompts)
        decoder_x_init = checks.check_x_init("decoder_x_init", decoder_x_init, b_shape)
        effnet_latents = self.encode_effnet(arrays, height, width)
        with jax.threefry_partitionable(False):  # as the stage runner draws its noise (fast to compile)
            eps = jax.vmap(lambda k: jax.random.normal(k, c_shape[1:]))(image_keys(call.seeds, IMG2IMG_STREAM))
        x_init = self.gdf.diffuse(effnet_latents, epsilon=eps, t=jnp.full((batch,), strength), shift=prior.shift).noised
        settings = prior.replace(steps=max(1, round(prior.steps * strength)), t_start=strength)
        cond, uncond = self._text(prompts, negative_prompt, 1, call)
        c_latents = self._sample_prior(cond, uncond, None, c_shape, settings, call, x_init)
        return self._finish(c_latents, cond, uncond, b_shape, decoder, decoder_x_init, call, True)

    def reconstruct(self, images, *, prompt="", height=None, width=None, seed=0,
                    decoder: SamplerSettings | None = None, decoder_x_init=None, callback=None,
                    callback_x0=False):
        """Image -> EfficientNet latents (the 42.67x code) -> Stage B -> Stage A: the codec round trip, at
        ``height`` x ``width`` (default: the input's size rounded down to a multiple of 8). ``prompt``: Stage B's
        text, one for all images or one per image."""
        arrays = image_ops.as_uint8_batch(images)
        height, width = self._image_size(arrays, height, width)
        batch = len(arrays)
        prompts = checks.prompt_list(prompt)
        if len(prompts) not in (1, batch):
            raise ValueError(f"{len(prompts)} prompts for {batch} images")
        _, b_shape = latent_shapes(height, width, batch, self.c_latent_c, self.c_latent_b)
        _, decoder = self._resolve(None, decoder)
        call = self._call(seed, batch, None, decoder, callback, callback_x0)
        decoder_x_init = checks.check_x_init("decoder_x_init", decoder_x_init, b_shape)
        effnet_latents = self.encode_effnet(arrays, height, width)
        cond, uncond = self._text(prompts * batch if len(prompts) == 1 else prompts, None, 1, call)
        return self._finish(effnet_latents, cond, uncond, b_shape, decoder, decoder_x_init, call, True)
