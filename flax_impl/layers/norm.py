"""RMSNorm (HF `LlamaRMSNorm`, and `GemmaRMSNorm` with `unit_offset`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .precision import compute_dtype


def rms_norm(hidden_states: jax.Array, weight: jax.Array, eps: float, unit_offset: bool = False) -> jax.Array:
    """`weight * x / sqrt(mean(x^2) + eps)`, statistics in float32 (float64 for float64 input);
    with `unit_offset`, `(1 + weight) * ...` (Gemma). The result is in the input's (activation)
    dtype whatever the weight's, so float32 weights never leak float32 into the residual stream."""
    input_dtype = hidden_states.dtype
    x = hidden_states.astype(compute_dtype(input_dtype))
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(variance + eps)
    if unit_offset:
        # Gemma multiplies by (1 + weight) in float32 and casts back *after* (HF GemmaRMSNorm).
        return (x * (1.0 + weight.astype(x.dtype))).astype(input_dtype)
    # HF casts back to the activation dtype *before* the weight multiply (LLaMA convention); the
    # weight is cast to it at use.
    return weight.astype(input_dtype) * x.astype(input_dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis with a learned per-channel `weight` (init ones;
    zeros with `unit_offset`, where the scale is `1 + weight`)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, unit_offset: bool = False, *,
                 param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        self.weight = nnx.Param((jnp.zeros if unit_offset else jnp.ones)((hidden_size,), dtype=param_dtype))
        self.variance_epsilon = eps
        self.unit_offset = unit_offset

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return rms_norm(hidden_states, self.weight[...], self.variance_epsilon, self.unit_offset)
