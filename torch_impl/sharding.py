"""How the torch twin is cut over a device mesh: the partition table and torch.distributed
applying it.

The table (`PARTITION_RULES`) is data in the format of `weights.partition` — HF-name pattern ->
mesh axis per dimension of the HF-layout tensor — the same table, rule for rule, as
`flax_impl.sharding.PARTITION_RULES`. Here it becomes torch's own engines on a `DeviceMesh`
whose dimension names are mesh axes:

- `tensor`: DTensor tensor parallelism (`parallelize_module`). A linear layer (or embedding)
  whose weight the table splits along dimension 0 gets `ColwiseParallel` (embedding:
  vocab-parallel `RowwiseParallel`), along dimension 1 `RowwiseParallel`. A column-parallel
  layer hands its output shard to a row-parallel sibling (q/k/v -> o, gate/up -> down); one with
  no such sibling (the LM head) gathers its output.
- `fsdp`: FSDP2 (`fully_shard`) per decoder layer, then the root; without `tensor`, each
  parameter is split along the dimension the table gives `fsdp` (dimension 0 if none: FSDP2
  shards every parameter).
- `data` with `fsdp`: HSDP (`fully_shard` on the 2-D `(data, fsdp)` mesh).

Nothing about sharding sits inside a layer: activation layouts are fixed by the parallel styles
at module boundaries, so `constrain_activations` (the Flax twin's layer-boundary constraint)
has nothing to do here.

Usage, under `torchrun --nproc-per-node 2` (gloo on CPU, NCCL on GPU):
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tensor",))
    model = shard_model(ForCausalLM.from_pretrained(path), mesh)
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import TYPE_CHECKING, Callable, Iterator, Sequence, TypeVar

import torch
from torch import nn

from weights.partition import Rule, partition_spec

from .layers.attention import Attention

if TYPE_CHECKING:  # torch.distributed.tensor takes seconds to import: the functions import it when called
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ParallelStyle

__all__ = ["PARTITION_RULES", "constrain_activations", "gathered_for_generation", "local_kv_heads",
           "param_shardings", "process_count", "shard_model"]

M = TypeVar("M", bound=nn.Module)

# The default plan, for every family: see flax_impl.sharding.PARTITION_RULES (mirrored exactly).
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


def _mesh_sizes(mesh: DeviceMesh) -> dict[str, int]:
    if mesh.mesh_dim_names is None:
        raise ValueError("shard_model: the DeviceMesh needs mesh_dim_names (axes data/fsdp/tensor)")
    return dict(zip(mesh.mesh_dim_names, mesh.mesh.shape))


def param_shardings(model: nn.Module, mesh: DeviceMesh, rules: Sequence[Rule] = PARTITION_RULES
                    ) -> dict[str, tuple[str | None, ...]]:
    """HF name -> the mesh axis of each dimension of that parameter under `rules` (a state-dict
    key is the HF name; the Flax twin returns `NamedSharding`s of the same axes)."""
    sizes = _mesh_sizes(mesh)
    return {name: partition_spec(name, tuple(p.shape), sizes, rules) for name, p in model.named_parameters()}


def _tensor_plan(model: nn.Module, axes: dict[str, tuple[str | None, ...]]) -> dict[str, ParallelStyle]:
    """The `parallelize_module` plan the table implies: module name -> parallel style."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, ParallelStyle] = {}
    kinds: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)) or f"{name}.weight" not in axes:
            continue
        weight = axes[f"{name}.weight"]
        if "tensor" not in weight:
            continue
        kinds[name] = "column" if weight.index("tensor") == 0 else "row"
        if isinstance(module, nn.Linear) and getattr(module, "bias", None) is not None:
            want = ("tensor",) if kinds[name] == "column" else (None,)
            if axes[f"{name}.bias"] != want:  # torch's styles fix the bias: the table must agree
                raise ValueError(f"{name}.bias: a {kinds[name]}-parallel layer's bias is split as {want} "
                                 f"by torch's parallel style; the rules give {axes[f'{name}.bias']}")
    for name, kind in kinds.items():
        module = model.get_submodule(name)
        parent = name.rpartition(".")[0]
        sibling_row = any(k == "row" and n.rpartition(".")[0] == parent for n, k in kinds.items())
        if isinstance(module, nn.Embedding):  # [V, E]: dimension 0 is the vocabulary
            plan[name] = (RowwiseParallel(input_layouts=Replicate()) if kind == "column"
                          else ColwiseParallel(output_layouts=Replicate()))
        elif kind == "column":  # output shard consumed by a row-parallel sibling, else gathered
            plan[name] = ColwiseParallel() if sibling_row else ColwiseParallel(output_layouts=Replicate())
        else:
            plan[name] = RowwiseParallel()
    return plan


def _check_heads(model: nn.Module, tensor: int) -> None:
    # Each rank's attention reshapes its q/k/v shard into whole heads (view(b, t, -1, D)).
    config = getattr(model, "config", None)
    if config is None:
        return
    for what, n in (("num_attention_heads", config.num_attention_heads),
                    ("num_key_value_heads", config.resolved_num_key_value_heads)):
        if n % tensor:
            raise ValueError(f"shard_model: config.{what} = {n} does not divide by the tensor axis ({tensor}); "
                             "torch's tensor parallelism keeps whole heads on each rank")


def shard_model(model: M, mesh: DeviceMesh, rules: Sequence[Rule] = PARTITION_RULES) -> M:
    """Cut `model` (in place; returns it) over `mesh` as `rules` say: `tensor` by DTensor tensor
    parallelism, then `fsdp` (and `data` with it, as HSDP) by FSDP2 per decoder layer and root.

    Every rank must call it with the same model (same weights) and mesh.
    """
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import parallelize_module

    sizes = _mesh_sizes(mesh)
    axes = param_shardings(model, mesh, rules)
    if "tensor" in sizes:
        _check_heads(model, sizes["tensor"])
        parallelize_module(model, mesh["tensor"], _tensor_plan(model, axes))
        if getattr(model, "lm_head", False) is None and "tensor" in axes.get("model.embed_tokens.weight", ()):
            # Tied head: `logits` multiplies by the vocab-parallel embedding table itself. The
            # replicated hidden states meet it as a DTensor (each rank its vocabulary slice of the
            # logits), then the logits are gathered, as an untied head's ColwiseParallel does.
            model.logits = _gathered(model.logits, mesh["tensor"])  # type: ignore[method-assign]
    if "data" in sizes and "fsdp" not in sizes:
        raise ValueError("shard_model: a torch mesh with `data` needs `fsdp` beside it (HSDP); "
                         "use fsdp alone for plain data parallelism with sharded parameters")
    if "fsdp" in sizes:
        dp_mesh = mesh[("data", "fsdp")] if "data" in sizes else mesh["fsdp"]
        names = {id(p): n for n, p in model.named_parameters()}

        def placement(param: nn.Parameter) -> Shard:
            spec = axes[names[id(param)]]
            return Shard(spec.index("fsdp") if "fsdp" in spec else 0)

        fn = None if "tensor" in sizes else placement  # with TP, FSDP2 shards the local shard's dim 0
        for layer in getattr(getattr(model, "model", model), "layers", ()):
            fully_shard(layer, mesh=dp_mesh, shard_placement_fn=fn)
        fully_shard(model, mesh=dp_mesh, shard_placement_fn=fn)
    return model


def _gathered(logits: Callable[[torch.Tensor], torch.Tensor], mesh: DeviceMesh
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """`logits` given its (replicated) hidden states as a DTensor on the `tensor` mesh — so that
    the backward pass too sees DTensors only — and its output gathered whole."""
    from torch.distributed.tensor import DTensor, Replicate

    @functools.wraps(logits)
    def gathered(hidden_states: torch.Tensor) -> torch.Tensor:
        out = logits(DTensor.from_local(hidden_states, mesh, [Replicate()], run_check=False))
        return out.full_tensor() if isinstance(out, DTensor) else out

    return gathered


def local_kv_heads(model: nn.Module) -> int:
    """The kv heads one process's attention computes (and `generate()` caches): the config's, or
    its share of them when `shard_model` cut the k projection along `tensor` (each rank whole heads).
    """
    heads = model.config.resolved_num_key_value_heads
    dtensor = sys.modules.get("torch.distributed.tensor")  # no DTensor exists unless it was imported
    if dtensor is None:
        return heads
    weight = next(m.k_proj.weight for m in model.modules() if isinstance(m, Attention))
    names = weight.device_mesh.mesh_dim_names or () if isinstance(weight, dtensor.DTensor) else ()
    if "tensor" not in names:  # not cut along tensor: every rank computes every head
        return heads
    axis = names.index("tensor")
    return heads // weight.device_mesh.size(axis) if weight.placements[axis].is_shard(0) else heads


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module) -> Iterator[None]:
    """While `generate()` runs: every FSDP2 (`fully_shard`) module of `model` unsharded — its
    parameters all-gathered once, on entry, with FSDP2's own `FSDPModule.unshard()` — and kept
    whole through every forward (`set_reshard_after_forward(False)`); on exit `reshard()` frees
    the gathered copies and FSDP2's settings are restored. Nothing without FSDP2.

    Data parallel over rows: each rank generates its own rows. The decode loop then runs no FSDP
    collective, so ranks whose rows stop at different steps (eos) do not wait on each other
    (ranks of one `tensor` group, under FSDP2 x tensor parallelism, must pass the same rows: their
    forward still runs tensor-parallel collectives). Memory: during generation every rank holds
    the whole model (its `data`/`fsdp` share stays allocated too) — with tensor parallelism, its
    tensor-parallel shard of it — plus its rows' KV cache; a model that only fits sharded must
    generate tensor-parallel instead.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")  # no FSDP2 module exists unless it was imported
    modules = [m for m in model.modules() if isinstance(m, fsdp.FSDPModule)] if fsdp is not None else []
    if not modules:
        yield
        return
    states = [m._get_fsdp_state() for m in modules]
    # FSDP2 picks its root when a forward first enters one: let it be `model`, as a training
    # forward would (generate() enters the decoder layers first, which would become roots).
    states[0]._lazy_init()
    # What set_reshard_after_forward overwrites: the root keeps its parameters after forward,
    # the layers reshard (fully_shard's default), each group's choice held in its mesh info.
    saved = [(s, s._auto_reshard_after_forward, [(g, g.post_forward_mesh_info) for g in s._fsdp_param_groups])
             for s in states]
    modules[0].set_reshard_after_forward(False)
    try:
        with torch.inference_mode(False):  # the gathered storage is reused by later training forwards
            for m in modules:  # collectives: every rank, in the same (module) order, before the loop
                m.unshard()
        yield
    finally:
        for m in modules:  # local: frees the gathered copies, no collective
            m.reshard()
        for state, auto, groups in saved:
            state._auto_reshard_after_forward = auto
            for group, info in groups:
                group.post_forward_mesh_info = info


def process_count(mesh: DeviceMesh | None) -> int:
    """How many processes hold a part of a model sharded over `mesh` (1 without one)."""
    if mesh is None:
        return 1
    return mesh.size()  # one rank per process


def constrain_activations(hidden_states: torch.Tensor) -> torch.Tensor:
    """At a layer boundary: unchanged. torch's parallel styles fix activation layouts at module
    boundaries (the Flax twin constrains rows over data/fsdp here)."""
    return hidden_states
