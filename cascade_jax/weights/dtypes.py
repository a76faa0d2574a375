"""The parameter dtypes a converted model may have."""

from __future__ import annotations

import numpy as np

FLOAT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype("bfloat16")}


def parse_dtype(dtype) -> np.dtype:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name == "float16":
        raise ValueError("float16 is not supported: these models overflow in float16 (NaN / black images); "
                         "use bfloat16 or float32")
    if name not in FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[name]
