"""The one dense layer of the twin, and the one factory that builds and initialises it.

Parameters are stored in `param_dtype` and cast to the activation `dtype` at use, in `forward`,
exactly where the Flax twin casts them: with `param_dtype=float32, dtype=bfloat16` the weights
keep full precision while every product runs in bfloat16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weights.config import ModelConfig


class Linear(nn.Linear):
    """`y = x W^T + b`, W `[out, in]` (HF layout) stored in `param_dtype`, computed in `dtype`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: torch.dtype = torch.float32, param_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias=bias, dtype=param_dtype or dtype, device=device)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., in] -> [..., out]`."""
        # Parameters cast to the activation dtype at use (a no-op when the dtypes agree).
        w = self.weight.to(self.dtype)
        b = None if self.bias is None else self.bias.to(self.dtype)
        return F.linear(x.to(self.dtype), w, b)  # x @ w.T + b, the bias added in the same BLAS call


def linear(config: ModelConfig, in_features: int, out_features: int, bias: bool, *,
           dtype: torch.dtype = torch.float32, param_dtype: torch.dtype | None = None) -> Linear:
    """A `Linear` with HF's init: weight normal(0, `initializer_range`), bias zero, on torch's
    default device (`with torch.device(...)` picks it). Every projection of the twin (attention,
    MLP, experts, router, heads) is built here."""
    # Built on the meta device, then given memory: no default (Kaiming) draw first, so each weight
    # is drawn once, as NNX does. Under `torch.device("meta")` (from_pretrained) it stays shapes only.
    layer = Linear(in_features, out_features, bias, dtype=dtype, param_dtype=param_dtype, device="meta")
    layer = layer.to_empty(device=torch.get_default_device())
    with torch.no_grad():
        layer.weight.normal_(0.0, config.initializer_range)
        if layer.bias is not None:
            layer.bias.zero_()
    return layer
