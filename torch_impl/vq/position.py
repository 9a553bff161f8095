"""Sinusoid features (concatenated sin | cos, not interleaved) and ScaledSin absolute positions."""

from __future__ import annotations

import torch
from torch import nn

from weights.vq.config import TransformerVQConfig
from .common import at_least_float32, to_dtype

__all__ = ["get_sinusoid_embs", "ScaledSin"]


def get_sinusoid_embs(length: int, width: int, lam: float, flip: bool, start: int | torch.Tensor = 0,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[length, width] table: row n = concat(sin(pos_n w), cos(pos_n w)), pos_n = start + n,
    w_i = lam^(-2i/width); rows reversed when `flip` (row n then holds position length-1-n)."""
    pos_seq = (start + torch.arange(length)).to(dtype)
    inv_lams = 1 / (lam ** (torch.arange(0, width, 2).to(dtype) / width))
    pre = pos_seq[:, None] * inv_lams[None, :]
    cat = torch.cat([torch.sin(pre), torch.cos(pre)], dim=-1)
    return torch.flip(cat, dims=(0,)) if flip else cat


class ScaledSin(nn.Module):
    """Absolute sinusoid embeddings times one learned scalar `scale`, initialised to 0."""

    def __init__(self, config: TransformerVQConfig):
        super().__init__()
        self.config = config
        self.dtype = to_dtype(config.dtype)
        # The reference keeps this scalar in float32 whatever param_dtype is; at least float32 here.
        self.scale = nn.Parameter(torch.zeros((), dtype=at_least_float32(to_dtype(config.param_dtype))))

    def forward(self, length: int, offset: torch.Tensor) -> torch.Tensor:
        embs = get_sinusoid_embs(length, self.config.d_model, self.config.pe_lam, flip=False,
                                 start=offset, dtype=self.scale.dtype)
        return (self.scale * embs).to(self.dtype)
