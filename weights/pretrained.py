"""The framework-free half of `from_pretrained` / `save_pretrained`, shared by both twins.

Each twin's `checkpoint.py` only says how to read its parameters' names, shapes and dtypes,
and how to put one numpy array into one parameter; everything else (which dtype to build in,
what to match against the checkpoint, the config written next to the weights, shard order,
atomic replacement of the directory) lives here, once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from .checkpoint import WEIGHT_FILE_RE, CheckpointReader, ShardedWriter
from .config import ModelConfig
from .dtypes import FLOAT_DTYPES, dtype_name
from .hf_config import CONFIG_NAME
from .report import LoadReport, match_state
from .safetensors_io import TensorSpec

__all__ = ["checkpoint_config", "checkpoint_dtype", "keep_on_resave", "load_into", "natural_key", "open_pretrained",
           "save_checkpoint"]

_FLOATS = tuple(FLOAT_DTYPES.values())


def checkpoint_dtype(reader: CheckpointReader, config: ModelConfig | None = None) -> np.dtype:
    """The dtype the checkpoint's floating tensors are stored in (the most bytes wins), so that
    `from_pretrained(dtype=None)` keeps every bit; config `torch_dtype` when there are none."""
    by_dtype: dict[np.dtype, int] = {}
    for k in reader.keys():
        dt = np.dtype(reader.dtype(k))
        if dt in _FLOATS:
            by_dtype[dt] = by_dtype.get(dt, 0) + reader.nbytes(k)
    if by_dtype:
        return max(by_dtype, key=by_dtype.__getitem__)
    if config is not None and config.torch_dtype in FLOAT_DTYPES:
        return FLOAT_DTYPES[config.torch_dtype]
    return np.dtype(np.float32)


def open_pretrained(directory: str | os.PathLike, class_name: str, dtype: np.dtype | None = None, *,
                    strict: bool = True, processes: int = 1) -> tuple[ModelConfig, np.dtype]:
    """The config and parameter dtype of `from_pretrained(directory)` for a head class, checked
    before the twin builds anything: with `strict`, the checkpoint's header must fit the config
    (`weights.shapes.check_fits`: tensor count and size in closed form, then every name and
    shape), and the model must fit in memory (`weights.shapes.check_memory`). `dtype` None means
    the checkpoint's own (`checkpoint_dtype`). A model sharded over `processes` processes needs
    about 1/processes of it in each."""
    from .shapes import HEAD_CLASSES, check_fits, check_memory, parameter_totals

    config = ModelConfig.from_pretrained(directory)
    with CheckpointReader(directory) as reader:
        np_dtype = checkpoint_dtype(reader, config) if dtype is None else np.dtype(dtype)
        if class_name in HEAD_CLASSES:
            if strict:
                check_fits(reader, config, class_name)
            elements = parameter_totals(config, class_name)[1]
            share = f" (1/{processes}: sharded over {processes} processes)" if processes > 1 else ""
            check_memory(elements * np_dtype.itemsize // processes,
                         f"the {class_name} of config.json in {np_dtype.name}{share}", source=directory)
    return config, np_dtype


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting layer 2 before layer 10; the one tensor order every twinlm writer uses,
    so both twins (and the converter) shard a model identically."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in name.split("."))


def load_into(reader: CheckpointReader, expected: Mapping[str, tuple[tuple[int, ...], Any]],
              put: Callable[[str, np.ndarray], None], *, tie_word_embeddings: bool,
              strict: bool = True) -> LoadReport:
    """Match `expected` ({model name: (HF shape, dtype)}) against `reader`, then call
    `put(name, array)` once per loadable parameter, in on-disk order.

    `array` is the read-only memory-mapped view in HF layout (a transposed view for a Flax-layout
    checkpoint): `put` must copy it (and cast it, if the parameter's dtype differs) before
    returning, since its pages are released right after.
    """
    report = match_state(expected, reader, tie_word_embeddings=tie_word_embeddings, strict=strict)
    order = {k: i for i, k in enumerate(reader.keys())}
    for name, key in sorted(report.sources.items(), key=lambda item: order[item[1]]):
        put(name, reader.get(key))
        reader.release(key)
    return report


def keep_on_resave(name: str) -> bool:
    # Files of an existing checkpoint directory worth keeping when it is re-saved: tokenizer,
    # generation config, README... everything but weights and the config we rewrite.
    return name != CONFIG_NAME and not WEIGHT_FILE_RE.match(name)


def checkpoint_config(config: ModelConfig, head_class: str, specs: Iterable[TensorSpec]) -> ModelConfig:
    """The config written next to the weights: `torch_dtype` from the tensors (when they share one
    float dtype) and HF's `architectures` for the head class."""
    from .families import FAMILIES  # the HF class-name prefix of each model family

    dtypes = {np.dtype(s.dtype) for s in specs if np.dtype(s.dtype) in _FLOATS}
    family = FAMILIES.get(config.model_type)
    changes: dict[str, Any] = {}
    if len(dtypes) == 1:
        changes["torch_dtype"] = dtype_name(dtypes.pop())
    if family is not None:
        changes["architectures"] = (family.class_prefix + head_class,)
    return config.replace(**changes)


def save_checkpoint(directory: str | os.PathLike, config: ModelConfig, head_class: str,
                    specs: Iterable[TensorSpec], fetch: Callable[[str], np.ndarray], *,
                    max_shard_size: int | str | None = "5GB", fsync: bool = True) -> Path:
    """Write config.json and the tensors in HF layout (shards + index past `max_shard_size`).

    `fetch(name)` returns one tensor in HF layout (a transposed view is fine); it is called once
    per tensor, one at a time. The directory is replaced atomically; files that are not weights
    (a tokenizer, say) are carried over from an existing one.
    """
    specs = sorted(specs, key=lambda s: natural_key(s.name))
    config = checkpoint_config(config, head_class, specs)
    with ShardedWriter(directory, specs, max_shard_size=max_shard_size, force=True, keep=keep_on_resave,
                       fsync=fsync) as writer:
        config.save_pretrained(writer.staging)
        for spec in specs:
            writer.write(spec.name, fetch(spec.name))
    return Path(directory)
