"""`twinlm convert`: re-type, re-shard, and re-layout checkpoints, one tensor at a time.

The source is read through memory maps and each tensor's pages are released once written, so
peak memory stays near the largest tensor (plus one 16 MB block for a transpose or a cast),
whatever the model size. The destination is staged next to DST and renamed into place at the
end: a crash or Ctrl-C leaves DST absent, or as it was.

Layouts: `hf` (shards + index, HF names, `[out, in]` weights) and `flax` (one flat
`flax_model.safetensors` keyed by NNX parameter paths with `[in, out]` kernels, readable with
`safetensors.flax.load_file`). Converting hf -> flax -> hf gives back every tensor byte for byte.

Pickles (`.bin`, `.pt`) are read only with `allow_pickle=True`, and then only through
`torch.load(weights_only=True)`; torch is imported at that moment, never before.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .checkpoint import (FLAX_WEIGHTS_NAME, PICKLE_PATTERNS, SAFE_WEIGHTS_NAME, WEIGHT_FILE_RE,
                         CheckpointReader, ShardedWriter, parse_size)
from .config import ModelConfig
from .dtypes import FLOAT_DTYPES
from .errors import CheckpointError, DestinationExistsError, MissingDependencyError, PickleRefusedError
from .hf_config import CONFIG_NAME
from .names import flax_key, is_rotary_buffer, is_transposed, legacy_name
from .pretrained import natural_key
from .safetensors_io import TensorSpec

__all__ = ["DTYPE_NAMES", "ConvertResult", "PickleReader", "convert", "open_source"]

# --dtype choices -> numpy dtype: the checkpoint dtypes of `weights.dtypes` but float64; only
# floating tensors are re-typed (int buffers keep theirs).
DTYPE_NAMES: dict[str, np.dtype] = {name: FLOAT_DTYPES[name] for name in ("float32", "bfloat16", "float16")}


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion wrote."""

    dst: Path
    layout: str
    files: tuple[str, ...]  # weight files, relative to dst
    tensors: int
    nbytes: int  # tensor bytes written


# Re-typed by --dtype. float8 tensors are left alone: they are quantised weights whose meaning
# depends on scale tensors next to them, and a plain cast would silently break that.
_RETYPED = tuple(FLOAT_DTYPES.values())


class PickleReader:
    """Tensors of `.bin` / `.pt` files, loaded with `torch.load(weights_only=True, mmap=True)`.

    Same interface as `CheckpointReader`. Used only when pickles are explicitly allowed.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        torch = _import_torch(self.directory)
        self._torch = torch
        self._tensors: dict[str, Any] = {}
        self._file: dict[str, Path] = {}
        paths = sorted({p for pat in PICKLE_PATTERNS if not pat.endswith(".json")
                        for p in self.directory.glob(pat)})
        for path in paths:
            state = _torch_load(torch, path)
            if not isinstance(state, dict):
                raise CheckpointError("pickle does not hold a state dict", file=path,
                                      expected="dict of name -> tensor", found=type(state).__name__)
            for name, t in state.items():
                if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                    raise CheckpointError("state dict entry is not a tensor", file=path, tensor=str(name),
                                          found=type(t).__name__)
                if name in self._tensors:
                    raise CheckpointError("tensor appears in two pickle files", file=path, tensor=name,
                                          found=f"also in {self._file[name]}")
                _numpy_dtype(torch, t.dtype, path, name)
                self._tensors[name], self._file[name] = t, path
        self.files = paths
        self.layout = "hf"

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def file_of(self, name: str) -> Path:
        return self._file[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> np.dtype:
        return _numpy_dtype(self._torch, self._tensors[name].dtype, self._file[name], name)

    def nbytes(self, name: str) -> int:
        t = self._tensors[name]
        return t.numel() * t.element_size()

    def get(self, name: str) -> np.ndarray:
        """The tensor as numpy with the same bits (bf16 and fp8 go through an integer view)."""
        torch, t = self._torch, self._tensors[name].detach().contiguous()
        target = self.dtype(name)
        if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            carrier = torch.int16 if t.element_size() == 2 else torch.uint8
            return t.view(carrier).numpy().view(target)
        return t.numpy()

    def release(self, name: str) -> None:
        """Nothing to do: torch owns the map of a pickle."""

    def close(self) -> None:
        self._tensors.clear()

    def __enter__(self) -> "PickleReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _import_torch(where: Path) -> Any:
    # Imported here, by name, so that `weights` never depends on torch: only this one explicitly
    # requested path needs it.
    try:
        return importlib.import_module("torch")
    except ImportError:
        raise MissingDependencyError("reading pickle weights needs torch, which is not installed "
                                     "(pip install torch)", file=where) from None


def _torch_load(torch: Any, path: Path) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Files in the pre-1.6 (non-zip) format cannot be memory-mapped.
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt or unsafe pickles
        raise CheckpointError(f"cannot load pickle with weights_only=True: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}", file=path) from None


def _numpy_dtype(torch: Any, dt: Any, path: Path, name: str) -> np.dtype:
    table = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
             torch.bfloat16: ml_dtypes.bfloat16, torch.int8: np.int8, torch.int16: np.int16,
             torch.int32: np.int32, torch.int64: np.int64, torch.uint8: np.uint8, torch.bool: np.bool_,
             torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn, torch.float8_e5m2: ml_dtypes.float8_e5m2,
             torch.complex64: np.complex64}
    if dt not in table:
        raise CheckpointError("tensor dtype has no safetensors equivalent", file=path, tensor=name,
                              found=str(dt))
    return np.dtype(table[dt])


def open_source(src: str | os.PathLike, *, allow_pickle: bool = False) -> CheckpointReader | PickleReader:
    """A reader for `src`: safetensors (HF or Flax layout), or pickles when allowed."""
    try:
        return CheckpointReader(src)
    except PickleRefusedError:
        if not allow_pickle:
            raise
        return PickleReader(src)


def _read_config(src: Path, target: np.dtype | None) -> bytes:
    """config.json validated, with its dtype field updated when the dtype changes."""
    ModelConfig.from_pretrained(src)  # raises ConfigError naming the file and field
    raw = (src / CONFIG_NAME).read_bytes()
    if target is None:
        return raw
    name = next(k for k, v in DTYPE_NAMES.items() if v == target)
    d = json.loads(raw)
    keys = [k for k in ("torch_dtype", "dtype") if k in d] or ["torch_dtype"]
    for k in keys:
        d[k] = name
    return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _plan(reader: CheckpointReader | PickleReader, layout: str,
          target: np.dtype | None) -> list[tuple[TensorSpec, str, bool]]:
    """(output spec, source name, transpose-to-flax) for every tensor, in source order."""
    plan = []
    for key in reader.keys():
        shape, dtype = tuple(reader.shape(key)), np.dtype(reader.dtype(key))
        out_dtype = target if target is not None and dtype in _RETYPED else dtype
        out, transpose = key, False
        if layout == "flax":
            if is_rotary_buffer(key):
                continue  # a recomputed buffer, not an NNX parameter
            hf = legacy_name(key)
            try:
                out = flax_key(hf)
            except ValueError as e:
                raise CheckpointError(f"no Flax path for this name ({e})", file=reader.file_of(key),
                                      tensor=key) from None
            transpose = is_transposed(hf)
            if transpose:
                if len(shape) != 2:
                    raise CheckpointError("a linear weight must be 2-D", file=reader.file_of(key),
                                          tensor=key, expected="[out, in]", found=list(shape))
                shape = shape[::-1]
        plan.append((TensorSpec(out, shape, out_dtype), key, transpose))
    return plan


def _progress_bar(total: int, progress: bool | None, desc: str) -> Any:
    from tqdm.auto import tqdm  # imported here: only the converter shows a bar

    # Bytes on the bar, tensors in the postfix; `disable=None` means "only on a terminal".
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc,
                disable=None if progress is None else not progress,
                bar_format="{l_bar}{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}{postfix}]")


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
            max_shard_size: int | str = "5GB", layout: str = "hf", force: bool = False,
            allow_pickle: bool = False, progress: bool | None = None,
            fsync: bool = True) -> ConvertResult:
    """Convert the checkpoint directory `src` into a new directory `dst`.

    `dtype` re-types floating tensors (`float32`, `bfloat16`, `float16`); without it every
    tensor keeps its bits. `max_shard_size` shards the `hf` layout like transformers. `layout`
    is `hf` or `flax`; the source layout is detected. `progress=None` shows the bar on a TTY.
    Raises `CheckpointError` / `ConfigError` on bad input, before DST is touched.
    """
    src, dst = Path(src), Path(dst)
    if layout not in ("hf", "flax"):
        raise ValueError(f"layout must be 'hf' or 'flax', got {layout!r}")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    target = DTYPE_NAMES[dtype] if dtype is not None else None
    limit = parse_size(max_shard_size) if layout == "hf" else None
    if dst.exists() and not force:
        raise DestinationExistsError(dst)  # before any work, so a typo costs nothing
    if not src.is_dir():
        raise CheckpointError("source checkpoint directory not found", file=src)
    config = _read_config(src, target)

    with open_source(src, allow_pickle=allow_pickle) as reader:
        plan = _plan(reader, layout, target)
        # Shards follow the natural order of names (layer 2 before layer 10), whatever the source
        # order, so the same checkpoint always shards the same way; reads keep source order.
        specs = sorted((spec for spec, _, _ in plan), key=lambda s: natural_key(s.name))
        weights_name = FLAX_WEIGHTS_NAME if layout == "flax" else SAFE_WEIGHTS_NAME
        meta = {"format": "flax" if layout == "flax" else "pt"}
        total = sum(spec.nbytes for spec, _, _ in plan)
        with ShardedWriter(dst, specs, max_shard_size=limit, metadata=meta,
                           weights_name=weights_name, force=force, fsync=fsync) as writer, \
                _progress_bar(total, progress, f"convert {src.name} -> {dst.name}") as bar:
            (writer.staging / CONFIG_NAME).write_bytes(config)
            for p in sorted(src.iterdir()):
                if p.is_file() and p.name != CONFIG_NAME and not WEIGHT_FILE_RE.match(p.name):
                    shutil.copy2(p, writer.staging / p.name)  # tokenizer, generation config, ...
            for i, (spec, key, transpose) in enumerate(plan):
                arr = reader.get(key)  # a view: no byte is read yet
                out = arr.T if transpose else arr
                if out.dtype == spec.dtype and out.flags.c_contiguous and isinstance(reader, CheckpointReader):
                    writer.write_from(spec.name, *reader.raw(key))  # same bytes: the kernel copies them
                else:
                    writer.write(spec.name, out, cast=out.dtype != spec.dtype)
                reader.release(key)
                bar.update(spec.nbytes)
                bar.set_postfix_str(f"tensor {i + 1}/{len(plan)}", refresh=False)
            files = tuple(fname for fname, _ in writer.plan)
    return ConvertResult(dst, layout, files, len(plan), total)
