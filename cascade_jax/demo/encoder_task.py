"""The demo's ``effnet`` step as a task of the library's trainer (``stage: cascade_jax.demo.encoder_task:
EncoderPreviewerTask`` in configs/training/demo_effnet.yaml): the Previewer task with the EfficientNet
training too, an autoencoder whose code is the Stage C latent. That is how the demo gets an encoder for a
domain no pretrained one knows: a random encoder keeps the background and the place but loses the shape's
colour, which Stage C would then never see.
"""

from __future__ import annotations

from flax import nnx

from cascade_jax.training.previewer import PreviewerTask


class EncoderPreviewerTask(PreviewerTask):
    def trainable(self, cfg):
        return lambda path, variable: bool(path) and path[0] in ("generator", "effnet") and isinstance(
            variable, nnx.Param)

    def latents(self, modules, images01):
        return self.encode(modules, images01)  # the gradient reaches the encoder
