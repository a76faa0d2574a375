"""The shapes grammar and its splits: ``a {colour} {shape} in the {position} on a {background} background``,
8 colours x 3 shapes x 5 positions x 7 backgrounds (any colour but the shape's) = 840 combinations. A fixed
15% of them (``HELD_OUT``, 126) never appear in the training split, so a model trained on the rest can be
asked for combinations it has not seen.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from typing import NamedTuple

import numpy as np

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
HELD_OUT_FRACTION = 0.15
SPLITS = ("train", "heldout")

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


def sample_combos(n: int, seed: int, split: str = "train") -> list[Combo]:
    """``n`` combinations of ``split``: each pass over the split is a fresh seeded permutation, so every
    combination appears ``n // len(split)`` or one more times."""
    pool = combos_of(split)
    rng = np.random.default_rng([seed, 0])
    out = []
    while len(out) < n:
        out += [pool[i] for i in rng.permutation(len(pool))]
    return out[:n]
