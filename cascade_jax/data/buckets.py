"""Multi-aspect buckets as the official ``Bucketeer``, with one bucket per global step.

Official rules (``core/data/bucketeer.py``): the configured ratios (w/h, written ``"9/16"``) plus
their reciprocals, each giving a bucket (H, W) = (floor(sqrt(d/r)/32)*32, floor(sqrt(d*r)/32)*32)
with d = image_size**2; an image goes to the bucket of the closest ratio, is resized (bilinear,
antialiased) so it covers the bucket, then randomly cropped. The official trainer picks buckets per
rank from the data it happens to hold; under SPMD every host must feed the same shape at a step,
so here the step's bucket is a pure function of (seed, step): drawn from the aspect-ratio
frequencies of a probe of the data that every host reads identically, or, for the official 5%
(``bucketeer_random_ratio``), uniformly.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from PIL import Image

FACTOR = 32


def parse_ratio(value) -> float:
    """``"9/16"``, ``0.5625`` or ``Fraction(9, 16)`` -> 0.5625 (w/h), as the official ``Fraction(f)``."""
    try:
        ratio = float(Fraction(str(value).strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"aspect ratio {value!r} is not a number or a fraction such as '9/16'") from None
    if ratio <= 0:
        raise ValueError(f"aspect ratio {value!r} must be positive")
    return ratio


def bucket_ratios(multi_aspect_ratio) -> list[float]:
    """The ratios and their reciprocals, in the official order (reciprocals appended, no repeats)."""
    ratios = [parse_ratio(r) for r in multi_aspect_ratio]
    for r in list(ratios):
        if 1 / r not in ratios:
            ratios.append(1 / r)
    return ratios


def bucket_sizes(image_size: int, ratios: list[float]) -> list[tuple[int, int]]:
    """(H, W) per ratio at density image_size**2, sides floored to multiples of 32."""
    density = image_size**2
    sizes = [(int((density / r) ** 0.5 // FACTOR * FACTOR), int((density * r) ** 0.5 // FACTOR * FACTOR))
             for r in ratios]
    for ratio, (h, w) in zip(ratios, sizes):
        if h < FACTOR or w < FACTOR:
            raise ValueError(f"aspect ratio {ratio:.4g} at image_size {image_size} gives bucket {h}x{w}; "
                             f"sides must be at least {FACTOR}: use a larger image_size or a milder ratio")
    return sizes


def closest_bucket(width: int, height: int, ratios: list[float]) -> int:
    """Index of the ratio closest to w/h (first one on ties, as numpy's argmin in the official code)."""
    return int(np.argmin([abs(width / height - r) for r in ratios]))


def cover_size(orig_hw: tuple[int, int], target_hw: tuple[int, int]) -> int:
    """The official ``get_resize_size``: the shorter-side length for a resize that covers the bucket."""
    (oh, ow), (th, tw) = orig_hw, target_hw
    if (tw / th - 1) * (ow / oh - 1) >= 0:
        return max(int(math.ceil(max(th, tw) * min(oh, ow) / max(oh, ow))), min(th, tw))
    return max(int(math.ceil(min(th, tw) * max(oh, ow) / min(oh, ow))), max(th, tw))


def resize_and_crop(image: Image.Image, target_hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Shorter side to ``cover_size`` (bilinear, antialiased), then a random crop to (H, W): uint8 HWC."""
    th, tw = target_hw
    ow, oh = image.size
    short = cover_size((oh, ow), target_hw)
    # torchvision's int resize: the shorter side becomes `short`, the longer int(short * long / short_orig).
    if oh <= ow:
        nh, nw = short, int(short * ow / oh)
    else:
        nh, nw = int(short * oh / ow), short
    nh, nw = max(nh, th), max(nw, tw)  # float rounding must never leave the image smaller than the crop
    resized = image.resize((nw, nh), Image.BILINEAR) if (nh, nw) != (oh, ow) else image
    top = int(rng.integers(0, nh - th + 1))
    left = int(rng.integers(0, nw - tw + 1))
    return np.asarray(resized.crop((left, top, left + tw, top + th)), dtype=np.uint8)


class BucketSchedule:
    """The bucket of every global step, identical on all hosts: a function of (seed, step) only."""

    def __init__(self, sizes, ratios, frequencies, random_ratio: float, seed: int):
        self.sizes, self.ratios = list(sizes), list(ratios)
        freq = np.asarray(frequencies, dtype=np.float64)
        if freq.shape != (len(self.sizes),) or freq.sum() <= 0:
            raise ValueError(f"bucket frequencies {freq.tolist()} must be {len(self.sizes)} counts, not all zero")
        self.probabilities = freq / freq.sum()
        self.random_ratio, self.seed = float(random_ratio), int(seed)

    def bucket_index(self, step: int) -> int:
        rng = np.random.default_rng([self.seed, int(step), 0xB0C4E7])
        if self.random_ratio > 0 and rng.random() < self.random_ratio:
            return int(rng.integers(len(self.sizes)))
        return int(rng.choice(len(self.sizes), p=self.probabilities))

    def bucket(self, step: int) -> tuple[int, int]:
        return self.sizes[self.bucket_index(step)]


def single_bucket(image_size: int) -> tuple[list[float], list[tuple[int, int]]]:
    """No multi-aspect training: one square bucket (shorter side to image_size, random crop)."""
    return [1.0], [(image_size, image_size)]
