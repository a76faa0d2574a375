"""ControlNet sampling on top of the cascade pipeline: canny, inpainting, super-resolution, identity.

``ControlNetPipeline(pipeline, controlnet, control)(image, prompt, ...)`` computes the control's
hint (``cascade_jax.data.hints``), runs the ControlNet once, and samples the cascade with Stage C
receiving the residuals on every step, in the conditional *and* the unconditional CFG branch (as
the official notebook does). Per-task settings are the official ones (notebook + configs):

* canny / identity: text-to-image at the image's size (Stage C cfg 4, shift 2, 20 steps);
* inpainting: Stage C starts from the image's EfficientNet latents noised to ``t_start``
  (default 1.0) and runs ``round(steps·t_start)`` steps; afterwards the pixels outside the mask
  are put back from the input (``keep_unmasked``);
* super-resolution: the output is twice the input's size; Stage C with cfg 1, run as no
  guidance at all (lerp at weight 1 is the conditional prediction, so the unconditional pass
  the official sampler spends is skipped).

Control strength is the official ``cnet_multiplier`` (finite, within +-MAX_STRENGTH);
``ControlSettings(start, stop)`` limits the control to Stage C steps ``start <= i < stop`` (an empty
window, or a start past the run's last step, is refused: the control would never act). The strength
and the step window reach the network as a small int32 array (float32 bit patterns, so the pipeline's cast of conditions to the
compute dtype leaves them exact) and change nothing in the compiled program when they change.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from cascade_jax import storage
from cascade_jax.data import hints
from cascade_jax.models.controlnet import ControlNet
from cascade_jax.models.lora import check_strength
from cascade_jax.nn.blocks import ResBlock
from cascade_jax.pipelines import images as image_ops
from cascade_jax.pipelines.cascade import StableCascadePipeline, jitted_call
from cascade_jax.pipelines.sizes import check_image_size
from cascade_jax.pipelines.stage_runner import StageRunner

CONTROLS = ("canny", "inpainting", "super_resolution", "identity")
PRESETS = {"canny": "controlnet_canny", "inpainting": "controlnet_inpainting", "super_resolution": "controlnet_sr",
           "identity": "controlnet_identity"}


@dataclasses.dataclass(frozen=True)
class ControlSettings:
    """How strongly and on which Stage C steps the control acts."""

    strength: float = 1.0  # the official cnet_multiplier (1.0; the notebook suggests 0.3-0.8 for less)
    start: int = 0  # first Stage C step with control
    stop: int | None = None  # first step without it again (None: to the end)

    def check(self, steps: int | None = None):
        """Refuse by name what cannot work: a strength that is not finite or beyond +-MAX_STRENGTH (it
        overflows into NaN), a step index that is not one, an empty window (start >= stop), and with the
        Stage C ``steps`` of the run, a start past its last step (the control would never act)."""
        check_strength("control strength", self.strength)
        for name in ("start", "stop"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"control {name} must be a step index >= 0, got {value!r}")
        if self.stop is not None and self.start >= self.stop:
            raise ValueError(f"the control window is empty: control start {self.start} >= control stop {self.stop}, "
                             "so the control would act on no step; the window is start <= step < stop")
        if steps is not None and self.start >= steps:
            raise ValueError(f"control start {self.start} is past the last Stage C step ({steps} steps: 0 .. "
                             f"{steps - 1}), so the control would act on no step; lower it or run more steps")


@dataclasses.dataclass
class ControlNetOutput:
    images: np.ndarray  # (B, H, W, 3) uint8
    control_images: np.ndarray  # (B, h, w, 3) uint8: what the ControlNet was shown
    stage_c_latents: np.ndarray
    timings: dict
    seeds: list


class ControlledStageC(nnx.Module):
    """Stage C whose ControlNet residuals are scaled per image and switched on by noise level.

    ``control``: (B, 3) int32 holding float32 bits of (strength, r_high, r_low); the residuals act
    where r_low < r <= r_high (r falls monotonically over the steps, so this is a step window).
    """

    def __init__(self, stage_c):
        self.stage_c = stage_c

    def __call__(self, x, r, clip_text, clip_text_pooled, clip_img, cnet=None, control=None, **t_conds):
        if cnet is not None and control is not None:
            strength, r_high, r_low = jnp.moveaxis(jax.lax.bitcast_convert_type(control, jnp.float32), -1, 0)
            scale = jnp.where((r <= r_high) & (r > r_low), strength, 0.0)[:, None, None, None]
            cnet = [None if c is None else c * scale.astype(c.dtype) for c in cnet]
        return self.stage_c(x, r, clip_text, clip_text_pooled, clip_img, cnet=cnet, **t_conds)


def controlled_steps(control: str, steps: int, t_start: float = 1.0) -> int:
    """How many Stage C steps the control's run takes: inpainting starts at ``t_start`` and runs
    ``round(steps * t_start)`` (at least 1) of them, as ``image_to_image``; the others all ``steps``."""
    return max(1, round(steps * t_start)) if control == "inpainting" else steps


def output_size(control: str, image_hw: tuple[int, int], height=None, width=None) -> tuple[int, int]:
    """The output size for an input image of ``image_hw``: as given, else the input's size rounded down to a
    multiple of 8 (twice that for super-resolution); checked (``check_image_size``) before any work."""
    factor = 2 if control == "super_resolution" else 1
    from_image = height is None or width is None
    height = factor * image_ops.round_size(image_hw[0]) if height is None else height
    width = factor * image_ops.round_size(image_hw[1]) if width is None else width
    try:
        check_image_size(height, width)
    except ValueError as e:
        if not from_image:
            raise
        raise ValueError(f"{e}; it comes from the input image's size {image_hw[0]}x{image_hw[1]}: pass a height and "
                         "width, or resize the image") from None
    return height, width


def control_array(settings, control: ControlSettings, batch: int) -> np.ndarray:
    """(batch, 3) int32 bits of (strength, r_high, r_low) for this run's sampler ``settings``."""
    r = np.asarray(settings.plan().r, np.float32)  # what the loop feeds the network, step by step
    stop = len(r) if control.stop is None else min(control.stop, len(r))
    if control.start >= stop:
        r_high, r_low = -np.inf, np.inf  # no step in the window
    else:
        r_high, r_low = r[control.start], (r[stop] if stop < len(r) else -np.inf)
    values = np.array([control.strength, r_high, r_low], np.float32)
    return np.broadcast_to(values.view(np.int32), (batch, 3)).copy()


class _ControlledPrior:
    """Stands in for the pipeline's Stage C runner: adds the residuals and control to both branches."""

    def __init__(self, runner: StageRunner, residuals: list, control: ControlSettings):
        self.runner, self.residuals, self.control = runner, residuals, control

    def __call__(self, settings, x_shape, seeds, conditions, uncond, *args, **kwargs):
        extra = {"cnet": self.residuals, "control": control_array(settings, self.control, len(seeds))}
        uncond = None if uncond is None else {**uncond, **extra}
        return self.runner(settings, x_shape, seeds, {**conditions, **extra}, uncond, *args, **kwargs)


def resblock_widths(stage_c) -> list[int]:
    """The input width of each ResBlock call of Stage C, in the order residuals are handed out."""
    widths = []
    levels = list(zip(stage_c.down_blocks, stage_c.down_repeat_mappers)) + \
        list(zip(stage_c.up_blocks, stage_c.up_repeat_mappers))
    for blocks, mappers in levels:
        for _ in range(len(mappers) + 1):
            widths += [b.depthwise.weight.shape[-1] for b in blocks if isinstance(b, ResBlock)]
    return widths


def check_fits(controlnet: ControlNet, stage_c, control: str):
    if control not in CONTROLS:
        raise ValueError(f"unknown control {control!r}; use one of {CONTROLS}")
    if controlnet.c_in != hints.HINT_CHANNELS[control]:
        raise ValueError(f"the {control} hint has {hints.HINT_CHANNELS[control]} channels but this ControlNet takes "
                         f"{controlnet.c_in}; load the {control} ControlNet (preset {PRESETS[control]})")
    widths = resblock_widths(stage_c)
    c_proj = controlnet.projections[0][2].weight.shape[-1]
    bad = [i for i in controlnet.proj_blocks if i >= len(widths) or widths[i] != c_proj]
    if bad:
        raise ValueError(f"ControlNet residuals (width {c_proj}, ResBlocks {list(controlnet.proj_blocks)}) do not fit "
                         f"this Stage C ({len(widths)} ResBlocks of widths {sorted(set(widths))}); the released "
                         "ControlNets are for the 3.6B Stage C, not the lite one")


def tiny_controlnet_config(control: str, stage_c) -> dict:
    """A ControlNet for a small random Stage C: every ResBlock gets a residual of its width. canny and
    inpainting keep the real EfficientNet bottleneck; super-resolution uses ``simple`` (``large`` is
    200M parameters by construction)."""
    widths = resblock_widths(stage_c)
    mode = "effnet" if control in ("canny", "inpainting") else "simple"
    return {"c_in": hints.HINT_CHANNELS[control], "c_proj": widths[0], "proj_blocks": list(range(len(widths))),
            "bottleneck_mode": mode}


def load_controlnet(source, control: str, dtype: str = "bfloat16") -> ControlNet:
    """A converted ControlNet directory, or an official .safetensors file converted with the control's preset."""
    from cascade_jax.weights.checkpoint import load_model
    from cascade_jax.weights.convert import convert_checkpoint

    if storage.isdir(source):  # a local folder or a prefix in a bucket
        return load_model(source, dtype=dtype)
    if not storage.isfile(source):
        raise FileNotFoundError(f"ControlNet weights {source} not found: pass a converted directory or the official "
                                f"{control}.safetensors")
    with tempfile.TemporaryDirectory(prefix="controlnet-") as tmp:  # (a file in a bucket is read from a copy)
        out = convert_checkpoint("controlnet", PRESETS[control], source, Path(tmp) / "controlnet", dtype=dtype)
        return load_model(out, dtype=dtype)


def saliency_function(source, dtype: str = "float32"):
    """``images -> saliency`` from the official saliency net (a converted directory or its weights re-saved as
    .safetensors; see ``cascade_jax.models.saliency``), for automatic inpainting / outpainting masks."""
    from cascade_jax.weights.checkpoint import load_model
    from cascade_jax.weights.convert import convert_checkpoint

    if storage.isdir(source):  # a local folder or a prefix in a bucket
        model = load_model(source, dtype=dtype)
    elif storage.isfile(source):
        with tempfile.TemporaryDirectory(prefix="saliency-") as tmp:
            model = load_model(convert_checkpoint("saliency", "saliency", source, Path(tmp) / "saliency"), dtype=dtype)
    else:
        raise FileNotFoundError(f"saliency weights {source} not found: pass a converted directory or the official "
                                "saliency_model.pt re-saved as .safetensors")
    return lambda images: np.asarray(jitted_call(model, jnp.asarray(images, jnp.float32)), np.float32)


def _resize(images: np.ndarray, size: tuple[int, int], resample=Image.BILINEAR) -> np.ndarray:
    h, w = size
    return np.stack([np.asarray(Image.fromarray(im).resize((w, h), resample)) for im in images])


def _gray(x: np.ndarray) -> np.ndarray:
    return image_ops.to_uint8(jnp.repeat(jnp.asarray(x), 3, axis=-1) if x.shape[-1] == 1 else jnp.asarray(x))


class ControlNetPipeline:
    """A cascade pipeline plus one ControlNet for one control (see the module docstring)."""

    def __init__(self, pipeline: StableCascadePipeline, controlnet: ControlNet, control: str):
        stage_c = nnx.merge(pipeline.prior.graphdef, pipeline.prior.state)
        check_fits(controlnet, stage_c, control)
        self.pipeline, self.controlnet, self.control = pipeline, controlnet, control
        self.controlled_prior = pipeline.prior.with_model(ControlledStageC(stage_c))  # the same mesh and rules

    @classmethod
    def random(cls, control: str, set_name: str = "tiny", *, seed: int = 0, dtype: str = "float32"):
        """Random cascade and ControlNet (``tiny``: a ControlNet sized for the tiny Stage C; else the preset)."""
        from cascade_jax.models.random_init import random_model
        from cascade_jax.models.registry import load_config

        if control not in CONTROLS:
            raise ValueError(f"unknown control {control!r}; use one of {CONTROLS}")
        pipeline = StableCascadePipeline.random(set_name, seed=seed, dtype=dtype)
        stage_c = nnx.merge(pipeline.prior.graphdef, pipeline.prior.state)
        config = tiny_controlnet_config(control, stage_c) if set_name == "tiny" else load_config(PRESETS[control])[1]
        return cls(pipeline, random_model("controlnet", config, seed=seed + 100, dtype=dtype), control)

    @classmethod
    def from_pretrained(cls, source, controlnet, control: str, *, dtype: str = "bfloat16", configs=None):
        """The cascade from ``source`` (as ``StableCascadePipeline.from_pretrained``) and the ControlNet
        from a converted directory or the official ``canny/inpainting/super_resolution.safetensors``."""
        if control not in CONTROLS:
            raise ValueError(f"unknown control {control!r}; use one of {CONTROLS}")
        cnet = load_controlnet(controlnet, control, dtype)
        return cls(StableCascadePipeline.from_pretrained(source, dtype=dtype, configs=configs), cnet, control)

    def residuals(self, hint) -> list:
        """The ControlNet's residual list for a (B, h, w, c_in) hint (None where a ResBlock gets nothing)."""
        return list(jitted_call(self.controlnet, jnp.asarray(hint, jnp.float32)))

    def _effnet_encode(self, pixels):
        if self.pipeline.effnet is None:
            raise ValueError("the super-resolution control needs the EfficientNet encoder (effnet_encoder.safetensors)")
        return jitted_call(self.pipeline.effnet, jnp.asarray(pixels))

    def output_size(self, arrays: np.ndarray, height, width) -> tuple[int, int]:
        """As given, else the input's size rounded down to a multiple of 8 (twice that for super-resolution)."""
        return output_size(self.control, arrays.shape[1:3], height, width)

    def make_hint(self, arrays: np.ndarray, size, *, mask=None, faces=None, saliency_fn=None, mask_threshold=0.2,
                  outpaint=False):
        """``(hint, control image uint8, mask or None)`` for uint8 images; canny, inpainting and identity work
        at the output ``size``, super-resolution on the (low-resolution) input as it is."""
        if self.control == "super_resolution":
            hint, preview = hints.super_resolution_hint(arrays, self._effnet_encode, downscale=False)
            return hint, image_ops.to_uint8(jnp.asarray(preview)), None
        resized = _resize(arrays, size)
        if self.control == "canny":
            hint = hints.canny_hint(resized)
            return hint, _gray(hint), None
        if self.control == "inpainting":
            if mask is None:
                mask = hints.saliency_mask(resized, saliency_fn, threshold=mask_threshold, outpaint=outpaint)
            else:
                mask = hints.inpainting.as_mask(_resize_mask(mask, size), resized.shape[:3])
            hint = hints.inpainting_hint(resized, mask)
            return hint, image_ops.to_uint8(jnp.asarray(hint[..., :3])), mask
        if faces is None:
            raise RuntimeError(hints.identity.FACE_MODELS_MISSING)
        boxes, embeddings = faces
        scale = np.array([size[1] / arrays.shape[2], size[0] / arrays.shape[1]] * 2, np.float32)
        hint, preview = hints.identity_hint(resized, [np.asarray(b, np.float32).reshape(-1, 4) * scale for b in boxes],
                                            embeddings)
        return hint, image_ops.to_uint8(jnp.asarray(preview)), None

    def __call__(self, images, prompt="", negative_prompt=None, *, mask=None, faces=None, saliency_fn=None,
                 mask_threshold: float = 0.2, outpaint: bool = False, height=None, width=None, seed=0,
                 control: ControlSettings = ControlSettings(), prior=None, decoder=None,
                 t_start: float = 1.0, keep_unmasked: bool = True) -> ControlNetOutput:
        """Sample with the control made from ``images`` (one prompt for all, or one per image).

        ``mask`` (inpainting; 1/True = generate there), or without one an automatic mask: ``saliency_fn``
        (e.g. :func:`saliency_function` of the official saliency net) above ``mask_threshold`` (0.2 as in
        the official notebook), inverted with ``outpaint``. ``faces`` (identity: per-image lists of boxes
        and ArcFace embeddings); ``prior`` / ``decoder`` default to the pipeline's (``prior_defaults``, without
        guidance for super-resolution, as the official notebook).
        """
        prior_steps = (self.pipeline.prior_defaults if prior is None else prior).steps
        control.check(controlled_steps(self.control, prior_steps, t_start))
        arrays = image_ops.as_uint8_batch(images)
        prompts = [prompt] * len(arrays) if isinstance(prompt, str) else list(prompt)
        size = self.output_size(arrays, height, width)  # checked: no work at a size the cascade cannot make
        hint, control_images, hint_mask = self.make_hint(arrays, size, mask=mask, faces=faces, saliency_fn=saliency_fn,
                                                         mask_threshold=mask_threshold, outpaint=outpaint)
        pipe = copy.copy(self.pipeline)  # the same models, with the controlled Stage C runner
        pipe.prior = _ControlledPrior(self.controlled_prior, self.residuals(hint), control)
        common = dict(height=size[0], width=size[1], seed=seed, decoder=decoder)
        if self.control == "inpainting":
            result = pipe.image_to_image(_resize(arrays, size), prompts, negative_prompt, strength=t_start,
                                         prior=prior, **common)
            if keep_unmasked:
                result.images = np.where(hint_mask, result.images, _resize(arrays, size))
        else:
            # Super-resolution runs at cfg 1, i.e. the conditional prediction alone (no unconditional pass).
            if prior is None and self.control == "super_resolution":
                prior = pipe.prior_defaults.replace(cfg=None)
            result = pipe.text_to_image(prompts, negative_prompt, prior=prior, **common)
        return ControlNetOutput(result.images, control_images, result.stage_c_latents, result.timings, result.seeds)


def _resize_mask(mask, size) -> np.ndarray:
    """A user mask (H, W[, 1]) or (B, H, W[, 1]) resized (nearest) to ``size``."""
    m = np.asarray(mask)
    m = m.astype(np.uint8) * 255 if m.dtype == bool else m
    if m.dtype != np.uint8:
        m = (np.clip(m, 0, 1) * 255).astype(np.uint8)
    batch = m if m.ndim == 4 or (m.ndim == 3 and m.shape[-1] not in (1, 3)) else m[None]
    batch = batch[..., 0] if batch.ndim == 4 else batch
    return _resize(batch, size, Image.NEAREST)
