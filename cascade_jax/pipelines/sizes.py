"""Image size <-> latent sizes, and what sizes the cascade can make.

Stage C works at ceil(size / 42.67) and Stage B at size / 4 (the official
``calculate_latent_sizes``). Stage B's patch size 2 needs an even Stage B latent, so
image sides must be multiples of 8; any other request gets an error naming the nearest
valid size instead of a crash deep inside the network.
"""

from __future__ import annotations

import math

STAGE_C_COMPRESSION = 42.67
STAGE_B_COMPRESSION = 4
SIZE_MULTIPLE = 8
MIN_SIZE, MAX_SIZE = 64, 8192


def nearest_valid(side: int) -> int:
    return min(max(SIZE_MULTIPLE * round(side / SIZE_MULTIPLE), MIN_SIZE), MAX_SIZE)


def check_image_size(height: int, width: int):
    """Raise a ``ValueError`` that names the nearest valid size when (height, width) cannot be made."""
    for name, side in (("height", height), ("width", width)):
        if not isinstance(side, int) or isinstance(side, bool):
            raise ValueError(f"{name} must be an integer number of pixels, got {side!r}")
        if side < MIN_SIZE or side > MAX_SIZE or side % SIZE_MULTIPLE:
            raise ValueError(
                f"{name}={side} is not supported: sides must be multiples of {SIZE_MULTIPLE} between {MIN_SIZE} and "
                f"{MAX_SIZE}; the nearest valid size is {nearest_valid(height)}x{nearest_valid(width)} (HxW)")


def stage_c_latent_hw(height: int, width: int) -> tuple[int, int]:
    return math.ceil(height / STAGE_C_COMPRESSION), math.ceil(width / STAGE_C_COMPRESSION)


def stage_b_latent_hw(height: int, width: int) -> tuple[int, int]:
    return math.ceil(height / STAGE_B_COMPRESSION), math.ceil(width / STAGE_B_COMPRESSION)


def latent_shapes(height: int, width: int, batch: int, c_latent_c: int = 16, c_latent_b: int = 4):
    """NHWC shapes of the Stage C and Stage B latents for a batch of (height, width) images."""
    check_image_size(height, width)
    hc, wc = stage_c_latent_hw(height, width)
    hb, wb = stage_b_latent_hw(height, width)
    return (batch, hc, wc, c_latent_c), (batch, hb, wb, c_latent_b)


def check_size_limit(height: int, width: int, max_side: int, limit_name: str = "the limit"):
    """Refuse a size with a side over ``max_side`` (e.g. a server's cap: each new size compiles new programs
    and holds their memory, and work grows with the pixels), naming the largest size of the same shape."""
    if max(height, width) <= max_side:
        return
    scale = max_side / max(height, width)
    fit = [max(MIN_SIZE, int(side * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE) for side in (height, width)]
    raise ValueError(f"{height}x{width} (HxW) has a side over {limit_name} of {max_side} pixels; the largest size "
                     f"of that shape within it is {fit[0]}x{fit[1]}")
