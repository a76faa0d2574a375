"""Stage A training task: the VQGAN as a vector-quantised autoencoder (no official trainer exists).

Images in [0, 1] (NHWC) are encoded, the latents quantised to their nearest codebook rows with
the straight-through gradient of :class:`cascade_jax.models.stage_a.VectorQuantize`, and decoded.
The loss is the reconstruction MSE (plus ``l1_weight`` times the mean absolute error) and the
VQ-VAE terms the quantiser returns: the codebook loss (moves the codes to the latents) and
``vq_beta`` times the commitment loss (keeps the latents near their codes). The latents go
through ``/ scale_factor`` and ``decode``'s ``* scale_factor`` as the model does in the cascade.
The official Paella training adds perceptual and adversarial losses; these are not reproduced.

No diffusion, no frozen model: the logged ``loss`` is the per-sample reconstruction MSE, and
``adaptive_loss_weight`` is refused (nothing to bucket by noise level).

The model's BatchNorm (after the latent projection) runs in inference mode as everywhere in
this project, so during training it is a learned per-channel affine map on fixed statistics.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.models.registry import load_config
from cascade_jax.training import losses
from cascade_jax.training.config import TrainConfig
from cascade_jax.training.task import LossAux, Task, TrainModules, param_dtype, register_task


def per_sample_mean(x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def stage_a_forward(model, images01, vq_beta: float = 0.25):
    """(reconstruction, quantiser loss = codebook + vq_beta * commitment, code indices) of ``images01``."""
    latent = model.down_blocks(model.in_block(images01))
    quantized, (codebook_loss, commit_loss), indices = model.vquantizer(latent)
    reconstruction = model.decode(quantized / model.scale_factor)
    return reconstruction, codebook_loss + vq_beta * commit_loss, indices


def reconstruction_loss(prediction, target, l1_weight: float = 0.0):
    """(per-sample MSE, per-sample MSE + l1_weight * mean absolute error), float32."""
    diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
    mse = per_sample_mean(jnp.square(diff))
    total = mse + l1_weight * per_sample_mean(jnp.abs(diff)) if l1_weight else mse
    return mse, total


class ReconstructionTask(Task):
    """Shared by Stage A and the Previewer: one generator preset, images in, no adaptive weights."""

    adaptive_loss_weight = False
    default_preset: str = ""

    def generator_config(self, cfg: TrainConfig) -> dict:
        if isinstance(cfg.model_config, dict):
            return dict(cfg.model_config)
        return load_config(cfg.model_config or self.default_preset)[1]

    def build(self, cfg: TrainConfig) -> TrainModules:
        work = Path(cfg.output_path)
        if cfg.remat:
            raise ValueError(f"remat={cfg.remat!r}: the {self.generator_model} generator has no remat option; "
                             "leave it unset")
        self.initial_loss_state(cfg)  # a clear error for adaptive_loss_weight before anything is built
        return TrainModules(generator=self.build_generator(cfg, work), **self.build_frozen(cfg, work))

    def host_batch(self, cfg: TrainConfig, batch: dict, rng: np.random.Generator) -> dict:
        return {"images": np.asarray(batch["images"])}


class StageATask(ReconstructionTask):
    generator_model = "stage_a"
    default_preset = "stage_a"

    def loss(self, modules, batch, key, loss_state, cfg: TrainConfig):
        generator = modules.generator
        images = losses.images_to_unit(batch["images"])
        reconstruction, vq_loss, _ = stage_a_forward(generator, images.astype(param_dtype(generator)), cfg.vq_beta)
        mse, total = reconstruction_loss(reconstruction, images, cfg.l1_weight)
        return jnp.mean(total) + vq_loss.astype(jnp.float32), LossAux(mse)


def codebook_usage(indices, codebook_size: int) -> dict:
    """How many codebook rows ``indices`` (from :func:`stage_a_forward`) use, and the perplexity of their use."""
    counts = np.bincount(np.asarray(indices).ravel(), minlength=codebook_size)
    p = counts[counts > 0] / counts.sum()
    return {"codes_used": int((counts > 0).sum()), "codebook_size": int(codebook_size),
            "perplexity": float(np.exp(-np.sum(p * np.log(p))))}


def latent_std(model, images01) -> float:
    """The std of ``encode`` (the Stage B target, already / scale_factor) over ``images01``."""
    return float(jnp.std(nnx.jit(lambda m, x: m.encode(x))(model, jnp.asarray(images01))))


register_task("a", StageATask)
