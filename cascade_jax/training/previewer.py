"""Previewer training task: a quick RGB decoder of Stage C latents.

The official Previewer maps the 16-channel Stage C latent (EfficientNet features of an image)
to an image 8x its size, in [0, 1]. Here the frozen EfficientNet encodes the ImageNet-normalised
image (as the Stage C task does: ``effnet`` from ``effnet_checkpoint_path``, or random weights
from an ``encoders`` pipeline set), and the loss is the per-sample MSE between the Previewer
output and the image resized to that output size (area averaging when the sizes divide,
antialiased bilinear otherwise). Only the Previewer trains (no adaptive loss weight); a subclass may
train more (``trainable``) and let the gradient reach the encoder (``latents``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cascade_jax.training import losses
from cascade_jax.training.config import TrainConfig
from cascade_jax.training.pixel_weights import image_weights
from cascade_jax.training.stage_a import ReconstructionTask, reconstruction_loss
from cascade_jax.training.task import LossAux, param_dtype, register_task


def resize_to(images, size):
    """NHWC float images resized to ``size`` (h, w): area mean for integer factors, else antialiased bilinear."""
    b, h, w, c = images.shape
    out_h, out_w = size
    if (out_h, out_w) == (h, w):
        return images
    if h % out_h == 0 and w % out_w == 0:
        return images.reshape(b, out_h, h // out_h, out_w, w // out_w, c).mean(axis=(2, 4))
    return jax.image.resize(images, (b, out_h, out_w, c), method="linear", antialias=True)


class PreviewerTask(ReconstructionTask):
    generator_model = "previewer"
    default_preset = "previewer"
    frozen = {"effnet": ("effnet", "effnet_encoder", "effnet_checkpoint_path")}

    def latents(self, modules, images01):
        """The frozen encoder's Stage C latents of ``images01`` (no gradient flows into it)."""
        return jax.lax.stop_gradient(self.encode(modules, images01))

    @staticmethod
    def encode(modules, images01):
        effnet = modules.effnet
        x = losses.effnet_normalize(images01).astype(param_dtype(effnet))
        return effnet(x).astype(jnp.float32)

    def loss(self, modules, batch, key, loss_state, cfg: TrainConfig):
        images = losses.images_to_unit(batch["images"])
        generator = modules.generator
        preview = generator(self.latents(modules, images).astype(param_dtype(generator)))
        target = resize_to(images, preview.shape[1:3])
        mse, total = reconstruction_loss(preview, target, cfg.reconstruction.l1_weight, image_weights(cfg.pixel_weights, target))
        return jnp.mean(total), LossAux(mse)


register_task("previewer", PreviewerTask)
