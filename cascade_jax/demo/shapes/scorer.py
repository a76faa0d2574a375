"""Reading a shapes image's attributes back by image analysis only, no network: background = the median
border pixel, object = the pixels far from it, colour = the nearest named colour of the object's median
pixel, position = the nearest of the five position centres to the object's centroid, shape = the object's
fill of its bounding box and the balance of its top and bottom widths. It tolerates blur, noise and
moderate colour shifts, as images from a small diffusion model have; an image with no object gets ``None``
attributes (always wrong), never an exception. Used to evaluate the demo (tests, ``demo.evaluate``).
"""

from __future__ import annotations

import numpy as np

from cascade_jax.demo.shapes.grammar import ATTRIBUTES, COLOURS, POSITIONS, Combo

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
