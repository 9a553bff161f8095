"""Dropout masks both twins draw identically: the numpy specification of a counter-based hash.

Randomness that must agree across frameworks comes from one framework-neutral rule (as sampling
noise does, `weights.shared.generation.sampling_noise`). For dropout the rule is a *hash*, not a
stream: whether element `i` of a mask is kept is a pure function of

    (seed, step, layer, site, i)

so each twin computes its masks where it needs them, inside its own compiled program, with its
own integer ops (`torch_impl/layers/dropout.py`, `flax_impl/layers/dropout.py`, the same
statements in the same order). Nothing is shipped from the host: no `[B, H, T, S]` arrays per
step, no state carried between calls, and rematerialised layers recompute the very same masks.
This module is the specification and the independent witness the twins are tested against; it
is written with numpy's unsigned 32-bit arithmetic, the twins with signed int32 (two's-complement
wrap-around gives the same bits; right shifts are masked to make them logical).

The element index is a pair (row, column): the column is the last axis, the row is the flat index
of the leading axes with the batch axis offset by `row_offset`. A batch cut into micro-batches, or
into data-parallel shards, therefore draws for each row the mask of its row in the whole batch:
gradient accumulation and sharded steps stay equal to the one big step with dropout on.

The hash is murmur3's 32-bit finaliser (`fmix32`, full avalanche) applied to a Weyl sequence
(golden-ratio increments) per row. An element is kept when the top 24 bits of its hash are at
least `round(p * 2^24)`, so the keep probability is `1 - round(p * 2^24) / 2^24` (within 3e-8 of
`1 - p`) and kept values are scaled by `1 / (1 - p)`, rounded to the activation dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["SITES", "GOLDEN", "C1", "C2", "SALT", "keep_threshold", "keep_probability", "scale", "dropout_key",
           "fmix32", "combine", "stream_key", "keep_mask", "dropout"]

# Where dropout is applied; the value is the site's part of the key. Model-level sites use layer -1.
SITES: dict[str, int] = {
    "embeddings": 0,  # the token embeddings (after Gemma's sqrt(E) scale)   [B, T, E]  hidden_dropout
    "attention": 1,  # the attention probabilities after softmax (HF's)      [B, H, T, S]  attention_dropout
    "attention_output": 2,  # the attention block's output, before the residual add  [B, T, E]  hidden_dropout
    "mlp_output": 3,  # the MLP (or experts) block's output, before the residual add  [B, T, E]  hidden_dropout
}

GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: the Weyl increment
C1 = 0x85EBCA6B  # murmur3 fmix32 multipliers
C2 = 0xC2B2AE35
SALT = 0x5BD1E995  # the key chain's starting value (murmur2's multiplier; any odd constant)
_MASK32 = 0xFFFFFFFF


def keep_threshold(p: float) -> int:
    """The 24-bit threshold: an element is dropped when the top 24 bits of its hash are below it."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")
    return int(round(p * (1 << 24)))


def keep_probability(p: float) -> float:
    """The exact probability that an element is kept at rate `p`."""
    return 1.0 - keep_threshold(p) / (1 << 24)


def scale(p: float) -> float:
    """The factor kept elements are multiplied by (rounded to the activation dtype at use)."""
    return 1.0 / (1.0 - p)


def dropout_key(seed: int, step: int, row_offset: int = 0) -> np.ndarray:
    """The `dropout_key` a twin's forward takes in train mode: int32 `[3]` = (seed, step, row
    offset), each reduced mod 2^32 (so any Python int seed works) and stored two's-complement."""
    return np.array([seed & _MASK32, step & _MASK32, row_offset & _MASK32], np.uint32).view(np.int32)


def fmix32(x: np.ndarray) -> np.ndarray:
    """murmur3's finaliser on uint32: a bijection whose every output bit depends on every input bit."""
    x = np.asarray(x, np.uint32)
    with np.errstate(over="ignore"):  # products wrap mod 2^32, as intended
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(C1)
        x = x ^ (x >> np.uint32(13))
        x = x * np.uint32(C2)
        return x ^ (x >> np.uint32(16))


def combine(h: np.ndarray, v: int | np.ndarray) -> np.ndarray:
    """Fold the integer `v` (any sign; taken mod 2^32) into the hash `h`."""
    v = np.asarray(np.asarray(v, np.int64) & _MASK32, np.uint32)
    with np.errstate(over="ignore"):
        return fmix32(np.asarray(h, np.uint32) + fmix32(v + np.uint32(GOLDEN)))


def stream_key(seed: int, step: int, layer: int, site: str) -> np.uint32:
    """The key of one mask: (seed, step, layer, site) folded in that order."""
    h = np.uint32(SALT)
    for v in (seed, step, layer, SITES[site]):
        h = combine(h, v)
    return np.uint32(h)


def _hash(key: np.uint32, shape: Sequence[int], row_offset: int) -> np.ndarray:
    # Row r of the mask is the flat index of its leading axes, the batch axis offset by row_offset;
    # its elements hash the Weyl sequence combine(key, r) + c * GOLDEN over the columns c.
    b, inner, cols = shape[0], math.prod(shape[1:-1]), shape[-1]
    batch_rows = (np.arange(b, dtype=np.int64) + row_offset) & _MASK32
    rows = (batch_rows[:, None] * inner + np.arange(inner, dtype=np.int64)[None, :]) & _MASK32
    row_hash = combine(key, rows.reshape(-1))[:, None]  # [R, 1]
    cols = (np.arange(cols, dtype=np.uint64) * GOLDEN & _MASK32).astype(np.uint32)[None, :]
    with np.errstate(over="ignore"):
        return fmix32(row_hash + cols).reshape(shape)


def keep_mask(seed: int, step: int, layer: int, site: str, shape: Sequence[int], p: float,
              row_offset: int = 0) -> np.ndarray:
    """Boolean keep-mask of `shape` (at least 2-D: batch first, columns last) at rate `p`."""
    if len(shape) < 2:
        raise ValueError(f"a dropout mask needs a batch and a column axis, got shape {tuple(shape)}")
    bits = _hash(stream_key(seed, step, layer, site), shape, row_offset)
    return (bits >> np.uint32(8)) >= np.uint32(keep_threshold(p))


def dropout(x: np.ndarray, p: float, seed: int, step: int, layer: int, site: str, row_offset: int = 0) -> np.ndarray:
    """`x` with dropped elements zeroed and kept ones scaled by `1 / (1 - p)` rounded to x's dtype."""
    keep = keep_mask(seed, step, layer, site, x.shape, p, row_offset)
    return np.where(keep, x * np.asarray(scale(p), x.dtype), np.zeros((), x.dtype))
