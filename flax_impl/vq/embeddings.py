"""Token embeddings with tied logits and an output bias (no sqrt(E) scaling)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from weights.vq.config import TransformerVQConfig
from ..layers.precision import DEFAULT_PRECISION
from .common import at_least_float32, to_dtype

__all__ = ["Embeddings"]


class Embeddings(nnx.Module):
    """`embs` [V, E] ~ N(0, 1) and `bias_out` [V] (zeros; a dead parameter when untied)."""

    def __init__(self, config: TransformerVQConfig, *, precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
                 rngs: nnx.Rngs):
        self.precision = precision
        pdt = to_dtype(config.param_dtype)
        self.dtype = to_dtype(config.dtype)
        self.embs = nnx.Param(jax.random.normal(rngs.params(), (config.n_vocab, config.d_model), pdt))
        self.bias_out = nnx.Param(jnp.zeros(config.n_vocab, dtype=pdt))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, P] token ids -> [B, P, E] in dtype."""
        return jnp.take(self.embs[...], x.astype(jnp.int32), axis=0).astype(self.dtype)

    def logits(self, x: jax.Array) -> jax.Array:
        """Tied logits x . embs^T + bias_out, in at least float32 (the reference: float32)."""
        ct = at_least_float32(self.dtype)
        x = x.astype(ct)
        x = jnp.matmul(x, self.embs[...].T.astype(ct), precision=self.precision)
        return x + self.bias_out[...].astype(ct)[None, None, :]
