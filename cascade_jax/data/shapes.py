"""A generated, captioned dataset of coloured shapes, and a scorer that reads the attributes back.

Every caption follows one grammar, ``a {colour} {shape} in the {position} on a {background}
background``: 8 colours x 3 shapes x 5 positions x 7 backgrounds (any colour but the shape's) =
840 combinations. A fixed 15% of them (``HELD_OUT``, 126) never appear in the training split, so a
model trained on the rest can be asked for combinations it has not seen.

The scorer (:func:`score_image`) uses image analysis only, no network: background = the median
border pixel, object = the pixels far from it, colour = the nearest named colour of the object's
median pixel, position = the nearest of the five position centres to the object's centroid,
shape = the object's fill of its bounding box and the balance of its top and bottom widths. It
tolerates blur, noise and moderate colour shifts, as images from a small diffusion model have; an
image with no object gets ``None`` attributes (always wrong), never an exception.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

# Well separated in RGB: the closest pairs (red/orange, orange/yellow) are ~105 apart.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 230, 40),
    "orange": (245, 130, 0),
    "purple": (140, 50, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Position -> (x, y) of the shape's centre as a fraction of the side (y grows downwards).
POSITIONS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
# Jitter: centres move by up to 0.03 of the side per axis (a centre stays >= 0.3 from any other
# position's centre), and the shape's bounding box is 30-38% of the side, so it keeps >= 0.03 of the
# side from the border, which the scorer reads as background. Objects this large (~10% of the pixels)
# keep their outline in the coarse codes the cascade draws from: at 20-30% of the side the demo's
# 3x3 EfficientNet latents kept their colour and place but not their shape.
CENTRE_JITTER = 0.03
SIZE_RANGE = (0.30, 0.38)
SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled: antialiased edges
HELD_OUT_FRACTION = 0.15
SPLITS = ("train", "heldout")
MANIFEST = "shapes_dataset.json"  # written into each folder by write_folder: marks the folder as ours

_CAPTION = re.compile(r"a (?P<colour>\w+) (?P<shape>\w+) in the (?P<position>[\w ]+?) "
                      r"on a (?P<background>\w+) background")


class Combo(NamedTuple):
    """One caption's attributes. A scorer prediction has the same fields; ``None`` where nothing was found."""

    colour: str | None
    shape: str | None
    position: str | None
    background: str | None


ATTRIBUTES = Combo._fields
ALL_COMBOS: tuple[Combo, ...] = tuple(
    Combo(colour, shape, position, background)
    for colour, shape, position, background in itertools.product(COLOURS, SHAPES, POSITIONS, COLOURS)
    if background != colour)


def caption(combo: Combo) -> str:
    return f"a {combo.colour} {combo.shape} in the {combo.position} on a {combo.background} background"


def parse_caption(text: str) -> Combo:
    """The combination a caption names; a ValueError naming the text if it is not in the grammar."""
    match = _CAPTION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"caption {text!r} is not of the form "
                         "'a COLOUR SHAPE in the POSITION on a BACKGROUND background'")
    combo = Combo(**match.groupdict())
    vocab = {"colour": COLOURS, "shape": SHAPES, "position": POSITIONS, "background": COLOURS}
    for field, allowed in vocab.items():
        if getattr(combo, field) not in allowed:
            raise ValueError(f"caption {text!r}: {field} {getattr(combo, field)!r} is not one of {', '.join(allowed)}")
    if combo.colour == combo.background:
        raise ValueError(f"caption {text!r}: the shape's colour and the background are both {combo.colour}")
    return combo


def _held_out() -> frozenset:
    # Ranked by a hash of the caption: the same set on every platform and library version.
    ranked = sorted(ALL_COMBOS, key=lambda c: hashlib.sha256(caption(c).encode()).hexdigest())
    return frozenset(ranked[:round(HELD_OUT_FRACTION * len(ALL_COMBOS))])


HELD_OUT: frozenset = _held_out()


def split_of(combo: Combo) -> str:
    if combo not in ALL_COMBOS:
        raise ValueError(f"{combo} is not one of the {len(ALL_COMBOS)} combinations")
    return "heldout" if combo in HELD_OUT else "train"


def combos_of(split: str) -> tuple[Combo, ...]:
    """The combinations of a split, in the fixed order of ALL_COMBOS."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; use one of {', '.join(SPLITS)}")
    return tuple(c for c in ALL_COMBOS if split_of(c) == split)


# ---- rendering ------------------------------------------------------------------------------

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


def sample_combos(n: int, seed: int, split: str = "train") -> list[Combo]:
    """``n`` combinations of ``split``: each pass over the split is a fresh seeded permutation, so every
    combination appears ``n // len(split)`` or one more times."""
    pool = combos_of(split)
    rng = np.random.default_rng([seed, 0])
    out = []
    while len(out) < n:
        out += [pool[i] for i in rng.permutation(len(pool))]
    return out[:n]


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
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Not storage.atomic: data importing weights would close an import cycle (weights -> models -> data).
    # A failure or Ctrl-C removes the partial output; only a killed process leaves a .NAME.tmp-* sibling.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
    try:
        for i, (combo, image) in enumerate(iter_samples(n, seed, size, split)):
            Image.fromarray(image).save(tmp / f"{i:06d}.png")
            (tmp / f"{i:06d}.txt").write_text(caption(combo))
        manifest = {"generator": "cascade_jax.data.shapes", "n": n, "seed": seed, "size": size, "split": split}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        tmp.chmod(0o755)  # mkdtemp makes it private
        if os.path.lexists(folder):
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        for leftover in (tmp, old):
            if os.path.lexists(leftover):
                shutil.rmtree(leftover)
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


# ---- scoring --------------------------------------------------------------------------------

_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.asarray([COLOURS[n] for n in _PALETTE_NAMES], np.float32)
_CENTRES = np.asarray(list(POSITIONS.values()), np.float32)
MIN_OBJECT_CONTRAST = 50.0  # RGB distance from the background below which nothing counts as an object
SQUARE_FILL = 0.89  # bounding-box fill above which a symmetric object is a square (circle pi/4, square 1)
TRIANGLE_BALANCE = 0.6  # narrower end / wider end of the object's width profile below which it is a triangle


def nearest_colour(rgb) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - np.asarray(rgb, np.float32)) ** 2).sum(-1)))]


def _box_blur3(image: np.ndarray) -> np.ndarray:
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


def _main_run(active: np.ndarray, weight: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the contiguous run of True in ``active`` carrying the most ``weight``."""
    best, best_mass, start = (0, 0), -1.0, None
    for i, on in enumerate(np.append(active, False)):
        if on and start is None:
            start = i
        elif not on and start is not None:
            mass = float(weight[start:i].sum())
            if mass > best_mass:
                best, best_mass = (start, i), mass
            start = None
    return best


def object_mask(image: np.ndarray, background_rgb) -> np.ndarray | None:
    """Boolean mask of the main object, or None when no pixel stands out from the background."""
    smooth = _box_blur3(image.astype(np.float32))  # averages pixel noise away before thresholding
    distance = np.sqrt(((smooth - np.asarray(background_rgb, np.float32)) ** 2).sum(-1))
    contrast = float(np.percentile(distance, 99.5))
    if contrast < MIN_OBJECT_CONTRAST:
        return None
    mask = distance > contrast / 2
    # Keep the strongest band of rows, then of columns within it: drops specks and stray blobs.
    rows = mask.sum(1)
    r0, r1 = _main_run(rows >= max(1, 0.05 * rows.max()), rows)
    cols = mask[r0:r1].sum(0)
    c0, c1 = _main_run(cols >= max(1, 0.05 * cols.max()), cols)
    kept = np.zeros_like(mask)
    kept[r0:r1, c0:c1] = mask[r0:r1, c0:c1]
    return kept if kept.sum() >= 4 else None


def classify_shape(mask: np.ndarray) -> str:
    """circle, square or triangle from the object's bounding-box fill and its width profile."""
    # The box spans the rows and columns at least a quarter as full as the fullest: edge rows that noise
    # and blur leave half-filled would otherwise pad the box and make a square look like a circle.
    rows, cols = (np.nonzero(counts >= 0.25 * counts.max())[0] for counts in (mask.sum(1), mask.sum(0)))
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    fill = box.mean()
    widths = box.sum(1).astype(np.float32)
    quarter = max(1, len(widths) // 4)
    ends = sorted((widths[:quarter].mean(), widths[-quarter:].mean()))
    if ends[0] < TRIANGLE_BALANCE * ends[1] and fill < SQUARE_FILL:
        return "triangle"
    return "square" if fill >= SQUARE_FILL else "circle"


def score_image(image) -> Combo:
    """The attributes an image shows, by image analysis; ``None`` for those it cannot find."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 8:
        raise ValueError(f"score_image takes an (H, W, 3) image of at least 8x8 pixels, got shape {image.shape}")
    h, w = image.shape[:2]
    ring = max(1, min(h, w) // 64)
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[:ring].reshape(-1, 3), pixels[-ring:].reshape(-1, 3),
                             pixels[:, :ring].reshape(-1, 3), pixels[:, -ring:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)
    background = nearest_colour(background_rgb)
    mask = object_mask(image, background_rgb)
    if mask is None:
        return Combo(None, None, None, background)
    # The object's colour from its core (the inner half of the contrast), away from blurred edges.
    distance = np.sqrt(((pixels - background_rgb) ** 2).sum(-1))
    core = mask & (distance >= np.percentile(distance[mask], 50))
    colour = nearest_colour(np.median(pixels[core if core.any() else mask], axis=0))
    ys, xs = np.nonzero(mask)
    centroid = np.asarray([(xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h], np.float32)
    position = list(POSITIONS)[int(np.argmin(((_CENTRES - centroid) ** 2).sum(-1)))]
    return Combo(colour, classify_shape(mask), position, background)


def accuracy(images, combos) -> dict:
    """Fraction of images whose predicted attribute matches, per attribute and for all four ("exact")."""
    combos = list(combos)
    if len(images) != len(combos):
        raise ValueError(f"{len(images)} images but {len(combos)} combinations to score them against")
    if not combos:
        raise ValueError("accuracy of no images is undefined; pass at least one")
    predictions = [score_image(image) for image in images]
    hits = {a: [getattr(p, a) == getattr(c, a) for p, c in zip(predictions, combos)] for a in ATTRIBUTES}
    hits["exact"] = [p == tuple(c) for p, c in zip(predictions, combos)]
    return {name: float(np.mean(values)) for name, values in hits.items()}
