"""``pipe(prompt, ...)``: the pipeline called with the arguments of diffusers' ``StableCascadeCombinedPipeline``.

Each argument is mapped onto ``StableCascadePipeline.text_to_image`` (one code path):

* ``prior_num_inference_steps`` / ``num_inference_steps``: Stage C / Stage B ``steps``;
  ``prior_guidance_scale`` / ``decoder_guidance_scale``: their ``cfg``, where a scale <= 1 means no
  guidance, as in diffusers (``cfg=None``: no unconditional pass). Unset ones are this pipeline's
  defaults (the official settings, or the weights folder's sampling.json), not diffusers' defaults
  (60 + 12 steps, decoder guidance 0, 512x512);
* ``generator``: an int seed (image i gets seed + i), a list of seeds (one per image), a JAX key (or a
  list of keys, one per image) from which the seeds are drawn, or None (seed 0: reproducible);
* ``latents`` (as in the combined pipeline) or ``prior_latents``: Stage C's initial noise;
  ``decoder_latents``: Stage B's. NHWC as everywhere here; NCHW arrays (diffusers' layout) are
  transposed when their shape says so unambiguously;
* ``output_type``: ``"pil"`` (a list of PIL images), ``"np"`` (float32 in [0, 1], (B, H, W, 3), not rounded
  to 8 bits) or ``"latent"`` (the Stage B latents, NHWC); ``return_dict=False`` returns ``(images,)``;
* ``prior_callback_on_step_end`` / ``callback_on_step_end``: called after every Stage C / Stage B step as
  ``fn(pipe, step_index, t, callback_kwargs)``. The sampling loop is compiled, so a callback observes and
  cannot change it: ``callback_kwargs`` holds the tensors named in ``*_tensor_inputs`` of which only
  ``"x0"`` (the step's predicted clean latents) exists; a callback that returns changed tensors is an
  error, not silently ignored.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from cascade_jax.pipelines import arguments as checks

OUTPUT_TYPES = ("pil", "np", "latent")
TENSOR_INPUTS = ("x0",)


def stage_settings(base, steps_name: str, steps, scale_name: str, scale):
    """``base`` with the diffusers-named step count and guidance scale, when given."""
    changes = {}
    if steps is not None:
        if not checks.is_int(steps) or steps < 1:
            raise ValueError(f"{steps_name} must be a positive integer, got {steps!r}")
        changes["steps"] = int(steps)
    if scale is not None:
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(scale):
            raise ValueError(f"{scale_name} must be a finite number, got {scale!r}")
        changes["cfg"] = None if scale <= 1 else float(scale)  # diffusers: guidance only above 1
    return base.replace(**changes)


def _is_key(value) -> bool:
    return isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key) and value.shape == ()


def _key_seeds(key, count: int) -> list[int]:
    return [int(s) for s in np.asarray(jax.random.bits(key, (count,), jnp.uint32))]


def seeds_from_generator(generator, batch: int):
    """The per-image seeds of a diffusers-style ``generator`` (see the module docstring)."""
    if generator is None:
        return 0
    if _is_key(generator):
        return _key_seeds(generator, batch)
    if isinstance(generator, (list, tuple)) and generator and all(_is_key(g) for g in generator):
        if len(generator) != batch:
            raise ValueError(f"generator: {len(generator)} keys for {batch} images")
        return [_key_seeds(g, 1)[0] for g in generator]
    if checks.is_int(generator) or isinstance(generator, (list, tuple)):
        return list(generator) if isinstance(generator, tuple) else generator
    raise ValueError(f"generator must be an int seed, a list of seeds, a JAX key (jax.random.key(0)) or a list of "
                     f"keys, got {type(generator).__name__} (torch generators do not drive JAX's random numbers)")


def as_nhwc(name: str, latents, shape):
    """``latents`` in NHWC: given so, or NCHW (diffusers' layout) when only that reading fits ``shape``."""
    if latents is None:
        return None
    array = np.asarray(latents)
    batch, height, width, channels = shape
    if array.shape != tuple(shape) and array.shape == (batch, channels, height, width):
        array = array.transpose(0, 2, 3, 1)
    return checks.check_x_init(name, array, shape)


def _stage_callback(pipe, name: str, fn, inputs, settings):
    if fn is None:
        return None, False
    if not callable(fn):
        raise ValueError(f"{name} must be a function (pipe, step_index, t, callback_kwargs), got {type(fn).__name__}")
    inputs = list(inputs or ())
    unknown = [i for i in inputs if i not in TENSOR_INPUTS]
    if unknown:
        raise ValueError(f"{name}_tensor_inputs: {unknown} cannot be handed out (the noisy latents stay inside the "
                         f"compiled sampling loop); available: {list(TENSOR_INPUTS)}")
    times = settings.plan().t

    def on_step(event):
        kwargs = {"x0": event.x0} if "x0" in inputs else {}
        returned = fn(pipe, event.step - 1, float(times[event.step - 1]), kwargs)
        if returned is not None and (not isinstance(returned, dict) or
                                     any(k not in kwargs or v is not kwargs[k] for k, v in returned.items())):
            what = sorted(returned) if isinstance(returned, dict) else type(returned).__name__
            raise ValueError(f"{name} returned changed tensors ({what}); the sampling loop is compiled, so a "
                             "callback can observe it but not change it: return None or the callback_kwargs it got")

    return on_step, "x0" in inputs


def step_callback(pipe, prior, decoder, prior_fn, prior_inputs, decoder_fn, decoder_inputs):
    """One ``StepEvent`` callback for ``text_to_image`` dispatching to the per-stage diffusers-style callbacks,
    and whether it needs each step's x0."""
    prior_cb, prior_x0 = _stage_callback(pipe, "prior_callback_on_step_end", prior_fn, prior_inputs, prior)
    decoder_cb, decoder_x0 = _stage_callback(pipe, "callback_on_step_end", decoder_fn, decoder_inputs, decoder)
    if prior_cb is None and decoder_cb is None:
        return None, False

    def callback(event):
        stage_cb = prior_cb if event.stage == "Stage C" else decoder_cb
        if stage_cb is not None:
            stage_cb(event)

    return callback, prior_x0 or decoder_x0


def call(pipe, prompt, *, negative_prompt=None, num_images_per_prompt=1, height=None, width=None,
         prior_num_inference_steps=None, num_inference_steps=None, prior_guidance_scale=None,
         decoder_guidance_scale=None, generator=None, latents=None, prior_latents=None, decoder_latents=None,
         output_type="pil", return_dict=True, prior_callback_on_step_end=None,
         prior_callback_on_step_end_tensor_inputs=None, callback_on_step_end=None,
         callback_on_step_end_tensor_inputs=None):
    """``StableCascadePipeline.__call__``: the arguments above, checked, then one ``text_to_image`` call."""
    from cascade_jax.pipelines.sizes import latent_shapes

    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r} (no torch here: "
                         "\"pt\" is not available)")
    checks.check_flag("return_dict", return_dict)
    if latents is not None and prior_latents is not None:
        raise ValueError("latents and prior_latents both set Stage C's initial noise: pass one of them")
    prior = stage_settings(pipe.prior_defaults, "prior_num_inference_steps", prior_num_inference_steps,
                           "prior_guidance_scale", prior_guidance_scale)
    decoder = stage_settings(pipe.decoder_defaults, "num_inference_steps", num_inference_steps,
                             "decoder_guidance_scale", decoder_guidance_scale)
    batch = checks.batch_size(len(checks.prompt_list(prompt)), num_images_per_prompt)
    height, width = pipe.size_or_default(height, width)
    c_shape, b_shape = latent_shapes(height, width, batch, pipe.c_latent_c, pipe.c_latent_b)
    callback, callback_x0 = step_callback(pipe, prior, decoder, prior_callback_on_step_end,
                                          prior_callback_on_step_end_tensor_inputs, callback_on_step_end,
                                          callback_on_step_end_tensor_inputs)
    out = pipe.text_to_image(
        prompt, negative_prompt, height=height, width=width, num_images_per_prompt=num_images_per_prompt,
        seed=seeds_from_generator(generator, batch), prior=prior, decoder=decoder,
        prior_x_init=as_nhwc("latents" if latents is not None else "prior_latents",
                             prior_latents if latents is None else latents, c_shape),
        decoder_x_init=as_nhwc("decoder_latents", decoder_latents, b_shape), decode=output_type == "pil",
        callback=callback, callback_x0=callback_x0)
    if output_type == "pil":
        from PIL import Image

        images = [Image.fromarray(image) for image in out.images]
    elif output_type == "np":
        images = pipe.decode_float(out.stage_b_latents)
    else:
        images = out.stage_b_latents
    if not return_dict:
        return (images,)
    out.images = images
    return out


UNSUPPORTED = {
    "images": "pipe.image_variation(images, prompt=...)",
    "prompt_embeds": "prompts (the text encoder runs inside the pipeline)",
    "prompt_embeds_pooled": "prompts (the text encoder runs inside the pipeline)",
    "negative_prompt_embeds": "negative_prompt",
    "negative_prompt_embeds_pooled": "negative_prompt",
    "prior_timesteps": "prior_num_inference_steps (and PRIOR_DEFAULTS.replace(t_start=...) via text_to_image)",
    "decoder_timesteps": "num_inference_steps (and DECODER_DEFAULTS.replace(t_start=...) via text_to_image)",
}


def check_arguments(kwargs: dict):
    """Refuse, by name, arguments ``call`` does not take, saying what to use instead."""
    import inspect

    accepted = set(inspect.signature(call).parameters) - {"pipe", "prompt"}
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        hints = "; ".join(f"{k}: use {UNSUPPORTED[k]}" for k in unknown if k in UNSUPPORTED)
        raise TypeError(f"StableCascadePipeline() got unexpected arguments {unknown}" + (f" ({hints})" if hints else "")
                        + f"; it takes {sorted(accepted)}")
