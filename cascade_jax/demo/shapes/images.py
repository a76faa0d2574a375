"""The shapes dataset's images: each combination drawn with jittered place and size, antialiased, and
written as a folder the training loader's ``folder`` source reads (``NNNNNN.png`` + ``NNNNNN.txt``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cascade_jax.demo.shapes.grammar import ALL_COMBOS, COLOURS, POSITIONS, Combo, caption, sample_combos
from cascade_jax.storage import atomic

# Jitter: centres move by up to 0.03 of the side per axis (a centre stays >= 0.3 from any other
# position's centre), and the shape's bounding box is 30-38% of the side, so it keeps >= 0.03 of the
# side from the border, which the scorer reads as background. Objects this large (~10% of the pixels)
# keep their outline in the coarse codes the cascade draws from: at 20-30% of the side the demo's
# 3x3 EfficientNet latents kept their colour and place but not their shape.
CENTRE_JITTER = 0.03
SIZE_RANGE = (0.30, 0.38)
SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled: antialiased edges
MANIFEST = "shapes_dataset.json"  # written into each folder by write_folder: marks the folder as ours


def render(combo: Combo, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8: the shape with jittered place and size, antialiased."""
    if combo not in ALL_COMBOS:
        raise ValueError(f"{combo} is not one of the {len(ALL_COMBOS)} combinations")
    if size < 16:
        raise ValueError(f"image size {size} is too small to draw a shape; use at least 16")
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLOURS[combo.background])
    cx, cy = np.asarray(POSITIONS[combo.position]) + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, 2)
    half = rng.uniform(*SIZE_RANGE) / 2
    left, top, right, bottom = (v * big for v in (cx - half, cy - half, cx + half, cy + half))
    draw, fill = ImageDraw.Draw(image), COLOURS[combo.colour]
    if combo.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif combo.shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    else:  # apex up, base along the bottom of the box
        draw.polygon([(cx * big, top), (right, bottom), (left, bottom)], fill=fill)
    return np.asarray(image.resize((size, size), Image.BOX), np.uint8)


def iter_samples(n: int, seed: int, size: int = 128, split: str = "train"):
    """(combo, image) pairs; image i depends only on (seed, i), not on n."""
    for i, combo in enumerate(sample_combos(n, seed, split)):
        yield combo, render(combo, size, np.random.default_rng([seed, 1, i]))


def generate(n: int, seed: int, size: int = 128, split: str = "train"):
    """(images (n, size, size, 3) uint8, captions, combos), deterministic from ``seed``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    images = np.zeros((n, size, size, 3), np.uint8)
    combos = []
    for i, (combo, image) in enumerate(iter_samples(n, seed, size, split)):
        images[i] = image
        combos.append(combo)
    return images, [caption(c) for c in combos], combos


def write_folder(folder, n: int, seed: int, size: int = 128, split: str = "train") -> Path:
    """``NNNNNN.png`` + ``NNNNNN.txt`` pairs (the folder source's format) and a manifest, written into a
    hidden sibling and renamed into place. An existing folder is replaced only if it is empty or one this
    function wrote (its manifest and image/caption pairs, nothing else)."""
    folder = Path(folder).resolve()
    if n < 1:
        raise ValueError(f"n must be >= 1 to write a dataset, got {n}")
    _check_replaceable(folder)
    with atomic.replacing(folder) as tmp:  # a failure or Ctrl-C leaves the old folder, or none
        tmp.mkdir()
        for i, (combo, image) in enumerate(iter_samples(n, seed, size, split)):
            Image.fromarray(image).save(tmp / f"{i:06d}.png")
            (tmp / f"{i:06d}.txt").write_text(caption(combo))
        manifest = {"generator": "cascade_jax.demo.shapes", "n": n, "seed": seed, "size": size, "split": split}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


_OUR_FILE = re.compile(r"\d{6}\.(png|txt)")


def _check_replaceable(folder: Path) -> None:
    if not os.path.lexists(folder):
        return
    if folder.is_symlink() or not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder; choose another output folder")
    names = [p.name for p in folder.iterdir()]
    if not names:
        return
    foreign = sorted(n for n in names if n != MANIFEST and not _OUR_FILE.fullmatch(n))
    if MANIFEST not in names or foreign:
        what = f"files it did not write ({foreign[:5]})" if foreign else f"no {MANIFEST}"
        raise FileExistsError(f"{folder} is not empty and is not a shapes dataset ({what}); refusing to "
                              "overwrite it. Choose an empty or new folder")
