"""BatchNorm statistics of a frozen random network, measured on data.

A randomly initialised network in inference mode normalises with running statistics that have
nothing to do with its activations: features drift in scale layer after layer, and a frozen
random EfficientNet gives latents of arbitrary mean and variance. :func:`calibrate_batchnorm`
runs the data through the network once with every ``BatchNorm2d`` normalising with the
statistics of its own input (torch's training mode), and stores those statistics as the running
mean and (biased) variance. Layers are reached in forward order, so each one measures its input
as produced by the already calibrated layers before it; afterwards the inference forward on the
calibration data equals that pass, every BatchNorm output has per-channel mean 0 and variance 1
(before its affine), and so has the EfficientNet latent (its mapper ends in a BatchNorm without
affine).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cascade_jax.nn.layers import BatchNorm2d


class _MeasuringBatchNorm2d(BatchNorm2d):
    """A BatchNorm2d that first sets its running statistics to those of its input, then normalises."""

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        self.running_mean.set_value(jnp.mean(x32, axis=(0, 1, 2)).astype(self.running_mean.dtype))
        self.running_var.set_value(jnp.var(x32, axis=(0, 1, 2)).astype(self.running_var.dtype))
        return super().__call__(x)


def batchnorm_layers(model: nnx.Module) -> list[BatchNorm2d]:
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, BatchNorm2d)]


@contextlib.contextmanager
def measuring_batchnorms(model: nnx.Module):
    """Within the block every BatchNorm2d of ``model`` records its input statistics as it runs."""
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm2d layer to calibrate")
    for layer in layers:
        layer.__class__ = _MeasuringBatchNorm2d
    try:
        yield layers
    finally:
        for layer in layers:
            layer.__class__ = BatchNorm2d


def calibrate_batchnorm(model: nnx.Module, inputs, *, call=None) -> nnx.Module:
    """Set the running mean/var of every BatchNorm2d of ``model`` from ``inputs`` (in place; returned).

    ``inputs``: what the model is called with (for an EfficientNet: ImageNet-normalised NHWC
    images, see :func:`effnet_inputs`), all of it in one batch: the statistics are those of the
    whole set. ``call(model, inputs)`` replaces ``model(inputs)`` (e.g. ``lambda m, x: m.encode(x)``).
    """
    call = call or (lambda m, x: m(x))
    with measuring_batchnorms(model):
        jax.block_until_ready(nnx.jit(call)(model, jnp.asarray(inputs)))
    return model


def effnet_inputs(images) -> np.ndarray:
    """uint8 images (or floats in [0, 1]), NHWC, as the EfficientNet expects them (ImageNet-normalised)."""
    from cascade_jax.training.losses import IMAGENET_MEAN, IMAGENET_STD

    images = np.asarray(images)
    unit = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    return (unit - IMAGENET_MEAN) / IMAGENET_STD


def calibrated_effnet(config: dict, images, *, seed: int = 0, out_dir=None) -> nnx.Module:
    """A random EfficientNetEncoder(**config) with BatchNorm statistics from ``images`` (uint8 NHWC).

    With ``out_dir`` it is also written as a converted directory (plus official safetensors)
    that ``load_model`` and the trainers' ``effnet_checkpoint_path`` read.
    """
    from cascade_jax.models.random_init import random_model

    model = calibrate_batchnorm(random_model("effnet", config, seed=seed), effnet_inputs(images))
    if out_dir is not None:
        save_model(model, "effnet", config, out_dir)
    return model


def save_model(model: nnx.Module, model_name: str, config: dict, out_dir):
    """``model`` as a converted directory ``out_dir`` and ``out_dir.safetensors`` (official names)."""
    from cascade_jax.nn.params import named_variables
    from cascade_jax.training.export import export_generator

    arrays = {k: np.asarray(v[...]) for k, v in named_variables(model).items()}
    return export_generator(Path(out_dir), model_name, config, arrays)
