"""The one precision rule: statistics in float32, or float64 when the model runs in float64."""

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype for norm statistics, rotary angles, softmax and losses of activations in `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The dtype names of `weights.dtypes.FLOAT_DTYPES` (config.json, the CLI, the configs) -> torch.
DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}


def to_dtype(name: str) -> torch.dtype:
    """A dtype name ("bfloat16", ...) -> the torch dtype."""
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype -> its name ("bfloat16", ...)."""
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"{dtype} is not one of the dtypes {', '.join(DTYPES)}")
