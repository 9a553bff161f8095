"""One file set per process: how a sharded model saved with `save_pretrained(..., per_process=True)`
lies on disk, and `consolidate`, which turns it into a normal HF checkpoint.

Every process writes only what it holds — no gather, no process holds more than its own shards —
into one directory:

    config.json                                   as `save_pretrained` writes it
    model-rank00000-of-00004.safetensors          rank 0's pieces, keyed by HF name (HF layout)
    ...
    model-rank00003-of-00004.safetensors
    model.pieces.index.json                       how to reassemble (written last)

`model.pieces.index.json`:

    {"format": "twinlm.pieces/1", "world_size": 4, "head_class": "ForCausalLM",
     "tensors": {"model.layers.0.self_attn.q_proj.weight":
                   {"shape": [32, 32], "dtype": "float64",
                    "pieces": [{"file": "model-rank00000-of-00004.safetensors",
                                "key": "model.layers.0.self_attn.q_proj.weight", "slice": [[0, 16], [0, 16]]},
                               ...]},
                 ...}}

A piece is the tensor `key` of `file` (the HF name from torch ranks; `name@i` from JAX processes,
which may hold several pieces of one tensor, one per device), holding `whole[start:stop, ...]` (one
`[start, stop]` per dimension). The pieces of a tensor tile it exactly once: a replicated tensor (or a replicated
copy of a shard) is written by the lowest rank holding it only. The directory is staged and
renamed into place as a whole (`weights.staging.atomic_directory`), so a reader never sees a
half-written set; the index, written after every rank's file, marks it complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .config import ModelConfig
from .dtypes import dtype_name, numpy_dtype
from .pretrained import save_checkpoint
from .safetensors_io import SafetensorsFile, TensorSpec

__all__ = ["FORMAT", "PIECES_INDEX", "consolidate", "piece_file", "write_pieces_index"]

FORMAT = "twinlm.pieces/1"
PIECES_INDEX = "model.pieces.index.json"  # an `*.index.json`: a re-save over the directory drops it

Slice = Sequence[Sequence[int]]  # [[start, stop], ...], one per dimension


def piece_file(rank: int, world_size: int) -> str:
    """The safetensors file of `rank`'s pieces."""
    return f"model-rank{rank:05d}-of-{world_size:05d}.safetensors"


def write_pieces_index(directory: str | os.PathLike, head_class: str, specs: Sequence[TensorSpec],
                       pieces: Sequence[Mapping[str, Sequence[tuple[str, Slice]]]]) -> Path:
    """Write the index of the pieces each rank wrote, `pieces[rank]` = {HF name: [(key in the
    rank's file, slice), ...]}; checks that every tensor of `specs` is tiled exactly (element
    counts add up, no piece outside it)."""
    world = len(pieces)
    tensors = {}
    for spec in specs:
        entries = []
        for rank, held in enumerate(pieces):
            for key, where in held.get(spec.name, ()):
                index = [[int(a), int(b)] for a, b in where]
                if len(index) != len(spec.shape) or any(not 0 <= a <= b <= n for (a, b), n in zip(index, spec.shape)):
                    raise ValueError(f"{spec.name}: rank {rank}'s piece {index} lies outside shape {spec.shape}")
                entries.append({"file": piece_file(rank, world), "key": key, "slice": index})
        covered = sum(int(np.prod([b - a for a, b in e["slice"]])) for e in entries)
        if covered != int(np.prod(spec.shape)):
            raise ValueError(f"{spec.name}: the ranks' pieces hold {covered} elements of {int(np.prod(spec.shape))}")
        tensors[spec.name] = {"shape": list(spec.shape), "dtype": dtype_name(np.dtype(spec.dtype)), "pieces": entries}
    path = Path(directory) / PIECES_INDEX
    path.write_text(json.dumps({"format": FORMAT, "world_size": world, "head_class": head_class,
                                "tensors": tensors}, indent=1))
    return path


def consolidate(directory: str | os.PathLike, out: str | os.PathLike, max_shard_size: int | str = "5GB") -> Path:
    """Write the per-process set in `directory` as a normal HF checkpoint in `out`, one tensor at a
    time (each assembled from its pieces in the memory-mapped files): loads unsharded anywhere."""
    directory = Path(directory)
    index_path = directory / PIECES_INDEX
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: no {PIECES_INDEX} (not a save_pretrained(per_process=True) set)")
    index = json.loads(index_path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{index_path}: format {index.get('format')!r}, expected {FORMAT!r}")
    config = ModelConfig.from_pretrained(directory)
    entries = index["tensors"]
    specs = [TensorSpec(name, tuple(e["shape"]), numpy_dtype(e["dtype"])) for name, e in entries.items()]
    files: dict[str, SafetensorsFile] = {}
    try:
        def fetch(name: str) -> np.ndarray:
            entry = entries[name]
            whole = np.empty(tuple(entry["shape"]), numpy_dtype(entry["dtype"]))
            for piece in entry["pieces"]:
                if piece["file"] not in files:
                    files[piece["file"]] = SafetensorsFile(directory / piece["file"])
                whole[tuple(slice(a, b) for a, b in piece["slice"])] = files[piece["file"]].get(piece["key"])
                files[piece["file"]].release(piece["key"])
            return whole

        return save_checkpoint(out, config, index["head_class"], specs, fetch, max_shard_size=max_shard_size)
    finally:
        for f in files.values():
            f.close()
