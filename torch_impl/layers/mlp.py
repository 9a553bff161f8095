"""Gated MLP: `down(act(gate(x)) * up(x))` — SwiGLU with silu, GeGLU with gelu."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from weights.config import ModelConfig

from .linear import linear

# HF `ACT2FN` names -> functions. The tanh GELUs are one formula under two HF names.
ACT2FN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class MLP(nn.Module):
    """The feed-forward block of every decoder layer."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype = torch.float32,
                 param_dtype: torch.dtype | None = None):
        super().__init__()
        e, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = linear(config, e, i, bias, **kw)
        self.up_proj = linear(config, e, i, bias, **kw)
        self.down_proj = linear(config, i, e, bias, **kw)
        self.act_fn = ACT2FN[config.mlp_activation]  # gemma: hidden_activation, tanh GELU fallback

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, E] -> [B, T, E]`."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
