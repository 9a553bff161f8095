"""How the Flax twin is cut over a device mesh: the partition table and JAX SPMD applying it.

The table (`PARTITION_RULES`) is data in the format of `weights.partition` — HF-name pattern ->
mesh axis per dimension of the HF-layout tensor — the same table, rule for rule, as
`torch_impl.sharding.PARTITION_RULES`. Here it becomes one `NamedSharding` per parameter
(kernels are `[in, out]`, so their axes are reversed) on a `jax.sharding.Mesh`; `jax.jit` then
compiles the model's own forward, gradients and decode loop for that placement (GSPMD inserts
the collectives). Nothing about sharding sits inside a layer: the only activation constraint is
at the layer boundary (`constrain_activations`, rows over `data`/`fsdp`), and it is a no-op
outside a mesh context (`jax.set_mesh(mesh)`).

Usage:
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    model = ForCausalLM.from_pretrained(path, mesh=mesh)          # each device reads its slice
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda m, ids: m(ids).logits)(model, ids)

Overriding a rule: rules are tried in order, so put yours first,
`rules=((r"lm_head\\.weight$", (None, "tensor")), *PARTITION_RULES)`.
"""

from __future__ import annotations

import math
from typing import Sequence, TypeVar

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from weights.names import hf_name, is_transposed
from weights.partition import Rule, partition_spec

__all__ = ["PARTITION_RULES", "constrain_activations", "local_kv_heads", "param_shardings", "process_count",
           "shard_model"]

M = TypeVar("M", bound=nnx.Module)

# The default plan, for every family (families are config fields, so their parameter names are
# the same few): Megatron-style tensor parallelism along `tensor` — column-parallel q/k/v and
# gate/up (each device computes some heads / some hidden units), row-parallel o/down (partial
# sums all-reduced), vocab-parallel embedding and LM head, experts cut like an MLP each — and
# the other dimension of every big matrix along `fsdp`. Norms, the router and small heads
# (score, qa_outputs) are replicated. Mirrors torch_impl.sharding.PARTITION_RULES exactly.
PARTITION_RULES: tuple[Rule, ...] = (
    (r"embed_tokens\.weight$", ("tensor", "fsdp")),  # vocab-parallel [V, E]
    (r"lm_head\.weight$", ("tensor", "fsdp")),  # vocab-parallel [V, E]
    (r"self_attn\.(q|k|v)_proj\.weight$", ("tensor", "fsdp")),  # column-parallel [out, in]
    (r"self_attn\.(q|k|v)_proj\.bias$", ("tensor",)),
    (r"mlp\.(gate|up)_proj\.weight$", ("tensor", "fsdp")),
    (r"mlp\.(gate|up)_proj\.bias$", ("tensor",)),
    (r"experts\.\d+\.(w1|w3)\.weight$", ("tensor", "fsdp")),
    (r"self_attn\.o_proj\.weight$", ("fsdp", "tensor")),  # row-parallel [out, in]; bias whole
    (r"mlp\.down_proj\.weight$", ("fsdp", "tensor")),
    (r"experts\.\d+\.w2\.weight$", ("fsdp", "tensor")),
)


def param_shardings(model: nnx.Module, mesh: Mesh, rules: Sequence[Rule] = PARTITION_RULES
                    ) -> dict[str, NamedSharding]:
    """HF name -> the `NamedSharding` of that parameter under `rules` (works on abstract models)."""
    if any(t != AxisType.Auto for t in mesh.axis_types):
        # Explicit axes (jax.make_mesh's default) type every array's sharding; the twins leave the
        # activations to GSPMD's propagation, constrained at layer boundaries only.
        raise ValueError(f"mesh axes {mesh.axis_names} are {mesh.axis_types}: build the mesh with "
                         "axis_types=(jax.sharding.AxisType.Auto,) * n (or jax.sharding.Mesh(devices, names))")
    sizes = dict(mesh.shape)
    out: dict[str, NamedSharding] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = hf_name(path)
        shape = tuple(var.get_value().shape)
        if is_transposed(name):  # the table speaks of HF's [out, in]; the kernel is [in, out]
            axes = partition_spec(name, shape[::-1], sizes, rules)[::-1]
        else:
            axes = partition_spec(name, shape, sizes, rules)
        out[name] = NamedSharding(mesh, PartitionSpec(*axes))
    return out


def shard_model(model: M, mesh: Mesh, rules: Sequence[Rule] = PARTITION_RULES) -> M:
    """Place every parameter of `model` on `mesh` as `rules` say (in place; returns `model`)."""
    shardings = param_shardings(model, mesh, rules)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jax.device_put(var.get_value(), shardings[hf_name(path)]))
    return model


def local_kv_heads(model: nnx.Module) -> int:
    """The kv heads one process's attention computes (and `generate()` caches): always the config's
    here — a sharded array is one global array, GSPMD places its heads (the torch twin's ranks
    each hold a local share)."""
    return model.config.resolved_num_key_value_heads


def process_count(mesh: Mesh | None) -> int:
    """How many processes hold a part of a model sharded over `mesh` (1 without one)."""
    if mesh is None:
        return 1
    return len({device.process_index for device in mesh.devices.flat})


def constrain_activations(hidden_states: jax.Array) -> jax.Array:
    """At a layer boundary: rows `[B, ...]` split over the mesh's `data` and `fsdp` axes, the rest
    whole. Unchanged outside a mesh context, or when B does not divide by those axes' size
    (a two-row generate on an 8-way mesh runs with replicated rows)."""
    mesh = jax.sharding.get_abstract_mesh()
    rows = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    size = math.prod(mesh.shape[a] for a in rows)
    if not rows or hidden_states.shape[0] % size:
        return hidden_states
    spec = PartitionSpec(rows, *(None,) * (hidden_states.ndim - 1))
    return jax.lax.with_sharding_constraint(hidden_states, spec)
