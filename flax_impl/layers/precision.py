"""The one precision policy, Flax side (mirrors `torch_impl/layers/precision.py`).

1. Statistics in float32: norm statistics, rotary angles, softmax and losses are computed in
   `compute_dtype(dtype)` (float32, or float64 when the model runs in float64) and cast back to
   the activation dtype after. The casts are written at each op, identically in both twins.
2. Matrix products at full precision for the dtype they run in. XLA takes a precision per dot:
   every dot of the Flax twin (`Linear`, attention's two matmuls, the tied LM head, the MoE
   einsums) is given the module's `precision`, by default `DEFAULT_PRECISION` (HIGHEST).
   `dot_precision(mode, dtype)` is the value for a matmul mode; `matmul_precision(mode)` also
   sets JAX's default for dots written without one, for a block, and restores it.

What a bare `model(x)` does on a GPU: the model's own `precision`, HIGHEST unless it was built
with another, so float32 means float32 (without it, XLA would run float32 dots in TF32 on
NVIDIA Ampere and later, and in one bfloat16 pass on TPUs). For TF32 speed, build with
`precision=dot_precision("tf32", jnp.float32)` (or `from_pretrained(..., precision="tf32")`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax
import jax.numpy as jnp

# See torch_impl/layers/precision.py: full float32; TensorFloat-32 (GPUs); bf16x3 (XLA only).
MATMUL_PRECISIONS = ("highest", "tf32", "bf16x3")
DEFAULT_PRECISION = jax.lax.Precision.HIGHEST
# JAX's names for the same modes, for dots written without a precision (`jax_default_matmul_precision`):
# "tensorfloat32" is TF32 on GPUs and a no-op on CPUs (an algorithm would fail to compile there).
_JAX_DEFAULT = {"highest": "highest", "tf32": "tensorfloat32", "bf16x3": "BF16_BF16_F32_X3"}


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


def _check_mode(mode: str) -> None:
    if mode not in MATMUL_PRECISIONS:
        raise ValueError(f"unknown matmul precision {mode!r}; one of {', '.join(MATMUL_PRECISIONS)}")


def dot_precision(mode: str, dtype: jnp.dtype, platform: str | None = None) -> jax.lax.PrecisionLike:
    """The `precision=` of every dot of a model computing in `dtype`, for matmul `mode` on
    `platform` ("cpu", "gpu"/"cuda"/"rocm", "tpu"; default: JAX's default backend).

    Only float32 dots have a mode: bfloat16/float16 dots have one rounding, float64 ones are never
    reduced, so they are always HIGHEST. An explicit algorithm (`DotAlgorithmPreset`) is used for
    tf32 and bf16x3 because Precision.HIGH means TF32 on GPUs but bf16x3 on TPUs.
    """
    _check_mode(mode)
    platform = platform or jax.default_backend()
    if mode == "highest" or jnp.dtype(dtype) != jnp.float32:
        return DEFAULT_PRECISION
    if mode == "tf32":
        if platform == "tpu":
            raise ValueError("matmul precision 'tf32': TPUs have no TensorFloat-32; use 'bf16x3' or 'highest'")
        # XLA's CPU backend has no TF32 (it rejects the algorithm): float32 there.
        return DEFAULT_PRECISION if platform == "cpu" else jax.lax.DotAlgorithmPreset.TF32_TF32_F32
    # bf16x3 on GPUs and TPUs; XLA's CPU backend accepts it and computes in float32.
    return jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3


def matmul_settings() -> dict[str, str]:
    """JAX's default matmul precision as it is now (what a report records); dots of the twin
    carry their own `precision` and do not use it."""
    return {"jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision)}


@contextlib.contextmanager
def matmul_precision(mode: str = "highest") -> Iterator[dict[str, str]]:
    """Run the block with JAX's default matmul precision in `mode` (one of `MATMUL_PRECISIONS`),
    then restore it, even on error. Yields the settings in force."""
    _check_mode(mode)
    with jax.default_matmul_precision(_JAX_DEFAULT[mode]):
        yield matmul_settings()
