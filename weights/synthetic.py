"""Synthetic HF-layout checkpoints: seeded random tensors with the shapes a config implies.

For tests and benchmarks that need a checkpoint without downloading one. Tensors are generated
and written one at a time, so a billion-parameter checkpoint costs one tensor of memory.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import ShardedWriter
from .config import ModelConfig
from .dtypes import FLOAT_DTYPES, dtype_name
from .names import HEADS, hf_shapes
from .safetensors_io import TensorSpec

__all__ = ["synthetic_tensor", "write_synthetic_checkpoint"]


def synthetic_tensor(name: str, shape: tuple[int, ...], dtype: Any, seed: int = 0) -> np.ndarray:
    """A seeded normal(0, 0.02) tensor; the same (name, shape, dtype, seed) gives the same bits."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(dtype)


def write_synthetic_checkpoint(directory: str | os.PathLike, config: ModelConfig, *,
                               head: str = "causal_lm", dtype: Any = np.float32, seed: int = 0,
                               max_shard_size: int | str | None = "5GB", force: bool = False,
                               tied_head_saved: bool = False, fsync: bool = True) -> Path:
    """Write `config.json` and seeded weights in HF layout (sharded past `max_shard_size`).

    With `tied_head_saved`, a tied head is written as a copy of the embedding.
    """
    dt = np.dtype(dtype)
    shapes = hf_shapes(config, head, tied_head_saved=tied_head_saved)
    config = config.replace(architectures=(config.hf_class_prefix + HEADS[head],), torch_dtype=_torch_name(dt))
    specs = [TensorSpec(name, shape, dt) for name, shape in shapes.items()]
    with ShardedWriter(directory, specs, max_shard_size=max_shard_size, force=force, fsync=fsync) as w:
        config.save_pretrained(w.staging)
        for name in w.order:
            src = "model.embed_tokens.weight" if name == "lm_head.weight" and config.tie_word_embeddings else name
            w.write(name, synthetic_tensor(src, shapes[name], dt, seed))
    return Path(directory)


def _torch_name(dt: np.dtype) -> str:
    """The config.json `torch_dtype` of `dt` (its numpy name when it is not a float of the table)."""
    return dtype_name(dt) if dt in FLOAT_DTYPES.values() else dt.name
