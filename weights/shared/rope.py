"""Rotary frequencies, computed once in numpy for both twins.

HF computes `inv_freq` in float32 with torch's `pow`; XLA's and torch's float32 `pow` differ in
the last bit, and at position ~2000 one ulp of `inv_freq` moves the angle by ~1e-4 rad, which is
more than the float32 parity budget. So the frequencies are computed here, in float64, and each
twin rounds them once to its compute dtype: the twins get bit-identical values, within one ulp
of HF's float32 `inv_freq`. Formulas follow HF `modeling_rope_utils`.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ..config import ModelConfig

__all__ = ["rope_frequencies"]


@functools.lru_cache(maxsize=256)
def rope_frequencies(config: ModelConfig, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """`(inv_freq [D/2] float64, attention_scaling)` for the config's rotary scaling.

    `seq_len` only matters for `dynamic` (NTK) scaling: HF recomputes the base from the current
    sequence length (max position id + 1) once it exceeds `max_position_embeddings`.
    """
    rope = config.rope
    dim = config.resolved_head_dim
    base = float(config.rope_theta)
    if rope.rope_type == "dynamic":
        max_pos = config.max_position_embeddings
        seq = seq_len if seq_len is not None and seq_len > max_pos else max_pos
        base = base * ((rope.factor * seq / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3(inv_freq, rope.factor, rope.low_freq_factor, rope.high_freq_factor,
                           rope.original_max_position_embeddings)
    inv_freq.setflags(write=False)  # shared through the cache: nobody may mutate it
    return inv_freq, 1.0


def _llama3(inv_freq: np.ndarray, factor: float, low: float, high: float, old_context: int) -> np.ndarray:
    # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the band
    # between is interpolated smoothly (Llama 3.1's recipe, HF `_compute_llama3_parameters`).
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)
