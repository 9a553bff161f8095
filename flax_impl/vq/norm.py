"""RMS-style LayerNorm of Transformer-VQ: optional centring, gain and bias; eps inside the rsqrt."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from weights.vq.config import TransformerVQConfig
from .common import at_least_float32, to_dtype

__all__ = ["layer_norm", "LayerNorm"]


def layer_norm(x: jax.Array, g: jax.Array | None, b: jax.Array | None, *,
               center: bool = False, norm: bool = True, eps: float = 1e-6) -> jax.Array:
    """Normalise the last axis in at least float32, apply gain and bias, cast back to x's dtype."""
    dtype = x.dtype
    x = x.astype(at_least_float32(dtype))
    if center:
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    if norm:
        x = x * jax.lax.rsqrt(eps + jnp.mean(jnp.square(x), axis=-1, keepdims=True))
    if g is not None:
        x = x * g
    if b is not None:
        x = x + b
    return x.astype(dtype)


class LayerNorm(nnx.Module):
    """RMS LayerNorm (`center=False` by default) with parameters `g` (ones) and `b` (zeros)."""

    def __init__(self, config: TransformerVQConfig, input_dim: int, *, center: bool = False,
                 norm: bool = True, gain: bool = True, bias: bool = True, rngs: nnx.Rngs | None = None):
        self.input_dim, self.center, self.norm = input_dim, center, norm
        pdt = to_dtype(config.param_dtype)
        self.g = nnx.Param(jnp.ones(input_dim, dtype=pdt)) if gain else None
        self.b = nnx.Param(jnp.zeros(input_dim, dtype=pdt)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, None if self.g is None else self.g[...], None if self.b is None else self.b[...],
                          center=self.center, norm=self.norm)
