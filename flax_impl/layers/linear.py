"""The one dense layer of the twin, and the one factory that builds and initialises it.

Parameters are stored in `param_dtype` and cast to the activation `dtype` at use, in `__call__`,
exactly where the torch twin casts them: with `param_dtype=float32, dtype=bfloat16` the weights
keep full precision while every product runs in bfloat16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from weights.config import ModelConfig

from .precision import DEFAULT_PRECISION


class Linear(nnx.Linear):
    """`y = x K + b`, kernel K `[in, out]` (the transpose of HF's weight) stored in `param_dtype`,
    computed in `dtype` at the dot precision `precision`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[..., in] -> [..., out]`."""
        # Parameters cast to the activation dtype at use (a no-op when the dtypes agree).
        w = self.kernel[...].astype(self.dtype)
        b = None if self.bias is None else self.bias[...].astype(self.dtype)
        y = jnp.matmul(x.astype(self.dtype), w, precision=self.precision)
        return y if b is None else y + b


def linear(config: ModelConfig, in_features: int, out_features: int, bias: bool, *,
           dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype | None = None,
           precision: jax.lax.PrecisionLike = DEFAULT_PRECISION, rngs: nnx.Rngs) -> Linear:
    """A `Linear` with HF's init: kernel normal(0, `initializer_range`), bias zero. Every
    projection of the twin (attention, MLP, experts, router, heads) is built here."""
    return Linear(in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=param_dtype or dtype,
                  precision=precision, kernel_init=nnx.initializers.normal(config.initializer_range),
                  bias_init=nnx.initializers.zeros, rngs=rngs)
