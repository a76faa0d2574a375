"""Image conversions at the pipeline's edges (files / PIL / uint8 arrays <-> model inputs and outputs).

PIL images of any mode become 8-bit RGB without silent damage: 16-bit (I;16*, and I, read as the
16-bit range of 16-bit PNGs) and float (F, read as [0, 1]) grey images are scaled to 0-255, not
clipped; images with transparency (RGBA, LA, PA, P with a transparent colour) are composited on
``background`` (white unless given); values a mode cannot hold are refused by name.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from cascade_jax import storage
from cascade_jax.data.clip_preprocess import preprocess_images
from cascade_jax.pipelines.sizes import SIZE_MULTIPLE

# torchvision's ImageNet normalisation, which the official EfficientNet preprocessing uses.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def to_uint8(images) -> np.ndarray:
    """Model output in [0, 1] (B, H, W, 3) -> uint8, clamped as the official code does."""
    return np.asarray(_to_uint8(images))


@jax.jit
def _to_uint8(images):
    # One compiled program: op by op, the four array ops cost a sampling call ~1 ms of host dispatch.
    return jnp.round(jnp.clip(images.astype(jnp.float32), 0, 1) * 255).astype(jnp.uint8)


ALPHA_BACKGROUND = (255, 255, 255)  # what transparent pixels become: white
_SIXTEEN_BIT = 65535


def _grey_to_uint8(values: np.ndarray, scale: float, mode: str) -> np.ndarray:
    values = values.astype(np.float64)
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > scale:
        raise ValueError(f"a mode {mode} image must hold values in [0, {scale:g}] "
                         f"(got {np.nanmin(values):g} .. {np.nanmax(values):g}); convert it to 8-bit RGB first")
    grey = np.round(values / scale * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def to_rgb_uint8(image: Image.Image, background=ALPHA_BACKGROUND) -> np.ndarray:
    """A PIL image of any mode -> (H, W, 3) uint8: high bit depths scaled, transparency composited."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        return _grey_to_uint8(np.asarray(image), _SIXTEEN_BIT, mode)
    if mode == "F":
        return _grey_to_uint8(np.asarray(image), 1.0, mode)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*(int(c) for c in background), 255))
        return np.asarray(Image.alpha_composite(base, rgba).convert("RGB"))
    try:
        return np.asarray(image.convert("RGB"))
    except ValueError as e:
        raise ValueError(f"cannot convert a mode {mode} image to RGB ({e}); save it as RGB first") from None


def pixel_limit(max_pixels: int | None = None) -> int:
    """The most pixels an input image may have: ``max_pixels``, else PIL's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``, read at call time so a process may change it)."""
    return int(Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels)


def check_pixels(width: int, height: int, name, max_pixels: int | None = None):
    """Refuse an image of ``width`` x ``height`` over ``pixel_limit(max_pixels)``, naming it (``name``)."""
    limit = pixel_limit(max_pixels)
    if width * height > limit:
        raise ValueError(f"{name} is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the limit of "
                         f"{limit / 1e6:.1f} megapixels (refused as a possible decompression bomb before decoding "
                         "it); resize it first")


def local_file(path, name) -> Path:
    """A local file to read for the input ``path``: itself, or for an object in a bucket (``gs://``,
    ``s3://``) a cached local copy (fetched again only when the object changes); ``ValueError`` naming
    ``name`` when it is missing or a folder."""
    if storage.is_url(path):
        try:
            if storage.isfile(path):
                return storage.local_copy(path)
            problem = "is a folder" if storage.isdir(path) else "no such object"
        except OSError as e:  # a missing bucket, no permission, retries used up: the storage layer says which
            raise ValueError(f"{name}: {e}") from None
        raise ValueError(f"{name}: {problem}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{name}: {'is a folder' if path.is_dir() else 'no such file'}")
    return path


@contextlib.contextmanager
def open_checked(source, name=None, max_pixels: int | None = None):
    """``Image.open`` of a path or URL (or bytes / a file object) with its size checked from the header, before
    any pixel is decoded; every failure is one ``ValueError`` naming ``name`` (default: the path)."""
    if isinstance(source, (str, Path)):
        name = name or f"image file {source}"
        source = local_file(source, name)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    name = name or "the image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                check_pixels(*image.size, name, max_pixels)
                yield image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{name}: refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ValueError(f"{name}: not an image file PIL can read") from None
    except (OSError, SyntaxError) as e:  # truncated or corrupt data (PIL raises SyntaxError for some formats)
        raise ValueError(f"{name}: cannot read it ({e})") from None


def image_size(path, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) of an image file from its header (nothing decoded), refused as ``open_checked`` refuses."""
    with open_checked(path, max_pixels=max_pixels) as image:
        return image.height, image.width


def load_image(path, background=ALPHA_BACKGROUND, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 (see ``to_rgb_uint8``); every failure is one ``ValueError``
    naming the file: missing, a folder, not an image, truncated, or over ``pixel_limit(max_pixels)``
    (checked before decoding)."""
    name = f"image file {path}"
    with open_checked(path, name, max_pixels) as image:
        try:
            image.load()
            return to_rgb_uint8(image, background)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None


def load_grey(path, max_pixels: int | None = None) -> np.ndarray:
    """An image file as (H, W) uint8 luminance (e.g. a mask), checked as ``load_image`` checks."""
    with open_checked(path, max_pixels=max_pixels) as image:
        return np.asarray(image.convert("L"))


def as_uint8_batch(images) -> np.ndarray:
    """A PIL image, a list of them, or uint8 arrays (H, W, 3)/(B, H, W, 3) -> (B, H, W, 3) uint8."""
    if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
        images = [images]
    arrays = [to_rgb_uint8(im) if isinstance(im, Image.Image) else np.asarray(im) for im in images]
    if not arrays:
        raise ValueError("no images given")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images in one call must share a size, got {sorted(shapes)}")
    batch = np.stack(arrays)
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images (H, W, 3), got {batch.dtype} {batch.shape[1:]}")
    return batch


def round_size(side: int) -> int:
    """The output side used for an input image side (down to a multiple of 8)."""
    return max(SIZE_MULTIPLE, side // SIZE_MULTIPLE * SIZE_MULTIPLE)


def effnet_pixels(images, size: tuple[int, int]) -> np.ndarray:
    """uint8 images -> ImageNet-normalised float32 NHWC at ``size`` (bilinear, antialiased)."""
    batch = as_uint8_batch(images)
    h, w = size
    resized = [np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR)) for im in batch]
    return ((np.stack(resized).astype(np.float32) / 255.0) - IMAGENET_MEAN) / IMAGENET_STD


def clip_pixels(images) -> np.ndarray:
    """uint8 images -> CLIP-L pixel values (B, 224, 224, 3), as CLIPImageProcessor makes them."""
    return preprocess_images(list(as_uint8_batch(images)))
