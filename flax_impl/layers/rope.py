"""Rotary position embedding with HF's scalings (default, linear, dynamic NTK, llama3).

The frequencies come from `weights.shared.rope.rope_frequencies` (numpy, float64) so both twins use
bit-identical values; angles are formed here in float32 (float64 for float64 models).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from weights.config import ModelConfig
from weights.shared.rope import rope_frequencies

from .precision import compute_dtype


def rotate_half(x: jax.Array) -> jax.Array:
    """`[x1, x2] -> [-x2, x1]` over the last axis (HF's half-split rotary layout)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate((-x2, x1), axis=-1)


def apply_rotary_pos_emb(q: jax.Array, k: jax.Array, cos: jax.Array, sin: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
    """Rotate q `[B, H, T, D]` and k `[B, K, T, D]` by angles given as cos/sin `[B or 1, T, D]`."""
    cos = cos[:, None]
    sin = sin[:, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class RotaryEmbedding(nnx.Module):
    """Turns position ids into the (cos, sin) tables shared by every layer."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.rope_type = config.rope.rope_type

    def inv_freq(self, position_ids: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, float]:
        """`(inv_freq [D/2] in dtype, attention_scaling)` for these positions."""
        dtype = np.dtype(dtype)
        if self.rope_type != "dynamic":
            inv_freq, scaling = rope_frequencies(self.config)
            return jnp.asarray(inv_freq.astype(dtype)), scaling
        # Dynamic NTK depends on the current length, max(position id) + 1 over the batch. Under
        # jit that length is traced, so the numpy formula runs as a host callback: the twins
        # stay bit-identical in compiled decoding too. No length is remembered between calls.
        seq_len = jnp.max(position_ids).astype(jnp.int32) + 1
        half = self.config.resolved_head_dim // 2

        def host(n: np.ndarray) -> np.ndarray:
            return rope_frequencies(self.config, int(n))[0].astype(dtype)

        inv_freq = jax.pure_callback(host, jax.ShapeDtypeStruct((half,), dtype), seq_len)
        return inv_freq, rope_frequencies(self.config)[1]

    def __call__(self, x: jax.Array, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos, sin `[B or 1, T, D]` in `x.dtype`, for integer `position_ids [B or 1, T]`."""
        cdtype = compute_dtype(x.dtype)
        inv_freq, attention_scaling = self.inv_freq(position_ids, cdtype)
        freqs = position_ids.astype(cdtype)[:, :, None] * inv_freq[None, None, :]  # [B, T, D/2]
        emb = jnp.concatenate((freqs, freqs), axis=-1)
        cos = jnp.cos(emb) * attention_scaling
        sin = jnp.sin(emb) * attention_scaling
        return cos.astype(x.dtype), sin.astype(x.dtype)
