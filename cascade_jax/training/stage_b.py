"""Stage B training task (official ``train/train_b.py``).

x0 = unquantised Stage A latents of the image (already divided by 0.43); conditions: the
EfficientNet latents of the image resized (nearest) by one factor U(0.5, 1) per batch down to
multiples of 32, zeroed for 10% of the samples, and the pooled CLIP-bigG text embedding (5% of
captions -> ""). The noise is the official pyramid noise. Frozen: Stage A, EfficientNet, CLIP text.

The resize factor changes the EfficientNet input shape, so it is drawn on the host (seeded per
step) and the host resizes; each distinct size compiles the step once (at most 17 per bucket).
With ``cached_conditions`` the batch carries the three conditions (``latent_cache``), each file
at the EfficientNet size its step drew.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from cascade_jax.training import losses
from cascade_jax.training.config import TrainConfig
from cascade_jax.training.pixel_weights import latent_weights
from cascade_jax.training.stage_c import TEXT_TOKENS, encode_text, tokenize_with_drop
from cascade_jax.training.task import Task, TrainModules, param_dtype, register_task, work_dir

EFFNET_KEEP = 0.9  # official: rand <= 0.9 gets EfficientNet latents, the rest zeros


def effnet_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """Official ``int(((size * factor) // 32) * 32)`` per side."""
    return int(((height * factor) // 32) * 32), int(((width * factor) // 32) * 32)


class StageBTask(Task):
    generator_model = "stage_b"
    versions = {"3B": "stage_b", "700M": "stage_b_lite"}

    frozen = {"stage_a": ("stage_a", "stage_a", "stage_a_checkpoint_path"),
              "effnet": ("effnet", "effnet_encoder", "effnet_checkpoint_path"),
              "text_encoder": ("clip_text", "clip_text_bigg14", "clip_text_model_name")}

    cached_keys = ("x0", "effnet", "clip_text_pooled")

    def build(self, cfg: TrainConfig) -> TrainModules:
        work = work_dir(cfg)
        modules = TrainModules(generator=self.build_generator(cfg, work), **self.build_frozen(cfg, work))
        if not cfg.cached_conditions:
            self.tokenizer = self.tokenizer_for(cfg)
        return modules

    def host_batch(self, cfg: TrainConfig, batch: dict, rng: np.random.Generator) -> dict:
        if cfg.cached_conditions:
            return self.read_cached(batch)
        images = np.asarray(batch["images"])
        tokens = tokenize_with_drop(self.tokenizer, batch["captions"], rng)
        size = effnet_size(images.shape[1], images.shape[2], rng.uniform(0.5, 1))
        keep = rng.random(len(images)) <= EFFNET_KEEP
        return {"images": images, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                "effnet_images": losses.resize_nearest(images, size), "effnet_keep": keep.astype(np.float32)}

    def plan_batch(self, cfg: TrainConfig) -> dict:
        """At the largest EfficientNet size of the bucket (resize factor 1), the costliest step."""
        b, s, generator = cfg.batch_size, cfg.image_size, self.generator_config(cfg)
        e = (s // 32) * 32
        if cfg.cached_conditions:  # Stage A latents 4x smaller, EfficientNet's 32x smaller than its input
            return {"x0": ((b, s // 4, s // 4, generator.get("c_in", 4)), jnp.float32),
                    "effnet": ((b, e // 32, e // 32, generator.get("c_effnet", 16)), jnp.float32),
                    "clip_text_pooled": ((b, 1, generator.get("c_clip", 1280)), jnp.float32)}
        return {**super().plan_batch(cfg), "input_ids": ((b, TEXT_TOKENS), np.int32),
                "attention_mask": ((b, TEXT_TOKENS), np.int32), "effnet_images": ((b, e, e, 3), np.uint8),
                "effnet_keep": ((b,), np.float32)}

    def conditions(self, modules, batch):
        """(x0 Stage A latents, EfficientNet latents, pooled CLIP text) from a device batch, without gradients."""
        cached = self.cached_conditions(batch)
        if cached is not None:
            return cached
        images = losses.images_to_unit(batch["images"])
        x0 = modules.stage_a.encode(images.astype(param_dtype(modules.stage_a))).astype(jnp.float32)
        effnet_in = losses.effnet_normalize(losses.images_to_unit(batch["effnet_images"]))
        effnet = modules.effnet(effnet_in.astype(param_dtype(modules.effnet))).astype(jnp.float32)
        effnet = effnet * batch["effnet_keep"][:, None, None, None]
        _, pooled = encode_text(modules.text_encoder, batch["input_ids"], batch["attention_mask"])
        return jax.lax.stop_gradient((x0, effnet, pooled))

    def loss(self, modules, batch, key, loss_state, cfg: TrainConfig):
        x0, effnet, pooled = self.conditions(modules, batch)
        key_t, key_eps, key_pyramid, key_dropout = jax.random.split(key, 4)
        t = losses.sample_train_t(key_t, x0.shape[0])
        epsilon = jax.random.normal(key_eps, x0.shape, jnp.float32)
        if cfg.pyramid_noise_sizes is not None:
            epsilon = losses.pyramid_noise(key_pyramid, epsilon, size_range=tuple(cfg.pyramid_noise_sizes))
        generator = modules.generator
        dtype = param_dtype(generator)

        def apply(noised, noise_cond):
            return generator(noised.astype(dtype), noise_cond, effnet.astype(dtype), pooled.astype(dtype),
                             rngs=key_dropout)

        weights = latent_weights(cfg.pixel_weights, batch.get("images"), x0.shape[1:3])
        return losses.denoising_loss(apply, x0, t, epsilon, losses.make_gdf(cfg.adaptive_loss_weight), loss_state,
                                     weights)


register_task("b", StageBTask)
