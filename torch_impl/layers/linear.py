"""The one dense layer of the twin, and the one factory that builds and initialises it.

Parameters are stored in `param_dtype` and cast to the activation `dtype` at use, in `forward`,
exactly where the Flax twin casts them: with `param_dtype=float32, dtype=bfloat16` the weights
keep full precision while every product runs in bfloat16.

`prepack_linears` is a CPU speed switch of this twin only: MKL's float32 GEMM on a weight packed
once, instead of the weight `F.linear` hands MKL unpacked on every call (which MKL then packs
itself, every call: at 8 rows that is half the product's time). The Flax twin's switch of the
same name keeps an `[out, in]` copy of each kernel for XLA:CPU's one-row products.
"""

from __future__ import annotations

import numbers
from typing import Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from weights.config import ModelConfig


class PackedWeight(NamedTuple):
    """A weight packed by MKL for inputs of exactly `rows` rows, and the stamp (address, version)
    of the weight it was packed from."""

    rows: int
    weight: torch.Tensor
    source: tuple[int, int | None]


def _stamp(weight: torch.Tensor) -> tuple[int, int | None]:
    # In-place writes (an optimizer step, load_state_dict's copy) bump the version; an inference
    # tensor keeps none, and only its address can tell.
    return weight.data_ptr(), None if weight.is_inference() else weight._version


class Linear(nn.Linear):
    """`y = x W^T + b`, W `[out, in]` (HF layout) stored in `param_dtype`, computed in `dtype`.

    `packed` (row count -> `PackedWeight`, set by `prepack_linears`) is empty unless asked for."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: torch.dtype = torch.float32, param_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias=bias, dtype=param_dtype or dtype, device=device)
        self.dtype = dtype
        self.packed: dict[int, PackedWeight] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., in] -> [..., out]`."""
        # Parameters cast to the activation dtype at use (a no-op when the dtypes agree).
        w = self.weight.to(self.dtype)
        b = None if self.bias is None else self.bias.to(self.dtype)
        packed = self.packed_for(x) if self.packed else None
        if packed is not None:
            return torch.ops.mkl._mkl_linear(x.to(self.dtype), packed.weight, w, b, packed.rows)
        return F.linear(x.to(self.dtype), w, b)  # x @ w.T + b, the bias added in the same BLAS call

    def packed_for(self, x: torch.Tensor) -> PackedWeight | None:
        """The packed weight for `x`'s row count, if one was made and its weight has not changed
        since (a stale one is dropped: call `prepack_linears` again)."""
        # The packed product has no autograd kernel, and torch.compile packs its own (frozen) weights.
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad)):
            return None
        packed = self.packed.get(x.numel() // x.shape[-1])
        if packed is not None and packed.source != _stamp(self.weight):
            del self.packed[packed.rows]
            return None
        return packed


def linear(config: ModelConfig, in_features: int, out_features: int, bias: bool, *,
           dtype: torch.dtype = torch.float32, param_dtype: torch.dtype | None = None) -> Linear:
    """A `Linear` with HF's init: weight normal(0, `initializer_range`), bias zero, on torch's
    default device (`with torch.device(...)` picks it). Every projection of the twin (attention,
    MLP, experts, router, heads) is built here."""
    # Built on the meta device, then given memory: no default (Kaiming) draw first, so each weight
    # is drawn once, as NNX does. Under `torch.device("meta")` (from_pretrained) it stays shapes only.
    layer = Linear(in_features, out_features, bias, dtype=dtype, param_dtype=param_dtype, device="meta")
    layer = layer.to_empty(device=torch.get_default_device())
    with torch.no_grad():
        layer.weight.normal_(0.0, config.initializer_range)
        if layer.bias is not None:
            layer.bias.zero_()
    return layer


def prepack_linears(model: nn.Module, rows: Iterable[int]) -> nn.Module:
    """Give every float32 CPU `Linear` of `model` its weight packed by MKL for inputs of exactly
    each of `rows` rows (the tokens one call multiplies: a forward of `[B, T]` has B x T, a decode
    step at batch b has b), replacing the packs it had; `rows=()` drops them. Returns `model`.

    A call with a packed row count multiplies by the packed weight (float32, within the tolerance
    table of the plain product: MKL sums in another order); any other call, a call under autograd
    or `torch.compile`, and a weight changed since it was packed take the plain `F.linear` (a
    write through `.data` bypasses the version counter that tells: pack again after one).
    Each row count costs one more copy of the packed weights: 488 MB for the bench's mid-size
    model, about 4 GB at 1.1 B parameters. Measured on the 2-core CPU (`make bench` section
    `side_by_side`, system "torch-packed"): greedy decoding at batch 8 1.7x faster, a 1 x 128
    forward 1.45x; at 1 or 2 rows nothing gained, nor at 2048 (a 4 x 512 forward: 0.97x the plain
    time quiet, 1.28x in a busier run).

    Example: `prepack_linears(model, (8,))`, then `generate(model, ids_8_rows, ...)` decodes on
    packed weights (its prompt pass, 8 x prompt length rows, stays plain unless packed too)."""
    rows = tuple(rows)
    if any(not isinstance(r, numbers.Integral) or isinstance(r, bool) or r < 1 for r in rows):
        raise ValueError(f"rows: expected positive integers (tokens per call), got {rows!r}")
    rows = tuple(int(r) for r in rows)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    # A sharded (DTensor) weight's .data is not a plain tensor: MKL cannot pack it.
    eligible = [m for m in linears if m.dtype == m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
                and type(m.weight.data) is torch.Tensor]
    if rows and not torch.backends.mkl.is_available():
        raise RuntimeError("prepack_linears: this torch build has no MKL (torch.backends.mkl.is_available() is False)")
    if rows and not eligible:
        dtypes = sorted({f"{m.weight.dtype} on {m.weight.device.type}" for m in linears})
        raise ValueError(f"prepack_linears: no Linear of the model computes in float32 on the CPU (found "
                         f"{', '.join(dtypes) or 'no Linear'}); MKL packs float32 weights only")
    for layer in linears:
        layer.packed = {}
    with torch.no_grad():
        for layer in eligible:
            weight = layer.weight.detach()
            layer.packed = {r: PackedWeight(r, torch.ops.mkl._mkl_reorder_linear_weight(weight, r), _stamp(layer.weight))
                            for r in rows}
    return model
