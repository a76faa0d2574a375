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
this project, so during training it is a learned per-channel affine map on fixed statistics and
the latent scale is free: it shrinks as the codebook and commitment losses pull codes and latents
together (measured: std 0.27 after 300 tiny updates). :func:`normalize_latents` folds a scale and
shift into the trained model so that ``encode`` gives the Stage B target unit variance.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.models.registry import load_config
from cascade_jax.training import losses
from cascade_jax.training.config import TrainConfig
from cascade_jax.training.pixel_weights import image_weights
from cascade_jax.training.task import LossAux, Task, TrainModules, param_dtype, register_task, work_dir


def per_sample_mean(x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


class StageAOutput(NamedTuple):
    reconstruction: jax.Array  # decode(quantized latent), as the official forward with quantize=True
    vq_loss: jax.Array  # codebook loss + vq_beta * commitment loss
    indices: jax.Array  # (B, H/4, W/4) code of every latent position
    latent: jax.Array  # the unquantised latent / scale_factor (what encode returns: the Stage B target)


def stage_a_forward(model, images01, vq_beta: float = 0.25) -> StageAOutput:
    latent = model.down_blocks(model.in_block(images01))
    quantized, (codebook_loss, commit_loss), indices = model.vquantizer(latent)
    reconstruction = model.decode(quantized / model.scale_factor)
    return StageAOutput(reconstruction, codebook_loss + vq_beta * commit_loss, indices, latent / model.scale_factor)


# Jitted once for the module: models of one structure and input shape share a compile.
jit_stage_a_forward = nnx.jit(stage_a_forward)


def reconstruction_loss(prediction, target, l1_weight: float = 0.0, weights=None):
    """(per-sample MSE, per-sample weighted MSE + l1_weight * mean absolute error), float32.

    ``weights`` (B, H, W, 1; ``pixel_weights.image_weights`` of the target) weigh the optimised squared error;
    the first value stays the plain MSE, for logs comparable across settings."""
    diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
    mse = per_sample_mean(jnp.square(diff))
    if weights is not None:
        total = per_sample_mean(weights * jnp.square(diff))
    else:
        total = mse
    return mse, total + l1_weight * per_sample_mean(jnp.abs(diff)) if l1_weight else total


class ReconstructionTask(Task):
    """Shared by Stage A and the Previewer: one generator preset, images in, no adaptive weights."""

    adaptive_loss_weight = False
    default_preset: str = ""
    inits = ("checkpoint", "scratch")  # the official rules (training/init.py) are Stage B's and C's

    def generator_config(self, cfg: TrainConfig) -> dict:
        if isinstance(cfg.model_config, dict):
            return dict(cfg.model_config)
        return load_config(cfg.model_config or self.default_preset)[1]

    def build(self, cfg: TrainConfig) -> TrainModules:
        work = work_dir(cfg)
        self.check_options(cfg)
        return TrainModules(generator=self.build_generator(cfg, work), **self.build_frozen(cfg, work))

    def abstract_modules(self, cfg: TrainConfig) -> TrainModules:
        self.check_options(cfg)
        return super().abstract_modules(cfg)

    def check_options(self, cfg: TrainConfig):
        """Clear errors for options these generators lack, before anything is built."""
        if cfg.remat:
            raise ValueError(f"remat={cfg.remat!r}: the {self.generator_model} generator has no remat option; "
                             "leave it unset")
        self.initial_loss_state(cfg)  # refuses adaptive_loss_weight

    def host_batch(self, cfg: TrainConfig, batch: dict, rng: np.random.Generator) -> dict:
        return {"images": np.asarray(batch["images"])}


class StageATask(ReconstructionTask):
    generator_model = "stage_a"
    default_preset = "stage_a"

    def loss(self, modules, batch, key, loss_state, cfg: TrainConfig):
        generator = modules.generator
        images = losses.images_to_unit(batch["images"])
        out = stage_a_forward(generator, images.astype(param_dtype(generator)), cfg.reconstruction.vq_beta)
        mse, total = reconstruction_loss(out.reconstruction, images, cfg.reconstruction.l1_weight,
                                         image_weights(cfg.pixel_weights, images))
        return jnp.mean(total) + out.vq_loss.astype(jnp.float32), LossAux(mse)


def codebook_usage(indices, codebook_size: int) -> dict:
    """How many codebook rows ``indices`` (from :func:`stage_a_forward`) use, and the perplexity of their use."""
    counts = np.bincount(np.asarray(indices).ravel(), minlength=codebook_size)
    p = counts[counts > 0] / counts.sum()
    return {"codes_used": int((counts > 0).sum()), "codebook_size": int(codebook_size),
            "perplexity": float(np.exp(-np.sum(p * np.log(p))))}


def normalize_latents(model, images01, target_std: float = 1.0) -> tuple[float, np.ndarray]:
    """Fold a scale and shift into ``model`` (in place) so that ``encode`` of ``images01`` has per-channel
    mean 0 and overall std ``target_std``; returns (scale, shift) in the latent space before / scale_factor.

    Trained with its BatchNorm as a fixed affine map, the latents drift in scale (the codebook and
    commitment losses shrink with them, the decoder compensates), while Stage B wants roughly unit
    variance. The latent BatchNorm's affine, the codebook and the decoder's first 1x1 conv absorb
    ``z -> scale * (z - shift)``: scale_factor stays as it is, the nearest codes (a similarity
    transform keeps them) and the reconstruction are unchanged up to rounding.
    """
    out = jit_stage_a_forward(model, jnp.asarray(images01))
    raw = np.asarray(out.latent, np.float64) * model.scale_factor
    shift = raw.mean(axis=(0, 1, 2))
    scale = float(target_std * model.scale_factor / np.std(raw - shift))
    norm = model.down_blocks[-1][1]
    if norm.weight is None:
        raise ValueError("normalize_latents needs the latent BatchNorm's affine weight and bias")
    first = model.up_blocks[0][0]

    def update(var, value):
        var.set_value(jnp.asarray(value, var.dtype))

    w, b = np.asarray(norm.weight[...], np.float64), np.asarray(norm.bias[...], np.float64)
    update(norm.weight, scale * w)
    update(norm.bias, scale * (b - shift))
    update(model.vquantizer.codebook.weight, scale * (np.asarray(model.vquantizer.codebook.weight[...]) - shift))
    conv = np.asarray(first.weight[...], np.float64)  # (1, 1, c_latent, c_out)
    update(first.bias, np.asarray(first.bias[...], np.float64) + shift @ conv[0, 0])
    update(first.weight, conv / scale)
    return scale, shift.astype(np.float32)


register_task("a", StageATask)
