"""Shared helpers of the Transformer-VQ Flax twin: dtypes, stop-gradient forms, dropout masks.

Axis letters of the whole `vq` package (`N` blocks, `C` codes, `E` width, ...): `docs/transformer_vq.md`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..layers.precision import DEFAULT_PRECISION, to_dtype  # to_dtype: config dtype string -> jax dtype

__all__ = ["MASK_INFTY_APPROX", "to_dtype", "at_least_float32", "sg", "st", "linear", "dropout_mask"]

# Finite stand-in for infinity in masks: -inf would give inf - inf = NaN in the max-shift.
MASK_INFTY_APPROX = 1e30


def at_least_float32(dtype: jnp.dtype) -> jnp.dtype:
    """The reference hard-codes float32 in three places (norm, tied logits, ScaledSin scale).
    We promote to max(float32, dtype) instead, so float64 runs stay float64 (the reference's casts
    would downcast them): the one numerical deviation from the reference."""
    return jnp.promote_types(dtype, jnp.float32)


def sg(x: jax.Array) -> jax.Array:
    """Stop-gradient."""
    return jax.lax.stop_gradient(x)


def st(x: jax.Array) -> jax.Array:
    """x - sg(x): forward value exactly 0, gradient the identity (the exact straight-through)."""
    return x - jax.lax.stop_gradient(x)


def linear(x: jax.Array, w: jax.Array, bias: jax.Array | None, dtype: jnp.dtype,
           precision: jax.lax.PrecisionLike = DEFAULT_PRECISION) -> jax.Array:
    """A dense layer computed in `dtype` (inputs and params cast to it, like flax's Dense);
    w is an NNX `kernel`, [in, out]."""
    y = jnp.matmul(x.astype(dtype), w.astype(dtype), precision=precision)
    return y if bias is None else y + bias.astype(dtype)


def dropout_mask(shape: tuple[int, ...], p: float, dtype: jnp.dtype, rng: jax.Array | None) -> jax.Array | None:
    """Keep-mask scaled by 1/(1-p), or None when the dropout is off (p == 0)."""
    if p == 0.0:
        return None
    if rng is None:
        raise ValueError(f"dropout with p={p} in train mode needs an rng key")
    keep = jax.random.uniform(rng, shape) >= p
    return keep.astype(dtype) / (1.0 - p)
