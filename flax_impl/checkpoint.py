"""The Flax twin's side of the checkpoint format: NNX state <-> numpy arrays with HF names, and
`from_pretrained` / `save_pretrained` on top of `weights.pretrained`.

Parameter paths map to HF names by `weights.names`; linear kernels are the transpose of HF's
`[out, in]` weights.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from weights.blockcopy import contiguous, row_blocks
from weights.checkpoint import CheckpointReader
from weights.names import hf_name, is_transposed
from weights.partition import Rule
from weights.dtypes import numpy_dtype
from weights.pieces import piece_file, write_pieces_index
from weights.pretrained import (checkpoint_config, keep_on_resave, load_into, natural_key, open_pretrained,
                                save_checkpoint)
from weights.report import LoadReport
from weights.safetensors_io import TensorSpec, release_pages
from weights.safetensors_writer import save_file
from weights.staging import atomic_directory

from . import sharding
from .layers.precision import MATMUL_PRECISIONS, dot_precision

M = TypeVar("M", bound=nnx.Module)


def state_to_numpy(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every parameter as a numpy array in HF layout, keyed by its HF name."""
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = hf_name(path)
        value = np.asarray(var[...])
        out[name] = np.ascontiguousarray(value.T) if is_transposed(name) else value
    return out


def load_numpy_state(model: nnx.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy HF-named numpy arrays into the model's parameters (cast to each parameter's dtype).

    The model may be abstract (built under `nnx.eval_shape`, parameters only shapes): nothing is
    then allocated but the loaded arrays. Every parameter must be present; extra names are an
    error too.
    """
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    names = {hf_name(path): (path, var) for path, var in flat}
    missing = sorted(set(names) - set(tensors))
    unexpected = sorted(set(tensors) - set(names))
    if missing or unexpected:
        raise KeyError(f"state mismatch: missing {missing}, unexpected {unexpected}")
    for name, (path, var) in names.items():
        current = var.get_value()  # an array, or a ShapeDtypeStruct when the model is abstract
        value = tensors[name].T if is_transposed(name) else tensors[name]
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(f"{name}: expected shape {tuple(current.shape)[::-1] if is_transposed(name) else tuple(current.shape)}, "
                             f"found {tuple(tensors[name].shape)}")
        # jnp.array copies: on CPU, jnp.asarray may alias the caller's numpy buffer.
        var.set_value(jnp.array(value, dtype=current.dtype, copy=True))


# ---- from_pretrained / save_pretrained ------------------------------------------------------
def _hf_params(state: Any) -> dict[str, tuple[tuple, Any]]:
    """HF name -> (path, Variable) for every parameter of a (possibly abstract) NNX state."""
    return {hf_name(path): (path, var) for path, var in nnx.to_flat_state(state)}


def _expected(params: Mapping[str, tuple[tuple, Any]]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """HF name -> (HF shape, dtype); works on abstract variables (`ShapeDtypeStruct` values) too."""
    out = {}
    for name, (_, var) in params.items():
        value = var.get_value()
        shape = tuple(value.shape)
        out[name] = (shape[::-1] if is_transposed(name) else shape, np.dtype(value.dtype))
    return out


def _device_array(array: np.ndarray, name: str, dtype: np.dtype, device: jax.Device | None = None) -> jax.Array:
    """One checkpoint tensor on `device` (default: JAX's default device) in Flax layout and
    `dtype`, read once.

    On the CPU, kernels are transposed (tile by tile) into a fresh buffer, which becomes the
    device array. On an accelerator the tensor travels in row blocks (`_blocks_to_device`). Either
    way the copy from the memory-mapped view happens before the call returns, so the view's pages
    can be released and the file closed behind it.
    """
    if not _is_host_device(device):
        return _blocks_to_device(array, name, dtype, device)
    if is_transposed(name) or array.dtype != dtype:
        host = contiguous(array.T if is_transposed(name) else array, dtype)
        return jax.device_put(host, device).block_until_ready()
    return jax.device_put(array, device, may_alias=False).block_until_ready()


def _is_host_device(device: jax.Device | None) -> bool:
    return device is None or device.platform == "cpu"


def _blocks_to_device(array: np.ndarray, name: str, dtype: np.dtype, device: jax.Device) -> jax.Array:
    # One row block (`BLOCK_BYTES`, 8 MB) at a time, cast on the host as `contiguous` casts, each
    # block's mapped pages dropped once it is on the device; the blocks are joined (and a kernel
    # transposed) there. So the host holds a block, never the tensor, as in the torch twin's
    # `_copy_to_device`. A Flax-layout checkpoint's kernel is already stored transposed.
    stored = array.T if is_transposed(name) else array
    source, transpose = (stored, False) if stored.flags.c_contiguous or not array.flags.c_contiguous else (array, True)
    blocks, row = [], 0
    for block in row_blocks(source, dtype):
        blocks.append(jax.device_put(block, device, may_alias=False).block_until_ready())
        if source.ndim:
            release_pages(source[row:row + block.shape[0]])
            row += block.shape[0]
    if len(blocks) == 1 and not transpose:
        return blocks[0]
    return _join(tuple(blocks), transpose).block_until_ready()


@functools.partial(jax.jit, static_argnums=1)
def _join(blocks: tuple[jax.Array, ...], transpose: bool) -> jax.Array:
    # One small program per tensor shape (a 1.1B LLaMA has about eight), compiled on first use.
    whole = jnp.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    return whole.T if transpose else whole


def _sharded_array(array: np.ndarray, name: str, dtype: np.dtype, sharding: NamedSharding) -> jax.Array:
    """One checkpoint tensor (`array`: the memory-mapped view, HF layout) as a global array with
    `sharding`, each addressable device reading only its own slice: the slice of the mapped file
    is all that is touched (a row range of a column-parallel weight is one contiguous byte range),
    copied and cast tile by tile. Other processes' slices are never read here."""
    view = array.T if is_transposed(name) else array  # Flax layout; still a view, no copy

    def read(index: tuple[slice, ...]) -> np.ndarray:
        return contiguous(view[index], dtype)

    return jax.make_array_from_callback(view.shape, sharding, read)


def load_checkpoint(model: nnx.Module, directory: str | os.PathLike, *, strict: bool = True) -> LoadReport:
    """Load a checkpoint directory into `model`'s parameters, tensor by tensor, on the device
    each lives on (see `torch_impl.checkpoint.load_checkpoint`: same matching, same casts)."""
    params = _hf_params(nnx.state(model, nnx.Param))
    expected = _expected(params)

    def put(name: str, array: np.ndarray) -> None:
        var = params[name][1]
        value = var[...]
        # Onto the device the parameter already lives on.
        var[...] = _device_array(array, name, np.dtype(value.dtype), next(iter(value.devices())))

    with CheckpointReader(directory) as reader:
        return load_into(reader, expected, put, tie_word_embeddings=model.config.tie_word_embeddings,
                         strict=strict)


def load_module(module: M, reader: CheckpointReader, names: Mapping[str, str]) -> M:
    """Fill the parameters of `module` (any part of a model, e.g. one `DecoderLayer`) from `reader`,
    one tensor at a time: how a model too big for memory is streamed layer by layer.

    `names` maps each parameter's HF name inside `module` (`self_attn.q_proj.weight` for the path
    `self_attn/q_proj/kernel`) to the checkpoint tensor holding it. A module built abstractly
    (`nnx.eval_shape`) gets its arrays here; every parameter must be named. Values are cast to each
    parameter's dtype as `load_checkpoint` casts them. Returns the filled module.
    """
    state = {name: var for name, (_, var) in _hf_params(nnx.state(module, nnx.Param)).items()}
    missing = sorted(set(state) - set(names))
    if missing:
        raise KeyError(f"no checkpoint tensor named for parameter(s) {missing}")
    for name, param in state.items():
        key = names[name]
        want = tuple(param.get_value().shape)[::-1] if is_transposed(name) else tuple(param.get_value().shape)
        if tuple(reader.shape(key)) != want:
            raise ValueError(f"{key}: expected shape {want}, found {tuple(reader.shape(key))}")
        # An array, or a ShapeDtypeStruct when the module is abstract: replaced by the loaded array.
        param.set_value(_device_array(reader.get(key), name, np.dtype(param.get_value().dtype)))
        reader.release(key)
    return module


def from_pretrained(cls: type[M], directory: str | os.PathLike, dtype: Any = None, param_dtype: Any = None,
                    strict: bool = True, device: jax.Device | None = None,
                    precision: str | jax.lax.PrecisionLike = "highest", mesh: Mesh | None = None,
                    rules: Sequence[Rule] | None = None) -> M | tuple[M, LoadReport]:
    """Build `cls` from `<directory>/config.json` and load its weights onto `device`, never
    holding a second copy of the model: the module is first built abstractly (`nnx.eval_shape`,
    no memory), then each parameter is read from the memory-mapped file, transposed if a
    kernel, and placed on the device one at a time.

    `dtype` (activations; a name such as "bfloat16" or a jnp dtype) defaults to the checkpoint's
    own, so bf16 and fp16 weights stay bit-exact; `param_dtype` (stored parameters) defaults to
    `dtype`. `device` defaults to JAX's default device (this process' first local one). `precision`
    is every dot's: a matmul mode of `layers.precision.MATMUL_PRECISIONS` (resolved for
    `dtype` and the device's platform by `dot_precision`) or any `jax.lax.PrecisionLike`.
    With `strict=False`, loads what matches and returns `(model, report)`; parameters the
    checkpoint lacks are initialised.

    With a `jax.sharding.Mesh` (instead of `device`), every parameter is placed as `rules`
    (default `sharding.PARTITION_RULES`) say, and each device reads only its own slice of the file.
    """
    # Header against config, and memory, checked before anything of the model's size exists.
    config, np_dtype = open_pretrained(directory, cls.__name__, None if dtype is None else numpy_dtype(dtype),
                                       strict=strict, processes=sharding.process_count(mesh))
    np_param_dtype = np_dtype if param_dtype is None else numpy_dtype(param_dtype)
    device = device or (mesh.devices.flat[0] if mesh is not None else jax.local_devices()[0])  # its platform sets `precision`
    if isinstance(precision, str) and precision in MATMUL_PRECISIONS:
        precision = dot_precision(precision, np_dtype, device.platform)
    build = lambda: cls(config, dtype=np_dtype, param_dtype=np_param_dtype, precision=precision,  # noqa: E731
                        rngs=nnx.Rngs(0))
    abstract = nnx.eval_shape(build)
    abstract.eval()  # inference mode (dropout off), as the torch twin's and HF's from_pretrained
    params = _hf_params(nnx.state(abstract, nnx.Param))
    loaded: dict[tuple, jax.Array] = {}
    rules = sharding.PARTITION_RULES if rules is None else rules
    shardings = sharding.param_shardings(abstract, mesh, rules) if mesh is not None else {}

    def put(name: str, array: np.ndarray) -> None:
        if mesh is not None:
            loaded[params[name][0]] = _sharded_array(array, name, np_param_dtype, shardings[name])
        else:
            loaded[params[name][0]] = _device_array(array, name, np_param_dtype, device)

    with CheckpointReader(directory) as reader:
        report = load_into(reader, _expected(params), put, tie_word_embeddings=config.tie_word_embeddings,
                           strict=strict)
    graphdef, state = nnx.split(abstract)
    variables = list(nnx.to_flat_state(state))
    if len(loaded) == len(variables):
        for path, var in variables:  # every variable is a loaded parameter: fill in the skeleton
            var.set_value(loaded.pop(path))
        return nnx.merge(graphdef, state) if strict else (nnx.merge(graphdef, state), report)
    # Something the checkpoint cannot fill (a parameter it lacks, or a non-parameter variable):
    # build the model for real on the device, then overwrite what was loaded.
    with jax.default_device(device):
        model = build()
    model.eval()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path in loaded:
            var.set_value(loaded.pop(path))
    if mesh is not None:  # what was initialised here, not loaded, goes to the mesh too
        sharding.shard_model(model, mesh, rules)
    return model if strict else (model, report)


def save_pretrained(model: nnx.Module, directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                    per_process: bool = False) -> Path:
    """Write `config.json` and the weights in HF layout (the same files the torch twin writes),
    tensor by tensor, transposing kernels back to `[out, in]`; `directory` is replaced atomically.

    Under `jax.distributed` (several processes), every process calls this: by default each tensor
    is gathered in turn and process 0 writes it (a normal HF checkpoint); with `per_process`,
    nothing is gathered: each process writes its devices' pieces and process 0 an index
    (`weights.pieces` states the format; `weights.pieces.consolidate` makes a normal checkpoint).
    """
    params = _hf_params(nnx.state(model, nnx.Param))
    specs = [TensorSpec(k, shape, dtype) for k, (shape, dtype) in _expected(params).items()]
    if per_process or jax.process_count() > 1:  # arrays other processes hold parts of
        return _save_sharded(model, params, specs, directory, max_shard_size, per_process)

    def fetch(name: str) -> np.ndarray:
        value = np.asarray(params[name][1][...])  # a host view on CPU; one tensor's copy otherwise
        return value.T if is_transposed(name) else value

    return save_checkpoint(directory, model.config, type(model).__name__, specs, fetch,
                           max_shard_size=max_shard_size)


def _allgather_json(value: Any) -> list[Any]:
    """`value` (JSON-able) of every process, by process index (a collective)."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(everyone[i, :sizes[i]])) for i in range(len(sizes))]


def _save_sharded(model: nnx.Module, params: Mapping[str, tuple[tuple, Any]], specs: Sequence[TensorSpec],
                  directory: str | os.PathLike, max_shard_size: int | str, per_process: bool) -> Path:
    """`save_pretrained` across processes (or `per_process` in one), called by every process."""
    from jax.experimental import multihost_utils

    if per_process:
        return _save_pieces(model, params, specs, directory)
    # Gathering is a collective: every process gathers the same tensors in the writer's order.
    order = [spec.name for spec in sorted(specs, key=lambda spec: natural_key(spec.name))]

    def gathered(name: str) -> np.ndarray:
        value = np.asarray(multihost_utils.process_allgather(params[name][1][...], tiled=True))
        return value.T if is_transposed(name) else value

    if jax.process_index() == 0:
        expected = iter(order)

        def fetch(name: str) -> np.ndarray:
            if name != next(expected):
                raise RuntimeError(f"save_pretrained: the writer asked for {name} out of the gather order")
            return gathered(name)

        save_checkpoint(directory, model.config, type(model).__name__, specs, fetch, max_shard_size=max_shard_size)
    else:
        for name in order:
            gathered(name)
    multihost_utils.sync_global_devices("twinlm save_pretrained")  # in place when any process returns
    return Path(directory)


def _save_pieces(model: nnx.Module, params: Mapping[str, tuple[tuple, Any]], specs: Sequence[TensorSpec],
                 directory: str | os.PathLike) -> Path:
    """`save_pretrained(per_process=True)`: each process writes its devices' pieces (one copy of
    each: replica 0) into one staged directory that process 0 renames into place after the index."""
    from jax.experimental import multihost_utils

    rank, world = jax.process_index(), jax.process_count()
    tensors: dict[str, np.ndarray] = {}
    pieces: dict[str, list[tuple[str, list[list[int]]]]] = {}
    for name, (_, var) in params.items():
        value = var[...]
        for shard in value.addressable_shards:
            if shard.replica_id != 0:
                continue
            index = [[s.start or 0, n if s.stop is None else s.stop] for s, n in zip(shard.index, value.shape)]
            data = np.asarray(shard.data)
            if is_transposed(name):  # the kernel's [in, out] piece is the HF tensor's [out, in] piece
                data, index = data.T, index[::-1]
            key = f"{name}@{len(pieces.get(name, []))}"
            tensors[key] = data
            pieces.setdefault(name, []).append((key, index))
    staged = atomic_directory(directory, force=True, keep=keep_on_resave) if rank == 0 else contextlib.nullcontext()
    with staged as staging:
        where = _allgather_json(str(staging) if rank == 0 else None)[0]  # rank 0's staging directory
        save_file(tensors, Path(where) / piece_file(rank, world))
        held = _allgather_json(pieces)  # also: every process's file is written
        if rank == 0:
            checkpoint_config(model.config, type(model).__name__, specs).save_pretrained(staging)
            write_pieces_index(staging, type(model).__name__, specs, held)
    multihost_utils.sync_global_devices("twinlm save_pretrained pieces")  # renamed into place when any returns
    return Path(directory)


class Pretrained:
    """Mixin giving the heads HF's loading API: `Head.from_pretrained(dir, dtype=None,
    param_dtype=None, strict=True, device=None, precision="highest", mesh=None, rules=None)` and
    `head.save_pretrained(dir, max_shard_size="5GB")`."""

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype: Any = None, param_dtype: Any = None,
                        strict: bool = True, device: jax.Device | None = None,
                        precision: str | jax.lax.PrecisionLike = "highest", mesh: Mesh | None = None,
                        rules: Sequence[Rule] | None = None) -> Any:
        """See `flax_impl.checkpoint.from_pretrained`."""
        return from_pretrained(cls, directory, dtype=dtype, param_dtype=param_dtype, strict=strict, device=device,
                               precision=precision, mesh=mesh, rules=rules)

    def save_pretrained(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                        per_process: bool = False) -> Path:
        """See `flax_impl.checkpoint.save_pretrained`."""
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
