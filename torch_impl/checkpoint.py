"""The torch twin's side of the checkpoint format: state <-> numpy arrays with HF names, and
`from_pretrained` / `save_pretrained` on top of `weights.pretrained`.

A torch `state_dict()` key *is* the HF tensor name, so no renaming happens here.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, TypeVar

import ml_dtypes
import numpy as np
import torch
from torch import nn

from weights import dtypes
from weights.blockcopy import copy_into, row_blocks
from weights.checkpoint import CheckpointReader
from weights.partition import Rule
from weights.pieces import piece_file, write_pieces_index
from weights.pretrained import (checkpoint_config, keep_on_resave, load_into, natural_key, open_pretrained,
                                save_checkpoint)
from weights.safetensors_writer import save_file
from weights.staging import atomic_directory
from weights.report import LoadReport
from weights.safetensors_io import TensorSpec, release_pages

from . import sharding
from .layers import precision

if TYPE_CHECKING:  # torch.distributed.tensor takes seconds to import: only sharded runs pay for it
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor

M = TypeVar("M", bound=nn.Module)


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy; bfloat16 becomes `ml_dtypes.bfloat16`, bit for bit.

    A copy, not `Tensor.numpy()`'s view: JAX on CPU may alias a numpy buffer it is given, and an
    in-place torch update (an optimizer step) would then silently rewrite the Flax twin's weights.
    """
    t = t.detach().cpu().clone()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def numpy_to_tensor(a: np.ndarray) -> torch.Tensor:
    """A torch tensor from numpy; `ml_dtypes.bfloat16` becomes `torch.bfloat16`, bit for bit."""
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """Every parameter as a numpy array, keyed by its HF name."""
    return {name: tensor_to_numpy(p) for name, p in model.state_dict().items()}


def load_numpy_state(model: nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy HF-named numpy arrays into the model's parameters (cast to each parameter's dtype).

    Every parameter must be present; extra names are an error too.
    """
    state = model.state_dict()
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise KeyError(f"state mismatch: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, param in state.items():
            value = numpy_to_tensor(tensors[name])
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{name}: expected shape {tuple(param.shape)}, found {tuple(value.shape)}")
            param.copy_(value.to(param.dtype))


# ---- from_pretrained / save_pretrained ------------------------------------------------------
def _numpy_dtype(dtype: Any) -> np.dtype:
    """A torch dtype, a dtype name or a numpy dtype, as numpy's (through the one name table)."""
    return dtypes.numpy_dtype(precision.dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype)


def _writable_view(t: torch.Tensor) -> np.ndarray:
    """A numpy view sharing `t`'s memory (bfloat16 through an int16 view), so a checkpoint
    tensor is copied straight into the parameter: no torch temporary, no second copy."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _local_slices(param: DTensor) -> tuple[slice, ...]:
    """The index of this rank's shard of `param` in the whole tensor: each `Shard(d)` placement
    cuts dimension d as `torch.chunk` does, mesh dimension by mesh dimension — right to left when
    FSDP2 sharded a tensor-parallel shard (a `_StridedShard`: the `tensor` cut first, then FSDP2
    chunks that rank's piece), which keeps every rank's shard one rectangular slice."""
    index = [slice(0, n) for n in param.shape]
    coordinate = param.device_mesh.get_coordinate()
    placements = list(enumerate(param.placements))
    strided = [type(p).__name__ == "_StridedShard" for _, p in placements]  # private class: by name
    if any(strided):
        placements.reverse()
    for mesh_dim, placement in placements:
        if placement.is_replicate():
            continue
        if not (placement.is_shard() or strided[mesh_dim]):  # Partial: no rank holds a slice of the value
            raise NotImplementedError(f"sharded loading: placement {placement} of a {tuple(param.shape)} "
                                      "parameter; load unsharded, then shard_model")
        d, whole = placement.dim, index[placement.dim]
        n = whole.stop - whole.start
        chunk = -(-n // param.device_mesh.size(mesh_dim))
        start = min(coordinate[mesh_dim] * chunk, n)
        index[d] = slice(whole.start + start, whole.start + min(start + chunk, n))
    return tuple(index)


def _copy_shard(param: torch.Tensor, array: np.ndarray) -> None:
    # A DTensor takes only this rank's slice of the memory-mapped view: only those bytes are read.
    # (No DTensor exists unless torch.distributed.tensor was imported: no import here.)
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(param, dtensor.DTensor):
        local = param.to_local().detach()
        index = _local_slices(param)
        if tuple(local.shape) != tuple(s.stop - s.start for s in index):
            raise ValueError(f"sharded loading: local shard {tuple(local.shape)} does not match the slice {index}")
        copy_into(_writable_view(local), array[index])
    else:
        copy_into(_writable_view(param.data), array)


def load_checkpoint(model: nn.Module, directory: str | os.PathLike, *, strict: bool = True) -> LoadReport:
    """Load a checkpoint directory into `model`'s parameters, tensor by tensor, on whatever
    device they live.

    Values are cast to each parameter's dtype (numpy casts, the same in both twins); with equal
    dtypes the bits are copied unchanged. A parameter on the CPU is written in place; one on an
    accelerator is filled block by block through one small host buffer (`_copy_to_device`).
    Strict: any missing, unexpected or mis-shaped tensor raises a `StateMismatchError` listing
    all of them; otherwise the report is returned.
    """
    state = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    expected = {k: (tuple(v.shape), _numpy_dtype(v.dtype)) for k, v in state.items()}

    def put(name: str, array: np.ndarray) -> None:
        param = state[name].data
        with torch.no_grad():
            if _in_host_memory(param):
                _copy_shard(state[name], array)  # in place; a DTensor's own slice only
            else:
                _copy_to_device(param, array)

    with CheckpointReader(directory) as reader:
        return load_into(reader, expected, put, tie_word_embeddings=model.config.tie_word_embeddings,
                         strict=strict)


def load_module(module: M, reader: CheckpointReader, names: Mapping[str, str]) -> M:
    """Fill the parameters of `module` (any part of a model, e.g. one `DecoderLayer`) from `reader`,
    one tensor at a time: how a model too big for memory is streamed layer by layer.

    `names` maps each parameter's name inside `module` (its `state_dict` key) to the checkpoint
    tensor holding it. A module built on the meta device is materialised on the CPU first; every
    parameter must be named. Values are cast to each parameter's dtype as `load_checkpoint` casts
    them. Returns the filled module.
    """
    if any(p.is_meta for p in module.parameters()):  # built on the meta device: give it memory
        module = module.to_empty(device="cpu")
    state = module.state_dict(keep_vars=True)
    missing = sorted(set(state) - set(names))
    if missing:
        raise KeyError(f"no checkpoint tensor named for parameter(s) {missing}")
    for name, param in state.items():
        key = names[name]
        want = tuple(param.shape)
        if tuple(reader.shape(key)) != want:
            raise ValueError(f"{key}: expected shape {want}, found {tuple(reader.shape(key))}")
        with torch.no_grad():
            copy_into(_writable_view(param.data), reader.get(key))
        reader.release(key)
    return module


def _in_host_memory(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _copy_to_device(param: torch.Tensor, array: np.ndarray) -> None:
    """Copy a checkpoint tensor into a parameter off the CPU, one row block (`BLOCK_BYTES`, 8 MB)
    at a time through one reused host buffer, dropping each block's mapped pages once it is on
    the device: the host holds a block, never the tensor."""
    flat, offset, host, row = param.view(-1), 0, None, 0
    for block in row_blocks(array, _numpy_dtype(param.dtype)):
        if host is None or host.numel() < block.size:  # only a row wider than a block needs more
            host = torch.empty(block.size, dtype=param.dtype)
        staged = host[:block.size]
        copy_into(_writable_view(staged), block.reshape(-1))
        flat[offset:offset + block.size].copy_(staged)  # synchronous: the buffer is reused next
        offset += block.size
        if array.ndim:
            release_pages(array[row:row + block.shape[0]])
            row += block.shape[0]


def from_pretrained(cls: type[M], directory: str | os.PathLike, dtype: Any = None, param_dtype: Any = None,
                    strict: bool = True, device: torch.device | str | None = None,
                    mesh: DeviceMesh | None = None, rules: Sequence[Rule] | None = None) -> M | tuple[M, LoadReport]:
    """Build `cls` from `<directory>/config.json` and load its weights onto `device`.

    `dtype` (activations; a torch dtype or a name such as "bfloat16") defaults to the
    checkpoint's own, so bf16 and fp16 weights stay bit-exact; `param_dtype` (stored parameters)
    defaults to `dtype`. `device` (default: the CPU) gets the weights straight from the file:
    the model is built on the meta device (no memory, no random init), given uninitialised
    memory on `device`, then filled one checkpoint tensor at a time (off the CPU in 8 MB blocks),
    so the host never holds the model. With `strict=False`, loads what matches and returns
    `(model, report)`; parameters the checkpoint lacks keep their initial values.

    With a `DeviceMesh` (every rank calls this), the model is cut as `rules` (default
    `sharding.PARTITION_RULES`) say before it gets memory, and each rank reads only its slices.
    """
    # Header against config, and memory, checked before anything of the model's size exists.
    config, np_dtype = open_pretrained(directory, cls.__name__, None if dtype is None else _numpy_dtype(dtype),
                                       strict=strict, processes=sharding.process_count(mesh))
    np_param_dtype = np_dtype if param_dtype is None else _numpy_dtype(param_dtype)
    device = torch.device("cpu" if device is None else device)
    to_torch = lambda d: precision.to_dtype(dtypes.dtype_name(d))  # noqa: E731
    build = lambda: cls(config, dtype=to_torch(np_dtype), param_dtype=to_torch(np_param_dtype))  # noqa: E731
    with torch.device("meta"):  # shapes only: no memory, no random init
        model = build()
    rules = sharding.PARTITION_RULES if rules is None else rules
    if mesh is not None and strict and not list(model.buffers()):  # cut while only shapes: each rank allocates its shards
        sharding.shard_model(model, mesh, rules)
    if strict and not list(model.buffers()):
        # Strict loading fills every parameter (or raises), so uninitialised memory is never
        # seen: skip the random init of a model about to be overwritten.
        model = model.to_empty(device=device)
    else:
        with torch.device(device):
            model = build()  # what the checkpoint lacks keeps its init values
        if mesh is not None:
            sharding.shard_model(model, mesh, rules)
    model.eval()
    report = load_checkpoint(model, directory, strict=strict)
    return model if strict else (model, report)


def save_pretrained(model: nn.Module, directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                    per_process: bool = False) -> Path:
    """Write `config.json` and the weights in HF layout, as transformers would (shards + index
    past `max_shard_size`), replacing `directory` atomically.

    A model sharded over several processes (DTensor parameters): every rank calls this. By
    default each tensor is gathered in turn and rank 0 writes it, so the directory is a normal HF
    checkpoint and a process holds one whole tensor at a time beyond its shards. With
    `per_process`, nothing is gathered: each rank writes its own pieces and rank 0 an index
    (`weights.pieces` states the format; `weights.pieces.consolidate` turns it into a normal
    checkpoint).
    """
    state = {k: v.detach() for k, v in model.state_dict().items()}
    specs = [TensorSpec(k, tuple(v.shape), _numpy_dtype(v.dtype)) for k, v in state.items()]  # a DTensor's whole shape
    if per_process or any(hasattr(v, "placements") for v in state.values()):  # DTensors: several processes
        return _save_sharded(model, state, specs, directory, max_shard_size, per_process)
    return save_checkpoint(directory, model.config, type(model).__name__, specs,
                           lambda name: tensor_to_numpy(state[name]), max_shard_size=max_shard_size)


def _save_sharded(model: nn.Module, state: Mapping[str, torch.Tensor], specs: Sequence[TensorSpec],
                  directory: str | os.PathLike, max_shard_size: int | str, per_process: bool) -> Path:
    """`save_pretrained` of a model with DTensor parameters, called by every rank."""
    import torch.distributed as dist

    if per_process:
        if not any(hasattr(v, "placements") for v in state.values()):
            raise ValueError("save_pretrained(per_process=True): the model has no DTensor parameter (not sharded); "
                             "save it without per_process")
        return _save_pieces(model, state, specs, directory)
    # Gathering is a collective: every rank gathers the same tensors in the writer's order.
    order = [spec.name for spec in sorted(specs, key=lambda spec: natural_key(spec.name))]
    if dist.get_rank() == 0:
        expected = iter(order)

        def fetch(name: str) -> np.ndarray:
            if name != next(expected):
                raise RuntimeError(f"save_pretrained: the writer asked for {name} out of the gather order")
            return tensor_to_numpy(_whole(state[name]))

        save_checkpoint(directory, model.config, type(model).__name__, specs, fetch, max_shard_size=max_shard_size)
    else:
        for name in order:
            _whole(state[name])
    dist.barrier()  # the directory is in place when any rank returns
    return Path(directory)


def _whole(t: torch.Tensor) -> torch.Tensor:
    # The whole tensor from a DTensor's shards (an all-gather); a plain tensor as it is.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _save_pieces(model: nn.Module, state: Mapping[str, torch.Tensor], specs: Sequence[TensorSpec],
                 directory: str | os.PathLike) -> Path:
    """`save_pretrained(per_process=True)`: each rank writes its pieces into one staged directory
    that rank 0 renames into place after the index (`weights.pieces`)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    local = {name: (_local_slices(t) if hasattr(t, "placements") else tuple(slice(0, n) for n in t.shape))
             for name, t in state.items()}
    mine = {name: [[part.start, part.stop] for part in index] for name, index in local.items()}
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    # A piece several ranks hold (replicated, or on a sub-mesh of the mesh) is written once, by
    # the lowest of them; a parameter's placements alone cannot tell a copy on another sub-mesh.
    held: list[dict[str, list[tuple[str, Any]]]] = [{} for _ in range(world)]
    for r, theirs in enumerate(everyone):
        for name, index in theirs.items():
            if all(everyone[q].get(name) != index for q in range(r)):
                held[r][name] = [(name, index)]  # one piece per tensor per rank: keyed by its name
    tensors = {name: tensor_to_numpy(state[name].to_local() if hasattr(state[name], "to_local") else state[name])
               for name in held[rank]}
    staged = atomic_directory(directory, force=True, keep=keep_on_resave) if rank == 0 else contextlib.nullcontext()
    with staged as staging:
        where = [str(staging) if rank == 0 else None]
        dist.broadcast_object_list(where, src=0)  # every rank writes into rank 0's staging directory
        save_file(tensors, Path(where[0]) / piece_file(rank, world))
        dist.barrier()  # every rank's file is written before rank 0 commits the directory
        if rank == 0:
            checkpoint_config(model.config, type(model).__name__, specs).save_pretrained(staging)
            write_pieces_index(staging, type(model).__name__, specs, held)
    dist.barrier()  # renamed into place when any rank returns
    return Path(directory)


class Pretrained:
    """Mixin giving the heads HF's loading API: `Head.from_pretrained(dir, dtype=None,
    param_dtype=None, strict=True, device=None, mesh=None, rules=None)` and `head.save_pretrained(dir, max_shard_size="5GB", per_process=False)`."""

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype: Any = None, param_dtype: Any = None,
                        strict: bool = True, device: torch.device | str | None = None,
                        mesh: DeviceMesh | None = None, rules: Sequence[Rule] | None = None) -> Any:
        """See `torch_impl.checkpoint.from_pretrained`."""
        return from_pretrained(cls, directory, dtype=dtype, param_dtype=param_dtype, strict=strict, device=device,
                               mesh=mesh, rules=rules)

    def save_pretrained(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                        per_process: bool = False) -> Path:
        """See `torch_impl.checkpoint.save_pretrained`."""
        return save_pretrained(self, directory, max_shard_size=max_shard_size, per_process=per_process)


class Trainable:
    """Mixin giving the heads HF's remat switch: `gradient_checkpointing_enable()` /
    `gradient_checkpointing_disable()` set `model.gradient_checkpointing` on the decoder."""

    supports_gradient_checkpointing = True  # HF's flag: every decoder layer can be rematerialised

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder layer's activations in the backward pass instead of keeping them."""
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        """Keep every layer's activations for the backward pass (the default)."""
        self.model.gradient_checkpointing = False
