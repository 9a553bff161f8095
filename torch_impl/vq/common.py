"""Shared helpers of the Transformer-VQ torch twin: dtypes, stop-gradient forms, dropout masks.

Axis letters of the whole `vq` package (`N` blocks, `C` codes, `E` width, ...): `docs/transformer_vq.md`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers.precision import to_dtype  # config dtype string -> torch dtype

__all__ = ["MASK_INFTY_APPROX", "to_dtype", "at_least_float32", "sg", "st", "linear", "dropout_mask"]

# Finite stand-in for infinity in masks: -inf would give inf - inf = NaN in the max-shift.
MASK_INFTY_APPROX = 1e30


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """The reference hard-codes float32 in three places (norm, tied logits, ScaledSin scale).
    We promote to max(float32, dtype) instead, so float64 runs stay float64 (the reference's casts
    would downcast them): the one numerical deviation from the reference."""
    return torch.promote_types(dtype, torch.float32)


def sg(x: torch.Tensor) -> torch.Tensor:
    """Stop-gradient."""
    return x.detach()


def st(x: torch.Tensor) -> torch.Tensor:
    """x - sg(x): forward value exactly 0, gradient the identity (the exact straight-through)."""
    return x - x.detach()


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A dense layer computed in `dtype` (inputs and params cast to it, like flax's Dense);
    w is a torch `weight`, [out, in]."""
    return F.linear(x.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype))


def dropout_mask(shape: tuple[int, ...], p: float, dtype: torch.dtype,
                 rng: torch.Generator | None) -> torch.Tensor | None:
    """Keep-mask scaled by 1/(1-p), or None when the dropout is off (p == 0)."""
    if p == 0.0:
        return None
    keep = torch.rand(shape, generator=rng) >= p
    return keep.to(dtype) / (1.0 - p)
