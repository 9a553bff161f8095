"""The one precision rule: statistics in float32, or float64 when the model runs in float64."""

import jax.numpy as jnp


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """dtype for norm statistics, rotary angles, softmax and losses of activations in `dtype`."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32
