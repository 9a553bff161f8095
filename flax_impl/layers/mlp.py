"""Gated MLP: `down(act(gate(x)) * up(x))` — SwiGLU with silu, GeGLU with gelu."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from weights.config import ModelConfig

from .linear import linear
from .precision import DEFAULT_PRECISION

# HF `ACT2FN` names -> functions. The tanh GELUs are one formula under two HF names.
ACT2FN: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class MLP(nnx.Module):
    """The feed-forward block of every decoder layer."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype | None = None, precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
                 rngs: nnx.Rngs):
        e, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.gate_proj = linear(config, e, i, bias, **kw)
        self.up_proj = linear(config, e, i, bias, **kw)
        self.down_proj = linear(config, i, e, bias, **kw)
        self.act_fn = ACT2FN[config.mlp_activation]  # gemma: hidden_activation, tanh GELU fallback

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, T, E] -> [B, T, E]`."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
