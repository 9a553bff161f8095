"""The one dense layer of the twin, and the one factory that builds and initialises it.

Parameters are stored in `param_dtype` and cast to the activation `dtype` at use, in `__call__`,
exactly where the torch twin casts them: with `param_dtype=float32, dtype=bfloat16` the weights
keep full precision while every product runs in bfloat16.

`prepack_linears` is a CPU speed switch, the torch twin's mirrored: XLA:CPU multiplies one row
(a decode step at batch 1) by a matrix laid out `[out, in]` faster than by the kernel's `[in, out]`
(the mid-size model's 2816 x 1024 down projection: 0.61-0.67 ms against 0.94-1.06 ms), and a
hundred-odd rows too; so a copy of the kernel in `[out, in]`, kept beside it, makes greedy
decoding at batch 1 1.2x faster. At 2-8 rows XLA's GEMM reads the kernel's layout faster.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
import weakref
from typing import Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from weights.config import ModelConfig

from .precision import DEFAULT_PRECISION


class PackedWeight(NamedTuple):
    """A kernel laid out for inputs of exactly `rows` rows (`weight`, `[out, in]`), and the kernel
    array it was made from (`source`: the same object while the kernel is unchanged)."""

    rows: int
    weight: jax.Array
    source: jax.Array


# Packs live beside the modules, not in them: the model's state (checkpoints, sharding, the
# optimizer, the scanned layers' stack) stays exactly its parameters.
_PACKS: weakref.WeakKeyDictionary[nnx.Module, dict[int, PackedWeight]] = weakref.WeakKeyDictionary()
# Inside a jitted program that `reading_packed_linears` opened: traced kernel's id -> (kernel, its
# packed weights by row count).
_TRACED_PACKS: contextvars.ContextVar[dict[int, tuple[jax.Array, dict[int, jax.Array]]]] = \
    contextvars.ContextVar("traced_packs", default={})


class Linear(nnx.Linear):
    """`y = x K + b`, kernel K `[in, out]` (the transpose of HF's weight) stored in `param_dtype`,
    computed in `dtype` at the dot precision `precision`.

    `packed` (row count -> `PackedWeight`, set by `prepack_linears`) is empty unless asked for."""

    @property
    def packed(self) -> dict[int, PackedWeight]:
        """The packed weights `prepack_linears` made for this layer, by row count."""
        return _PACKS.get(self, {})

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[..., in] -> [..., out]`."""
        # Parameters cast to the activation dtype at use (a no-op when the dtypes agree).
        w = self.kernel[...].astype(self.dtype)
        b = None if self.bias is None else self.bias[...].astype(self.dtype)
        packed = self.packed_for(x) if self.packed or _TRACED_PACKS.get() else None
        if packed is not None:
            y = jax.lax.dot_general(x.astype(self.dtype), packed.weight, (((x.ndim - 1,), (1,)), ((), ())),
                                    precision=self.precision)
        else:
            y = jnp.matmul(x.astype(self.dtype), w, precision=self.precision)
        return y if b is None else y + b

    def packed_for(self, x: jax.Array) -> PackedWeight | None:
        """The packed weight for `x`'s row count, if one was made and the kernel has not changed
        since (a stale one is dropped: call `prepack_linears` again)."""
        kernel = self.kernel.get_value()
        if isinstance(kernel, jax.core.Tracer):
            return _traced_pack(kernel, x.size // x.shape[-1])
        packed = self.packed.get(x.size // x.shape[-1])
        if packed is not None and packed.source is not kernel:
            del self.packed[packed.rows]
            return None
        return packed


def linear(config: ModelConfig, in_features: int, out_features: int, bias: bool, *,
           dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype | None = None,
           precision: jax.lax.PrecisionLike = DEFAULT_PRECISION, rngs: nnx.Rngs) -> Linear:
    """A `Linear` with HF's init: kernel normal(0, `initializer_range`), bias zero. Every
    projection of the twin (attention, MLP, experts, router, heads) is built here."""
    return Linear(in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=param_dtype or dtype,
                  precision=precision, kernel_init=nnx.initializers.normal(config.initializer_range),
                  bias_init=nnx.initializers.zeros, rngs=rngs)


def prepack_linears(model: nnx.Module, rows: Iterable[int]) -> nnx.Module:
    """Give every float32 CPU `Linear` of `model` its kernel laid out for inputs of exactly each
    of `rows` rows, replacing the packs it had; `rows=()` drops them. Returns `model`.

    The torch twin's switch of the same name, in XLA's terms: the pack is one `[out, in]` copy of
    the kernel (the same copy for every row count; MoE experts get none, as the MoE block
    multiplies their kernels stacked), and a call with a packed row count multiplies
    by it (the same dot products, summed in another order: within the tolerance table). It is
    read by eager calls while the kernel is still the array it was copied from, by `generate()`,
    which checks that before it compiles (`linear_packs`), by the serving `Runner`'s programs
    (the packs fresh when it is built; it copies a changed kernel again itself), and by a jitted
    function of your own that does the same (`reading_packed_linears`); any other traced call
    (`jax.jit`, `nnx.grad`, the scanned layers' stack) multiplies by the kernel. Elsewhere a
    kernel given a new value drops its pack: pack again. The copy costs one more copy of
    the linears' weights: 488 MB for the bench's mid-size model, about 4 GB at 1.1 B float32
    parameters. Measured on the 2-core CPU (`make bench` section `side_by_side`, system
    "flax-packed", packed for the workload's row counts): greedy decoding at batch 1 1.23x faster
    (0.81x HF Flax's time), a 1 x 128 forward 1.15x, a 4 x 512 forward 1.03x; at batch 8 0.93x
    (XLA's GEMM reads the kernel faster at 8 rows: do not pack them).

    Example: `prepack_linears(model, (1,))`, then `generate(model, ids_1_row, ...)` decodes on the
    copies (its prompt pass, one row of several tokens, reads the kernels)."""
    rows = tuple(rows)
    if any(not isinstance(r, numbers.Integral) or isinstance(r, bool) or r < 1 for r in rows):
        raise ValueError(f"rows: expected positive integers (tokens per call), got {rows!r}")
    rows = tuple(int(r) for r in rows)
    # Both MoE paths multiply the experts' kernels stacked, never through their Linears (the
    # torch twin's sparse path calls each expert): a copy of theirs would never be read.
    linears = [m for key, m in linear_layers(model).items() if "/experts/" not in key]
    # A sharded kernel is one global array over several devices: XLA lays its pieces out itself.
    eligible = [m for m in linears if m.dtype == m.kernel.get_value().dtype == jnp.float32
                and _placement(m.kernel.get_value()) == "cpu"]
    if rows and not eligible:
        dtypes = sorted({f"{m.kernel.get_value().dtype} on {_placement(m.kernel.get_value())}" for m in linears})
        raise ValueError(f"prepack_linears: no Linear of the model computes in float32 on one CPU device (found "
                         f"{', '.join(dtypes) or 'no Linear'}); the [out, in] copy is a CPU float32 switch")
    for layer in linears:
        _PACKS.pop(layer, None)
    for layer in (eligible if rows else ()):
        kernel = layer.kernel.get_value()
        weight = jnp.transpose(kernel)  # a new array in [out, in] order: one copy for every row count
        _PACKS[layer] = {r: PackedWeight(r, weight, kernel) for r in rows}
    return model


def linear_layers(model: nnx.Module) -> dict[str, Linear]:
    """`model`'s linears by their path ("model/layers/0/mlp/up_proj"): the keys of `linear_packs`."""
    return {"/".join(map(str, path)): m for path, m in nnx.iter_graph(model) if isinstance(m, Linear)}


def linear_packs(model: nnx.Module) -> dict[str, dict[int, jax.Array]]:
    """The packed weights of `model`'s linears whose kernels have not changed since they were
    packed, by the layer's path and row count: what `reading_packed_linears` takes into a jitted
    program (a pytree argument). Stale packs are dropped; empty (and cheap) when none exist."""
    if not _PACKS:
        return {}
    packs = {}
    for key, layer in linear_layers(model).items():
        if layer.packed:
            kernel = layer.kernel.get_value()
            fresh = {r: p.weight for r, p in layer.packed.items() if p.source is kernel}
            if len(fresh) < len(layer.packed):
                _PACKS[layer] = {r: p for r, p in layer.packed.items() if r in fresh}
            if fresh:
                packs[key] = fresh
    return packs


@contextlib.contextmanager
def reading_packed_linears(model: nnx.Module, packs: dict[str, dict[int, jax.Array]]) -> Iterator[None]:
    """Within the block, inside a jitted program, `model`'s linears multiply by `packs`
    (`linear_packs` of the same model, passed in as an argument) at their row counts."""
    if not packs:
        yield
        return
    layers = linear_layers(model)
    unknown = sorted(set(packs) - set(layers))
    if unknown:
        raise ValueError(f"reading_packed_linears: {len(unknown)} packs name no Linear of this model (first: "
                         f"{unknown[0]}): they are not linear_packs() of it")
    traced = {}
    for key, pack in packs.items():
        kernel = layers[key].kernel.get_value()
        traced[id(kernel)] = (kernel, pack)
    token = _TRACED_PACKS.set({**_TRACED_PACKS.get(), **traced})
    try:
        yield
    finally:
        _TRACED_PACKS.reset(token)


def _traced_pack(kernel: jax.Array, rows: int) -> PackedWeight | None:
    # Traced, a kernel cannot be compared with the array it was packed from: only the packs that
    # `reading_packed_linears` checked and handed to this program apply.
    kernel_and_packs = _TRACED_PACKS.get().get(id(kernel))
    if kernel_and_packs is None or kernel_and_packs[0] is not kernel or rows not in kernel_and_packs[1]:
        return None
    return PackedWeight(rows, kernel_and_packs[1][rows], kernel)


def _placement(kernel: jax.Array) -> str:
    """"cpu" for an array on one CPU device, else where it is (e.g. "gpu", "8 cpu devices")."""
    platforms = sorted({d.platform for d in kernel.devices()})
    n = len(kernel.devices())
    return "+".join(platforms) if n == 1 else f"{n} {'+'.join(platforms)} devices"
