"""Stage C training task (official ``train/train_c.py``).

x0 = EfficientNet latents of the image; conditions: CLIP-bigG text hidden states (last layer,
before the final norm) and pooled embedding with 5% of captions replaced by "", and CLIP-L image
embeddings for 10% of the samples, zeros otherwise. Frozen: EfficientNet, both CLIP encoders,
and the Previewer when sample collages are on (``sample_every``) and ``previewer_checkpoint_path``
or the ``encoders`` set provides it (``training/samples.py`` shows the latents in false colour
without one).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cascade_jax import storage
from cascade_jax.data.clip_preprocess import preprocess_images
from cascade_jax.training import losses
from cascade_jax.training.config import TrainConfig
from cascade_jax.training.pixel_weights import latent_weights
from cascade_jax.training.task import (Task, TrainModules, frozen_source, param_dtype, register_task,
                                     work_dir)

CAPTION_DROP = 0.05  # official: rand > 0.05 keeps the caption
IMAGE_EMBED_SHARE = 0.1  # official: rand > 0.9 gets a CLIP image embedding
TEXT_TOKENS = 77  # CLIP's context: what the tokenizer pads every caption to


def tokenize_with_drop(tokenizer, captions, rng: np.random.Generator, drop: float = CAPTION_DROP) -> dict:
    keep = rng.random(len(captions)) > drop
    return tokenizer([str(c) if k else "" for c, k in zip(captions, keep)])


def encode_text(text_encoder, input_ids, attention_mask):
    out = text_encoder(input_ids, attention_mask)
    return out.last_hidden_state_pre_norm, out.text_embeds[:, None, :]


class StageCTask(Task):
    generator_model = "stage_c"
    versions = {"3.6B": "stage_c", "1B": "stage_c_lite"}

    frozen = {"effnet": ("effnet", "effnet_encoder", "effnet_checkpoint_path"),
              "text_encoder": ("clip_text", "clip_text_bigg14", "clip_text_model_name"),
              "image_encoder": ("clip_vision", "clip_vision_l14", "clip_image_model_name")}

    # Frozen only for the sample collages: loaded when wanted_previewer(cfg) says so.
    optional_frozen = {"previewer": ("previewer", "previewer", "previewer_checkpoint_path")}

    cached_keys = ("x0", "clip_text", "clip_text_pooled", "clip_img")

    def wanted_previewer(self, cfg: TrainConfig) -> bool:
        """Sampling is on and weights are named: a previewer_checkpoint_path, or a previewer in the encoders set."""
        if not cfg.sample_every or cfg.cached_conditions:
            return False
        return self.previewer_named(cfg)

    def previewer_named(self, cfg: TrainConfig) -> bool:
        if cfg.previewer_checkpoint_path is not None:
            return True
        if cfg.encoders is None:
            return False
        from cascade_jax.pipelines.loading import pipeline_set

        return "previewer" in pipeline_set(cfg.encoders)

    def frozen_specs(self, cfg: TrainConfig) -> dict:
        specs = super().frozen_specs(cfg)
        if self.wanted_previewer(cfg):
            from cascade_jax.models.registry import load_config
            from cascade_jax.pipelines.loading import pipeline_set

            model, preset, _ = self.optional_frozen["previewer"]
            from_set = cfg.previewer_checkpoint_path is None
            specs["previewer"] = pipeline_set(cfg.encoders)["previewer"] if from_set else (model, load_config(preset)[1])
        return specs

    def frozen_sources(self, cfg: TrainConfig, work_dir: Path) -> dict:
        """The frozen models' sources, and the Previewer's when one is named (exported with Stage C whether or
        not the collages used it: it previews these EfficientNet latents)."""
        sources = super().frozen_sources(cfg, work_dir)
        if self.previewer_named(cfg):
            model, preset, path_key = self.optional_frozen["previewer"]
            path = cfg.get(path_key)
            if path is not None and not storage.exists(path):
                if not self.wanted_previewer(cfg):
                    return sources  # named for collages that are off: nothing to preview with or export
                raise FileNotFoundError(f"{path_key}={path}: no such file or folder; name the previewer weights, or "
                                        f"set {path_key}: null to show sample latents in false colour")
            sources["previewer"] = frozen_source(model, cfg, path, "previewer", work_dir, preset=preset)
        return sources

    def frozen_to_build(self, cfg: TrainConfig) -> tuple[str, ...]:
        return (*super().frozen_to_build(cfg), *(("previewer",) if self.wanted_previewer(cfg) else ()))

    def build(self, cfg: TrainConfig) -> TrainModules:
        work = work_dir(cfg)
        modules = TrainModules(generator=self.build_generator(cfg, work), **self.build_frozen(cfg, work))
        if not cfg.cached_conditions:
            self.tokenizer = self.tokenizer_for(cfg)
            self.clip_image_size = modules.image_encoder.vision_model.embeddings.image_size
        return modules

    def plan_batch(self, cfg: TrainConfig) -> dict:
        b, s = cfg.batch_size, cfg.image_size
        if cfg.cached_conditions:
            side, generator = -(-s // 32), self.generator_config(cfg)  # EfficientNet latents: 32x smaller
            return {"x0": ((b, side, side, generator.get("c_in", 16)), jnp.float32),
                    "clip_text": ((b, TEXT_TOKENS, generator.get("c_clip_text", 1280)), jnp.bfloat16),
                    "clip_text_pooled": ((b, 1, generator.get("c_clip_text_pooled", 1280)), jnp.bfloat16),
                    "clip_img": ((b, 1, generator.get("c_clip_img", 768)), jnp.bfloat16)}
        clip = self.frozen_specs(cfg)["image_encoder"][1].get("image_size", 224)
        return {**super().plan_batch(cfg), "input_ids": ((b, TEXT_TOKENS), np.int32),
                "attention_mask": ((b, TEXT_TOKENS), np.int32), "clip_pixels": ((b, clip, clip, 3), np.float32),
                "use_image": ((b,), np.float32)}

    def host_batch(self, cfg: TrainConfig, batch: dict, rng: np.random.Generator) -> dict:
        if cfg.cached_conditions:
            return self.read_cached(batch)
        images = np.asarray(batch["images"])
        tokens = tokenize_with_drop(self.tokenizer, batch["captions"], rng)
        use_image = rng.random(len(images)) > 1 - IMAGE_EMBED_SHARE
        size = self.clip_image_size
        pixels = np.zeros((len(images), size, size, 3), np.float32)
        if use_image.any():
            pixels[use_image] = preprocess_images(list(images[use_image]), size=size, crop_size=size)
        return {"images": images, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                "clip_pixels": pixels, "use_image": use_image.astype(np.float32)}

    def conditions(self, modules, batch):
        """(x0 latents, clip_text, clip_text_pooled, clip_img) from a device batch, without gradients."""
        cached = self.cached_conditions(batch)
        if cached is not None:
            return cached
        dtype = param_dtype(modules.effnet)
        x0 = modules.effnet(losses.effnet_normalize(losses.images_to_unit(batch["images"])).astype(dtype))
        clip_text, pooled = encode_text(modules.text_encoder, batch["input_ids"], batch["attention_mask"])
        image_embeds = modules.image_encoder(batch["clip_pixels"].astype(param_dtype(modules.image_encoder))).image_embeds
        clip_img = (image_embeds.astype(jnp.float32) * batch["use_image"][:, None])[:, None, :]
        return jax.lax.stop_gradient((x0.astype(jnp.float32), clip_text, pooled, clip_img))

    def loss(self, modules, batch, key, loss_state, cfg: TrainConfig):
        x0, clip_text, pooled, clip_img = self.conditions(modules, batch)
        key_noise, key_dropout = jax.random.split(key)
        t, epsilon = losses.draw_t_and_noise(key_noise, x0.shape)
        generator = modules.generator
        dtype = param_dtype(generator)

        def apply(noised, noise_cond):
            return generator(noised.astype(dtype), noise_cond, clip_text.astype(dtype), pooled.astype(dtype),
                             clip_img.astype(dtype), rngs=key_dropout)

        weights = latent_weights(cfg.pixel_weights, batch.get("images"), x0.shape[1:3])
        return losses.denoising_loss(apply, x0, t, epsilon, losses.make_gdf(cfg.adaptive_loss_weight), loss_state,
                                     weights)


register_task("c", StageCTask)
