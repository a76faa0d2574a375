"""Per-pixel loss weights: the plug-in point for a project's own emphasis in the training losses.

A training config names a function by its import path, with the keyword arguments it is called with::

    pixel_weights:
      function: package.module:name
      some_weight: 5.0

``function(images01, **arguments)`` gets a batch's target images, (B, H, W, 3) float32 in [0, 1], and returns
(B, H, W, 1) weights with mean 1 per sample. Stage A and the Previewer weigh their squared reconstruction error
by them, Stage B and Stage C their denoising error per latent position (the mean weight of the position's
pixels, renormalised); the logged per-sample losses stay the plain MSE. Without ``pixel_weights`` every pixel
weighs 1. The function is imported and called once on a small image when the config loads
(:func:`check_pixel_weights`), so a wrong path or argument is named before anything is built.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np

FUNCTION_KEY = "function"


def weight_function(spec: dict):
    """(the function ``spec[FUNCTION_KEY]`` names, the other entries as its keyword arguments)."""
    path = spec.get(FUNCTION_KEY) if isinstance(spec, dict) else None
    if not isinstance(path, str) or path.count(":") != 1:
        raise ValueError(f"pixel_weights={spec!r}: use a mapping with {FUNCTION_KEY}: 'package.module:name' and "
                         "the function's keyword arguments")
    module_name, name = path.split(":")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"pixel_weights.{FUNCTION_KEY}={path!r} cannot be imported ({err}); name an importable "
                         "module and a function in it") from None
    if not callable(function):
        raise ValueError(f"pixel_weights.{FUNCTION_KEY}={path!r} is not a function")
    return function, {k: v for k, v in spec.items() if k != FUNCTION_KEY}


def check_pixel_weights(spec: dict):
    """Call the plug-in once on a 2x8x8 grey image with a bright square: a wrong argument, or weights of the
    wrong shape, are refused by name now rather than inside the compiled step."""
    function, arguments = weight_function(spec)
    images = np.full((2, 8, 8, 3), 0.5, np.float32)
    images[:, 2:5, 2:5] = 1.0
    try:
        weights = function(jnp.asarray(images), **arguments)
    except (TypeError, ValueError) as err:
        raise ValueError(f"pixel_weights: {spec[FUNCTION_KEY]}({', '.join(map(str, arguments))}) refused its "
                         f"arguments: {err}") from None
    if getattr(weights, "shape", None) != (2, 8, 8, 1):
        raise ValueError(f"pixel_weights: {spec[FUNCTION_KEY]} returned weights of shape "
                         f"{getattr(weights, 'shape', None)} for images of shape (2, 8, 8, 3); return (B, H, W, 1)")


def image_weights(spec: dict | None, images01):
    """The plug-in's (B, H, W, 1) weights of ``images01`` (no gradient flows into them), or None without one."""
    if spec is None:
        return None
    function, arguments = weight_function(spec)
    return jax.lax.stop_gradient(function(images01, **arguments))


def latent_weights(spec: dict | None, images, latent_hw):
    """``image_weights`` of uint8 ``images`` averaged over each latent position's pixels (the image side must
    be a multiple of the latent side) and renormalised: (B, h, w, 1), mean 1 per sample; None without a plug-in."""
    if spec is None:
        return None
    return pooled_weights(image_weights(spec, images.astype(jnp.float32) / 255.0), latent_hw)


def pooled_weights(pixels, latent_hw):
    """(B, H, W, 1) pixel weights averaged per latent position, renormalised to mean 1 per sample."""
    b, height, width, _ = pixels.shape
    h, w = latent_hw
    if height % h or width % w:
        raise ValueError(f"pixel weights: image {height}x{width} is not a multiple of the latent {h}x{w}")
    pooled = pixels.reshape(b, h, height // h, w, width // w, 1).mean(axis=(2, 4))
    return jax.lax.stop_gradient(pooled / jnp.mean(pooled, axis=(1, 2, 3), keepdims=True))
