"""PyTorch tensor layout <-> our parameter layout, per the ``torch_layout`` tag of a parameter."""

from __future__ import annotations

import numpy as np

LAYOUTS = ("same", "linear", "conv", "conv_transpose")


def torch_to_ours(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "same":
        return array
    if layout == "linear":  # (out, in) -> (in, out)
        return array.T
    if layout == "conv":  # OIHW -> HWIO
        return array.transpose(2, 3, 1, 0)
    if layout == "conv_transpose":  # IOHW -> spatially flipped HWIO (see nn.ConvTranspose2d)
        return array.transpose(2, 3, 0, 1)[::-1, ::-1]
    raise ValueError(f"unknown torch_layout {layout!r}; expected one of {LAYOUTS}")


def ours_to_torch(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "same":
        return array
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array.transpose(3, 2, 0, 1)
    if layout == "conv_transpose":
        return array[::-1, ::-1].transpose(2, 3, 0, 1)
    raise ValueError(f"unknown torch_layout {layout!r}; expected one of {LAYOUTS}")


def torch_shape(shape: tuple, layout: str) -> tuple:
    """The PyTorch shape of a parameter of our ``shape`` (shape-only, for abstract models)."""
    return tuple(ours_to_torch(np.empty(shape, dtype=np.uint8), layout).shape) if shape else ()
