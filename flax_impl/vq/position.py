"""Sinusoid features (concatenated sin | cos, not interleaved) and ScaledSin absolute positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from weights.vq.config import TransformerVQConfig
from .common import at_least_float32, to_dtype

__all__ = ["get_sinusoid_embs", "ScaledSin"]


def get_sinusoid_embs(length: int, width: int, lam: float, flip: bool, start: int | jax.Array = 0,
                      dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """[length, width] table: row n = concat(sin(pos_n w), cos(pos_n w)), pos_n = start + n,
    w_i = lam^(-2i/width); rows reversed when `flip` (row n then holds position length-1-n)."""
    pos_seq = (start + jnp.arange(length)).astype(dtype)
    inv_lams = 1 / (lam ** (jnp.arange(0, width, 2).astype(dtype) / width))
    pre = pos_seq[:, None] * inv_lams[None, :]
    cat = jnp.concatenate([jnp.sin(pre), jnp.cos(pre)], axis=-1)
    return jnp.flip(cat, axis=0) if flip else cat


class ScaledSin(nnx.Module):
    """Absolute sinusoid embeddings times one learned scalar `scale`, initialised to 0."""

    def __init__(self, config: TransformerVQConfig, *, rngs: nnx.Rngs | None = None):
        self.config = config
        self.dtype = to_dtype(config.dtype)
        # The reference keeps this scalar in float32 whatever param_dtype is; at least float32 here.
        self.scale = nnx.Param(jnp.zeros((), dtype=at_least_float32(to_dtype(config.param_dtype))))

    def __call__(self, length: int, offset: jax.Array) -> jax.Array:
        scale = self.scale[...]
        embs = get_sinusoid_embs(length, self.config.d_model, self.config.pe_lam, flip=False,
                                 start=offset, dtype=scale.dtype)
        return (scale * embs).astype(self.dtype)
