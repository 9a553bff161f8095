"""Rotary position embedding with HF's scalings (default, linear, dynamic NTK, llama3).

The frequencies come from `weights.shared.rope.rope_frequencies` (numpy, float64) so both twins use
bit-identical values; angles are formed here in float32 (float64 for float64 models).
"""

from __future__ import annotations

import torch
from torch import nn

from weights.config import ModelConfig
from weights.shared.rope import rope_frequencies

from .precision import compute_dtype


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2] -> [-x2, x1]` over the last axis (HF's half-split rotary layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q `[B, H, T, D]` and k `[B, K, T, D]` by angles given as cos/sin `[B or 1, T, D]`."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# The configs of the rotary embeddings built so far, by a number: what `_frequency_table` and
# `_attention_scaling` take instead of the config itself, since dynamo (torch <= 2.11) cannot
# hold a frozen dataclass as a constant argument ("can't reconstruct arbitrary frozen dataclass
# instances"), and an int it can. Equal configs share a number (their tables are equal), so the
# list holds one entry per distinct config, not per model built; a number is never reused for
# another config, since a compiled graph keeps the table its number named when it was traced.
# (A linear scan by equality: configs may hold unhashable `extra` values.)
_CONFIGS: list[ModelConfig] = []


def _config_key(config: ModelConfig) -> int:
    for key, known in enumerate(_CONFIGS):
        if known == config:
            return key
    _CONFIGS.append(config)
    return len(_CONFIGS) - 1


@torch._dynamo.assume_constant_result
def _frequency_table(config_key: int, seq_len: int | None, device: torch.device) -> torch.Tensor:
    # `rope_frequencies`' float64 table as a tensor on `device`. Under torch.compile (generate's
    # compiled decode step) the call is made once while tracing and its result is a constant of
    # the graph (guarded by the config's key; on the device, so a CUDA graph holds no host
    # tensor): dynamo would otherwise trace numpy op by op.
    return torch.tensor(rope_frequencies(_CONFIGS[config_key], seq_len)[0], dtype=torch.float64, device=device)


@torch._dynamo.assume_constant_result
def _attention_scaling(config_key: int, seq_len: int | None) -> float:
    return rope_frequencies(_CONFIGS[config_key], seq_len)[1]


class RotaryEmbedding(nn.Module):
    """Turns position ids into the (cos, sin) tables shared by every layer."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope.rope_type
        self.config_key = _config_key(config)

    def inv_freq(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
        """`(inv_freq [D/2] in dtype, attention_scaling)` for these positions."""
        # Dynamic NTK depends on the current length; HF uses max(position id) + 1 over the batch.
        # Unlike HF's module, no length is remembered between calls (see README).
        seq_len = int(position_ids.max()) + 1 if self.rope_type == "dynamic" else None
        inv_freq = _frequency_table(self.config_key, seq_len, position_ids.device)
        scaling = _attention_scaling(self.config_key, seq_len)
        # Rounded once from float64, exactly as the Flax twin's numpy cast does.
        return inv_freq.to(dtype), scaling

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[B or 1, T, D]` in `x.dtype`, for integer `position_ids [B or 1, T]`."""
        cdtype = compute_dtype(x.dtype)
        inv_freq, attention_scaling = self.inv_freq(position_ids, cdtype)
        freqs = position_ids.to(cdtype)[:, :, None] * inv_freq[None, None, :]  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * attention_scaling
        sin = emb.sin() * attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)
