"""Dropout whose masks the Flax twin draws identically: a counter-based hash of (seed, step,
layer, site, element), computed on the device with int32 ops. `weights.shared.dropout` is the
specification (numpy, unsigned); here the same statements run on two's-complement int32, whose
products and sums wrap to the same bits, with right shifts masked to make them logical.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from weights.shared.dropout import C1, C2, GOLDEN, SALT, SITES, keep_threshold, scale


def _int32(c: int) -> int:
    """An unsigned 32-bit constant as the int32 with the same bits."""
    return c - (1 << 32) if c >= 1 << 31 else c


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser on int32 bits (see `weights.shared.dropout.fmix32`)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _int32(C1)
    x = x ^ ((x >> 13) & 0x7FFFF)
    x = x * _int32(C2)
    return x ^ ((x >> 16) & 0xFFFF)


def combine(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Fold the int32 `v` into the hash `h`."""
    return fmix32(h + fmix32(v + _int32(GOLDEN)))


def stream_key(dropout_key: torch.Tensor, layer: int, site: str) -> torch.Tensor:
    """The key of one mask: seed, step (from `dropout_key`), layer and site folded in that order."""
    h = torch.full((), _int32(SALT), dtype=torch.int32, device=dropout_key.device)
    for v in (dropout_key[0], dropout_key[1], layer, SITES[site]):
        h = combine(h, torch.as_tensor(v, dtype=torch.int32, device=dropout_key.device))
    return h


# Rows of a mask hashed per block on CPU: about 1 MB of int32, so the block stays in cache through
# the hash's dozen passes (eager torch runs each op as a pass over memory; XLA fuses them into one).
CPU_BLOCK_ELEMENTS = 1 << 18


def _kept(x: torch.Tensor, rate: float) -> torch.Tensor:
    # `fmix32(x)` then `((bits >> 8) & 0xFFFFFF) >= keep_threshold(rate)`, the same bits, on a fresh
    # block `x` overwritten in place (no new block-sized tensor per op). The test is on the unsigned
    # bits u: u >> 8 >= t exactly when u >= t * 2^8, and flipping the sign bit of both sides turns
    # that into a signed comparison.
    x ^= (x >> 16) & 0xFFFF
    x *= _int32(C1)
    x ^= (x >> 13) & 0x7FFFF
    x *= _int32(C2)
    x ^= (x >> 16) & 0xFFFF
    x ^= _int32(1 << 31)
    return x >= _int32((keep_threshold(rate) << 8) ^ (1 << 31))


def keep_mask(dropout_key: torch.Tensor, shape: tuple[int, ...], rate: float, layer: int, site: str) -> torch.Tensor:
    """Boolean keep-mask of `shape` (batch first, columns last); batch rows offset by `dropout_key[2]`."""
    b, inner, cols = shape[0], math.prod(shape[1:-1]), shape[-1]
    device = dropout_key.device
    batch_rows = torch.arange(b, dtype=torch.int32, device=device) + dropout_key[2]
    rows = batch_rows[:, None] * inner + torch.arange(inner, dtype=torch.int32, device=device)[None, :]
    row_hash = combine(stream_key(dropout_key, layer, site), rows.reshape(-1))[:, None]  # [R, 1]
    columns = torch.arange(cols, dtype=torch.int32, device=device)[None, :] * _int32(GOLDEN)
    keep = torch.empty((row_hash.shape[0], cols), dtype=torch.bool, device=device)
    # On CPU in cache-sized blocks of rows (the bench's 8 masks of [1, 16, 512, 512] on 2 cores: one
    # thread 800 -> 214 ms, two 666 -> 277 ms); on an accelerator in one block (an op is a launch).
    block = max(1, CPU_BLOCK_ELEMENTS // cols) if device.type == "cpu" else keep.shape[0]
    for start in range(0, keep.shape[0], block):
        keep[start:start + block] = _kept(row_hash[start:start + block] + columns, rate)
    return keep.reshape(shape)


class Dropout(nn.Module):
    """Zeroes elements at rate `rate` in train mode (`model.train()`) and scales the kept ones by
    `1 / (1 - rate)`; the identity in eval mode (`model.eval()`) or at rate 0. The masks are drawn
    from `dropout_key` (int32 `[3]`: seed, step, batch-row offset; see
    `weights.shared.dropout.dropout_key`), this module's layer and its site."""

    def __init__(self, rate: float, layer_idx: int, site: str):
        super().__init__()
        keep_threshold(rate)  # validates the rate
        if site not in SITES:
            raise ValueError(f"unknown dropout site {site!r}; one of {tuple(SITES)}")
        self.rate = rate
        self.layer_idx = layer_idx
        self.site = site

    def forward(self, x: torch.Tensor, dropout_key: torch.Tensor | None) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        if dropout_key is None:
            raise ValueError(f"dropout at {self.site} (layer {self.layer_idx}, p={self.rate}) in train mode needs "
                             "a dropout_key (weights.shared.dropout.dropout_key(seed, step)); call model.eval() "
                             "for inference")
        keep = keep_mask(dropout_key, tuple(x.shape), self.rate, self.layer_idx, self.site)
        # The scale is rounded to the activation dtype before the multiply, as in the Flax twin.
        return torch.where(keep, x * torch.tensor(scale(self.rate), dtype=x.dtype, device=x.device),
                           torch.zeros((), dtype=x.dtype, device=x.device))
