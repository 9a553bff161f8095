"""Token embeddings with tied logits and an output bias (no sqrt(E) scaling)."""

from __future__ import annotations

import torch
from torch import nn

from weights.vq.config import TransformerVQConfig
from .common import at_least_float32, to_dtype

__all__ = ["Embeddings"]


class Embeddings(nn.Module):
    """`embs` [V, E] ~ N(0, 1) and `bias_out` [V] (zeros; a dead parameter when untied)."""

    def __init__(self, config: TransformerVQConfig):
        super().__init__()
        pdt = to_dtype(config.param_dtype)
        self.dtype = to_dtype(config.dtype)
        self.embs = nn.Parameter(torch.randn(config.n_vocab, config.d_model, dtype=pdt))
        self.bias_out = nn.Parameter(torch.zeros(config.n_vocab, dtype=pdt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, P] token ids -> [B, P, E] in dtype."""
        return self.embs[x.long()].to(self.dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Tied logits x . embs^T + bias_out, in at least float32 (the reference: float32)."""
        ct = at_least_float32(self.dtype)
        x = x.to(ct)
        x = torch.matmul(x, self.embs.T.to(ct))
        return x + self.bias_out.to(ct)[None, None, :]
