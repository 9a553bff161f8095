"""RMS-style LayerNorm of Transformer-VQ: optional centring, gain and bias; eps inside the rsqrt."""

from __future__ import annotations

import torch
from torch import nn

from weights.vq.config import TransformerVQConfig
from .common import at_least_float32, to_dtype

__all__ = ["layer_norm", "LayerNorm"]


def layer_norm(x: torch.Tensor, g: torch.Tensor | None, b: torch.Tensor | None, *,
               center: bool = False, norm: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Normalise the last axis in at least float32, apply gain and bias, cast back to x's dtype."""
    dtype = x.dtype
    x = x.to(at_least_float32(dtype))
    if center:
        x = x - torch.mean(x, dim=-1, keepdim=True)
    if norm:
        x = x * torch.rsqrt(eps + torch.mean(torch.square(x), dim=-1, keepdim=True))
    if g is not None:
        x = x * g
    if b is not None:
        x = x + b
    return x.to(dtype)


class LayerNorm(nn.Module):
    """RMS LayerNorm (`center=False` by default) with parameters `g` (ones) and `b` (zeros)."""

    def __init__(self, config: TransformerVQConfig, input_dim: int, *, center: bool = False,
                 norm: bool = True, gain: bool = True, bias: bool = True):
        super().__init__()
        self.input_dim, self.center, self.norm = input_dim, center, norm
        pdt = to_dtype(config.param_dtype)
        self.g = nn.Parameter(torch.ones(input_dim, dtype=pdt)) if gain else None
        self.b = nn.Parameter(torch.zeros(input_dim, dtype=pdt)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.g, self.b, center=self.center, norm=self.norm)
