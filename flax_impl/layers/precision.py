"""The one precision rule: statistics in float32, or float64 when the model runs in float64."""

import jax.numpy as jnp


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """dtype for norm statistics, rotary angles, softmax and losses of activations in `dtype`."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


# The dtype names of `weights.dtypes.FLOAT_DTYPES` (config.json, the CLI, the configs) -> jax.
DTYPES: dict[str, jnp.dtype] = {"float64": jnp.dtype(jnp.float64), "float32": jnp.dtype(jnp.float32),
                                "bfloat16": jnp.dtype(jnp.bfloat16), "float16": jnp.dtype(jnp.float16)}


def to_dtype(name: str) -> jnp.dtype:
    """A dtype name ("bfloat16", ...) -> the jax dtype."""
    return DTYPES[name]


def dtype_name(dtype: jnp.dtype) -> str:
    """A jax dtype -> its name ("bfloat16", ...)."""
    for name, d in DTYPES.items():
        if d == jnp.dtype(dtype):
            return name
    raise ValueError(f"{dtype} is not one of the dtypes {', '.join(DTYPES)}")
