"""The one precision rule: statistics in float32, or float64 when the model runs in float64."""

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype for norm statistics, rotary angles, softmax and losses of activations in `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32
