"""Dropout whose masks the torch twin draws identically: a counter-based hash of (seed, step,
layer, site, element), computed inside the compiled program with int32 ops. `weights.shared.dropout`
is the specification (numpy, unsigned); here the same statements run on two's-complement int32,
whose products and sums wrap to the same bits, with right shifts masked to make them logical.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from weights.shared.dropout import C1, C2, GOLDEN, SALT, SITES, keep_threshold, scale


def _int32(c: int) -> int:
    """An unsigned 32-bit constant as the int32 with the same bits."""
    return c - (1 << 32) if c >= 1 << 31 else c


def fmix32(x: jax.Array) -> jax.Array:
    """murmur3's finaliser on int32 bits (see `weights.shared.dropout.fmix32`)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _int32(C1)
    x = x ^ ((x >> 13) & 0x7FFFF)
    x = x * _int32(C2)
    return x ^ ((x >> 16) & 0xFFFF)


def combine(h: jax.Array, v: jax.Array) -> jax.Array:
    """Fold the int32 `v` into the hash `h`."""
    return fmix32(h + fmix32(v + _int32(GOLDEN)))


def stream_key(dropout_key: jax.Array, layer: int, site: str) -> jax.Array:
    """The key of one mask: seed, step (from `dropout_key`), layer and site folded in that order."""
    h = jnp.full((), _int32(SALT), dtype=jnp.int32)
    for v in (dropout_key[0], dropout_key[1], layer, SITES[site]):
        h = combine(h, jnp.asarray(v, dtype=jnp.int32))
    return h


def _kept(x: jax.Array, rate: float) -> jax.Array:
    # `fmix32(x)` then `((bits >> 8) & 0xFFFFFF) >= keep_threshold(rate)`, the same bits, in the torch
    # twin's statements (which overwrite a block in place; here each rebinds `x`). The test is on the
    # unsigned bits u: u >> 8 >= t exactly when u >= t * 2^8, and flipping the sign bit of both
    # sides turns that into a signed comparison.
    x ^= (x >> 16) & 0xFFFF
    x *= _int32(C1)
    x ^= (x >> 13) & 0x7FFFF
    x *= _int32(C2)
    x ^= (x >> 16) & 0xFFFF
    x ^= _int32(1 << 31)
    return x >= _int32((keep_threshold(rate) << 8) ^ (1 << 31))


def keep_mask(dropout_key: jax.Array, shape: tuple[int, ...], rate: float, layer: int, site: str) -> jax.Array:
    """Boolean keep-mask of `shape` (batch first, columns last); batch rows offset by `dropout_key[2]`."""
    b, inner, cols = shape[0], math.prod(shape[1:-1]), shape[-1]
    batch_rows = jnp.arange(b, dtype=jnp.int32) + dropout_key[2]
    rows = batch_rows[:, None] * inner + jnp.arange(inner, dtype=jnp.int32)[None, :]
    row_hash = combine(stream_key(dropout_key, layer, site), rows.reshape(-1))[:, None]  # [R, 1]
    columns = jnp.arange(cols, dtype=jnp.int32)[None, :] * _int32(GOLDEN)
    # One block: XLA fuses the hash into one loop (the torch twin cuts CPU masks into cached blocks).
    return _kept(row_hash + columns, rate).reshape(shape)


class Dropout(nnx.Module):
    """Zeroes elements at rate `rate` in train mode (`model.train()`: `deterministic=False`) and
    scales the kept ones by `1 / (1 - rate)`; the identity in eval mode (`model.eval()`) or at
    rate 0. The masks are drawn from `dropout_key` (int32 `[3]`: seed, step, batch-row offset; see
    `weights.shared.dropout.dropout_key`), this module's layer and its site."""

    def __init__(self, rate: float, layer_idx: int, site: str):
        keep_threshold(rate)  # validates the rate
        if site not in SITES:
            raise ValueError(f"unknown dropout site {site!r}; one of {tuple(SITES)}")
        self.rate = rate
        self.layer_idx = layer_idx
        self.site = site
        self.deterministic = False  # torch's `not training` (a new module trains); NNX's train()/eval() set it

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x
        if dropout_key is None:
            raise ValueError(f"dropout at {self.site} (layer {self.layer_idx}, p={self.rate}) in train mode needs "
                             "a dropout_key (weights.shared.dropout.dropout_key(seed, step)); call model.eval() "
                             "for inference")
        keep = keep_mask(dropout_key, tuple(x.shape), self.rate, self.layer_idx, self.site)
        # The scale is rounded to the activation dtype before the multiply, as in the torch twin.
        return jnp.where(keep, x * jnp.asarray(scale(self.rate), dtype=x.dtype), jnp.zeros((), dtype=x.dtype))
