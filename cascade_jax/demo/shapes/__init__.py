"""The demo's generated, captioned dataset of coloured shapes, in three parts: the caption grammar and its
fixed train / held-out splits (``grammar``), the images and the folders the trainers read (``images``), and a
scorer that reads an image's attributes back by image analysis (``scorer``, for evaluation only).
"""

from cascade_jax.demo.shapes.grammar import (ALL_COMBOS, ATTRIBUTES, COLOURS, HELD_OUT, HELD_OUT_FRACTION, POSITIONS,
                                             SHAPES, SPLITS, Combo, caption, combos_of, parse_caption,
                                             sample_combos, split_of)
from cascade_jax.demo.shapes.images import (CENTRE_JITTER, MANIFEST, SIZE_RANGE, SUPERSAMPLE, generate, iter_samples,
                                            render, write_folder)
from cascade_jax.demo.shapes.scorer import (MIN_OBJECT_CONTRAST, SQUARE_FILL, TRIANGLE_BALANCE, accuracy,
                                            classify_shape, nearest_colour, object_mask, score_image)

__all__ = ["ALL_COMBOS", "ATTRIBUTES", "CENTRE_JITTER", "COLOURS", "Combo", "HELD_OUT", "HELD_OUT_FRACTION", "MANIFEST",
           "MIN_OBJECT_CONTRAST", "POSITIONS", "SHAPES", "SIZE_RANGE", "SPLITS", "SQUARE_FILL", "SUPERSAMPLE",
           "TRIANGLE_BALANCE", "accuracy", "caption", "classify_shape", "combos_of", "generate", "iter_samples",
           "nearest_colour", "object_mask", "parse_caption", "render", "sample_combos", "score_image", "split_of",
           "write_folder"]
