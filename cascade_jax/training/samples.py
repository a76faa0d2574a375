"""Sample collages during training: every ``sample_every`` updates, a PNG of what the current
weights make, at ``{output_path}/{experiment_id}/samples/step_{N:08d}.png``.

* Stage C (and LoRA on Stage C): text-to-image latents of ``SAMPLE_COUNT`` captions drawn from the
  training data (the first distinct ones of its seeded order: the same after a resume; with a data
  iterator that cannot say, those of the first batch), or of ``sample_prompts`` when set, with the
  official Stage C sampler (``PRIOR_DEFAULTS``, ``sample_steps`` steps), shown through the
  frozen Previewer when one is loaded (``previewer_checkpoint_path``, or a previewer in the
  ``encoders`` set), else as a false-colour image of the latent channels (their first three
  principal components; the log says so once).
* Stage B: reconstructions (``DECODER_DEFAULTS``) of the first images of the first training
  batch this process sees, from their EfficientNet latents and captions, decoded by the frozen
  Stage A; the collage shows the originals above the reconstructions. A resumed run takes the
  first batch after the resume point.

Each collage is also logged to TensorBoard (the Images tab, tag ``samples``) when the run logs there.

The weights are the EMA when the run keeps one, else the trained parameters, in the compute
dtype, with dropout off. Sampling draws its noise from its own key (the same for every
collage, so collages of a run compare step by step) and only reads the state: the training RNG,
the data order and resume are untouched. The sampling program is compiled once per run.
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from cascade_jax import storage
from cascade_jax.diffusion import sample_with_settings
from cascade_jax.pipelines.cascade import DECODER_DEFAULTS, PRIOR_DEFAULTS
from cascade_jax.pipelines.images import effnet_pixels
from cascade_jax.pipelines.sizes import stage_b_latent_hw, stage_c_latent_hw
from cascade_jax.training import placement
from cascade_jax.training.config import TrainConfig
from cascade_jax.training.console import compiling, say
from cascade_jax.training.hooks import Hook, StepInfo
from cascade_jax.training.interrupt import call_abandonably
from cascade_jax.training.stage_c import encode_text
from cascade_jax.training.step import cast_floats
from cascade_jax.training.task import param_dtype
from cascade_jax.storage import atomic

log = logging.getLogger(__name__)

SAMPLE_COUNT = 4  # tiles of a collage unless sample_prompts says otherwise
TILE_MIN = 128  # tiles are upscaled (nearest, by an integer factor) to at least this many pixels a side
PAD = 2  # pixels between tiles
CAPTION_HEIGHT = 14  # the caption strip under the last row
BACKGROUND = 32
PREVIEW_SCALE = 8  # the Previewer's upsampling; false-colour latents are enlarged as much


# ---- the collage image ---------------------------------------------------------------------
def to_uint8(images01) -> np.ndarray:
    return np.round(np.clip(np.asarray(images01, np.float32), 0, 1) * 255).astype(np.uint8)


def false_colour(latents: np.ndarray, scale: int = PREVIEW_SCALE) -> np.ndarray:
    """(n, h, w, c) latents -> (n, h·scale, w·scale, 3) uint8: each pixel's first three principal
    components over the batch as RGB (2nd-98th percentile stretched; signs fixed so colours are stable)."""
    n, h, w, c = latents.shape
    flat = latents.reshape(-1, c).astype(np.float64)
    flat = flat - flat.mean(axis=0)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    basis = vt[:3]
    basis = basis * np.sign(basis[np.arange(len(basis)), np.abs(basis).argmax(axis=1)])[:, None]
    comps = flat @ basis.T
    comps = np.concatenate([comps, np.zeros((len(comps), 3 - comps.shape[1]))], axis=1)  # c < 3
    low, high = np.percentile(comps, 2, axis=0), np.percentile(comps, 98, axis=0)
    rgb = to_uint8((comps - low) / np.maximum(high - low, 1e-8)).reshape(n, h, w, 3)
    return rgb.repeat(scale, axis=1).repeat(scale, axis=2)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def collage(rows: list[np.ndarray], captions=None) -> np.ndarray:
    """Rows of (n, h, w, 3) uint8 images -> one grid image, tiles upscaled to >= TILE_MIN pixels, with
    the captions (one per column) in a strip under the last row.

    Size: width n·(k·w) + (n+1)·PAD, height r·(k·h) + (r+1)·PAD (+ CAPTION_HEIGHT with captions),
    k = ceil(TILE_MIN / min(h, w)) (at least 1).
    """
    n, h, w, _ = rows[0].shape
    k = max(1, math.ceil(TILE_MIN / min(h, w)))
    th, tw = h * k, w * k
    height = len(rows) * th + (len(rows) + 1) * PAD + (CAPTION_HEIGHT if captions else 0)
    canvas = np.full((height, n * tw + (n + 1) * PAD, 3), BACKGROUND, np.uint8)
    for r, images in enumerate(rows):
        if images.shape != rows[0].shape:
            raise ValueError(f"collage row {r} has shape {images.shape}, row 0 {rows[0].shape}")
        top = PAD + r * (th + PAD)
        for i, image in enumerate(images):
            left = PAD + i * (tw + PAD)
            canvas[top:top + th, left:left + tw] = image.repeat(k, axis=0).repeat(k, axis=1)
    if not captions:
        return canvas
    picture = Image.fromarray(canvas)
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default()
    top = len(rows) * (th + PAD) + PAD
    for i, caption in enumerate(captions):
        draw.text((PAD + i * (tw + PAD), top), _fit(draw, str(caption), font, tw), fill=(230, 230, 230), font=font)
    return np.asarray(picture)


def write_png(path, image: np.ndarray, metadata: dict):
    """Write ``image`` with ``metadata`` (PNG text chunks) atomically: a temp sibling renamed into place
    (for a URL: one object, published whole)."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    if storage.is_url(path):
        encoded = io.BytesIO()
        Image.fromarray(image).save(encoded, format="PNG", pnginfo=info)
        storage.write_bytes(path, encoded.getvalue())
        return path
    with atomic.replacing(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
    return Path(path)


# ---- the sampling programs (traced once per run) -----------------------------------------------
def _eval_modules(graphdef, params, frozen, dtype):
    modules = nnx.merge(graphdef, cast_floats(params, dtype), frozen)
    modules.eval()  # the generator trains with dropout; sampling must not
    return modules


def _conditioned(model):
    dtype = param_dtype(model)
    return lambda x, r, **c: model(x.astype(dtype), r, **{k: v.astype(dtype) for k, v in c.items()})


def stage_c_program(graphdef, dtype: str, settings, shape: tuple, with_previewer: bool):
    """(params, frozen, tokens of prompts + "" each, key) -> (latents, previews in [0, 1] or None)."""

    def program(params, frozen, inputs, key_data):
        modules, key = _eval_modules(graphdef, params, frozen, dtype), jax.random.wrap_key_data(key_data)
        clip_text, pooled = encode_text(modules.text_encoder, inputs["input_ids"], inputs["attention_mask"])
        n, generator = shape[0], modules.generator
        clip_img = jnp.zeros((n, 1, generator.clip_img_mapper.weight.shape[0]), jnp.float32)
        cond = {"clip_text": clip_text[:n], "clip_text_pooled": pooled[:n], "clip_img": clip_img}
        uncond = {"clip_text": clip_text[n:], "clip_text_pooled": pooled[n:], "clip_img": clip_img}
        latents = sample_with_settings(_conditioned(generator), settings, cond, uncond, shape=shape, key=key).x0
        if not with_previewer:
            return latents, None
        previewer = modules.previewer
        return latents, previewer(latents.astype(param_dtype(previewer))).astype(jnp.float32)

    return program


def stage_b_program(graphdef, dtype: str, settings, shape: tuple):
    """(params, frozen, tokens of captions + "" each and EfficientNet pixels, key) -> (latents, images)."""

    def program(params, frozen, inputs, key_data):
        modules, key = _eval_modules(graphdef, params, frozen, dtype), jax.random.wrap_key_data(key_data)
        _, pooled = encode_text(modules.text_encoder, inputs["input_ids"], inputs["attention_mask"])
        effnet = modules.effnet(inputs["effnet_pixels"].astype(param_dtype(modules.effnet))).astype(jnp.float32)
        n = shape[0]
        cond, uncond = {"effnet": effnet, "clip": pooled[:n]}, {"effnet": jnp.zeros_like(effnet), "clip": pooled[n:]}
        latents = sample_with_settings(_conditioned(modules.generator), settings, cond, uncond, shape=shape,
                                       key=key).x0
        stage_a = modules.stage_a
        return latents, stage_a.decode(latents.astype(param_dtype(stage_a))).astype(jnp.float32)

    return program


# ---- the hook ------------------------------------------------------------------------------------
def collage_kind(run, cfg: TrainConfig) -> str:
    model = run.task.generator_model
    if model not in ("stage_c", "stage_b"):
        raise ValueError(f"sample_every={cfg.sample_every}: sample collages show Stage C or Stage B generators; "
                         f"the {type(run.task).__name__} task trains a {model!r}: set sample_every=0")
    if cfg.cached_conditions:
        raise ValueError(f"sample_every={cfg.sample_every}: cached_conditions runs load no text encoder to "
                         "sample with; set sample_every=0 (and sample the exported weights with sample/generate.py)")
    return "c" if model == "stage_c" else "b"


class SampleCollage(Hook):
    """The collage hook: a collage every ``sample_every`` updates. It is also due on the first update while it
    has nothing to sample (Stage B, or Stage C without prompts): it keeps that update's loader batch."""

    def __init__(self, run, cfg: TrainConfig, data=None, log_image=None):
        super().__init__(every=cfg.sample_every)
        self.train_run, self.cfg, self.kind = run, cfg, collage_kind(run, cfg)
        self.folder = storage.join(cfg.output_path, cfg.experiment_id, "samples")
        self.log_image = log_image  # (tag, image, step): TensorBoard
        self.count = len(cfg.sample_prompts) if cfg.sample_prompts else SAMPLE_COUNT
        # Training keys are fold_in(key(seed), step): this split is never one of them.
        key = jax.random.key_data(jax.random.split(jax.random.key(cfg.seed))[1])
        self.key = placement.place(key, placement.replicated(run.mesh))
        self.inputs = self.program = self.compiled = self.captions = self.originals = None
        self.decoder, self.caption_source = "stage_a", "first batch"
        if self.kind == "c":
            self.decoder = "previewer" if "previewer" in run.task.frozen_specs(cfg) else "false colour (no previewer)"
            if self.decoder != "previewer":
                log.warning("sample collages: no previewer (set previewer_checkpoint_path); Stage C samples are "
                            "shown as false-colour images of their latent channels (first three principal components)")
            prompts, self.caption_source = _stage_c_prompts(cfg, data, self.count)
            if prompts:
                self._prepare_stage_c(prompts)

    def _tokens(self, texts: list[str]) -> dict:
        tokens = self.train_run.task.tokenizer(list(texts) + [""] * len(texts))
        return {k: np.asarray(v) for k, v in tokens.items()}

    def _place(self, inputs: dict) -> dict:
        if jax.process_count() > 1:  # every process samples the same inputs: process 0's
            from jax.experimental import multihost_utils

            inputs = multihost_utils.broadcast_one_to_all(inputs)
        rep = placement.replicated(self.train_run.mesh)
        return placement.place(inputs, {k: rep for k in inputs})

    def _jit(self, program):
        return jax.jit(program, out_shardings=placement.replicated(self.train_run.mesh))

    def _prepare_stage_c(self, prompts: list[str]):
        run, cfg = self.train_run, self.cfg
        side = math.ceil(cfg.image_size / 32)  # the EfficientNet latents the generator trains on
        shape = (len(prompts), side, side, run.task.generator_config(cfg)["c_in"])
        self.captions, self.inputs = list(prompts), self._place(self._tokens(prompts))
        settings = PRIOR_DEFAULTS.replace(steps=cfg.sample_steps)
        self.program = self._jit(stage_c_program(run.graphdef, cfg.compute_dtype, settings, shape,
                                                 self.decoder == "previewer"))

    def remember(self, loader_batch: dict):
        """Stage B: keep the first images of the first batch (and their captions) to reconstruct; Stage C
        without prompts from the config or the dataset: take the first batch's captions."""
        if self.inputs is not None:
            return
        if self.kind == "c":
            self._prepare_stage_c([str(c) for c in list(loader_batch["captions"])[:self.count]])
            return
        images = np.array(np.asarray(loader_batch["images"])[:self.count])  # a copy: buffers may be reused
        self.captions = [str(c) for c in list(loader_batch["captions"])[:len(images)]]
        height, width = images.shape[1:3]
        hc, wc = stage_c_latent_hw(height, width)
        hb, wb = stage_b_latent_hw(height, width)
        self.originals = images
        self.inputs = self._place({**self._tokens(self.captions),
                                   "effnet_pixels": effnet_pixels(images, (hc * 32, wc * 32))})
        c_latent = self.train_run.task.generator_config(self.cfg)["c_out"]
        settings = DECODER_DEFAULTS.replace(steps=self.cfg.sample_steps)
        self.program = self._jit(stage_b_program(self.train_run.graphdef, self.cfg.compute_dtype, settings,
                                                 (len(images), hb, wb, c_latent)))

    def images(self, state) -> tuple[list[np.ndarray], np.ndarray]:
        """(collage rows, latents) sampled with the state's EMA (or parameters)."""
        if self.program is None:
            raise RuntimeError("sample collage before any batch (Stage B, or Stage C without prompts): call "
                               "remember(batch) first")
        args = (state.ema if state.ema is not None else state.params, self.train_run.frozen, self.inputs, self.key)
        if self.compiled is None:
            with compiling("the sampler of the sample collages"):
                self.compiled = call_abandonably(lambda: self.program.lower(*args).compile())
        latents, decoded = self.compiled(*args)
        latents = _host(latents)
        if self.kind == "c":
            return [false_colour(latents) if decoded is None else to_uint8(_host(decoded))], latents
        decoded = to_uint8(_host(decoded))
        originals = self.originals
        if originals.shape != decoded.shape:  # Stage A decodes 4x its latent; keep the rows aligned
            from cascade_jax.training.losses import resize_nearest

            originals = resize_nearest(originals, decoded.shape[1:3])
        return [originals, decoded], latents

    def due(self, info: StepInfo) -> bool:
        return super().due(info) or (self.inputs is None and info.loader_batch is not None)

    def run(self, info: StepInfo) -> Path | None:
        """Keep the batch if it is the first one; write the collage of update ``info.step`` if it is one."""
        if info.loader_batch is not None:
            self.remember(info.loader_batch)
        self.last_step = info.step
        return self.write(info.step, info.state) if super().due(info) else None

    def write(self, step: int, state) -> Path | None:
        """The collage of ``state`` as ``samples/step_{step}.png`` (process 0; every process samples)."""
        rows, _ = self.images(state)
        if jax.process_index() != 0:
            return None
        meta = {"step": step, "stage": self.kind, "captions": self.captions, "caption_source": self.caption_source,
                "decoder": self.decoder, "weights": "ema" if state.ema is not None else "params",
                "sampler_steps": self.cfg.sample_steps,
                "layout": "generated" if self.kind == "c" else "originals above reconstructions"}
        image = collage(rows, self.captions)
        path = write_png(storage.join(self.folder, f"step_{step:08d}.png"), image, meta)
        if self.log_image is not None:
            self.log_image("samples", image, step)
        say(f"sample collage of update {step}: {path}")
        return path


def _host(array) -> np.ndarray:
    """A replicated global array as numpy on any process (its local copy is the whole array)."""
    return np.asarray(jax.device_get(array.addressable_data(0)))


def _stage_c_prompts(cfg: TrainConfig, data, count: int) -> tuple[list[str] | None, str]:
    """(prompts, where they come from): ``sample_prompts``, else captions of the dataset, else None (the
    first batch's captions are taken when it comes)."""
    if cfg.sample_prompts:
        return list(cfg.sample_prompts), "sample_prompts"
    captions = data.sample_captions(count) if hasattr(data, "sample_captions") else None
    return (captions, "dataset") if captions else (None, "first batch")


def make_sample_collage(run, cfg: TrainConfig, data=None, log_image=None) -> SampleCollage | None:
    """The collage hook when ``sample_every`` is set, else None. ``data``: the training data
    iterator (Stage C prompts with its captions); ``log_image(tag, image, step)``: e.g. TensorBoard's."""
    return SampleCollage(run, cfg, data, log_image) if cfg.sample_every else None
