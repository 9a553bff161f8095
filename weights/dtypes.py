"""The floating dtypes of parameters and activations, by the names `config.json` (`torch_dtype`),
the CLI and the configs use: the one name -> numpy table.

numpy has no bfloat16: `ml_dtypes.bfloat16` stands in, bit for bit. Each twin maps the same
names to its framework's dtypes in `layers/precision.py` (`DTYPES`, `to_dtype`, `dtype_name`).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["FLOAT_DTYPES", "dtype_name", "numpy_dtype"]

FLOAT_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


def numpy_dtype(dtype: Any) -> np.dtype:
    """A dtype name of `FLOAT_DTYPES` ("bfloat16", ...), or anything numpy understands, as numpy's."""
    if isinstance(dtype, str):
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; one of {', '.join(FLOAT_DTYPES)}")
        return FLOAT_DTYPES[dtype]
    return np.dtype(dtype)


def dtype_name(dtype: Any) -> str:
    """numpy dtype -> its name in `FLOAT_DTYPES` (the `torch_dtype` string of config.json)."""
    dt = np.dtype(dtype)
    for name, d in FLOAT_DTYPES.items():
        if d == dt:
            return name
    raise ValueError(f"{dt} is not a parameter dtype; one of {', '.join(FLOAT_DTYPES)}")
