"""Checkpoint directories: read one file or a sharded set lazily, write shards atomically.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards
`model-0000i-of-0000N.safetensors` listed in `model.safetensors.index.json`, named exactly as
`transformers` names them. twinlm's own Flax layout (`flax_model.safetensors`, keys are NNX
parameter paths, linear kernels `[in, out]`) reads through the same `CheckpointReader`, which
then presents HF names and HF shapes (kernels come back as transposed views, still no copy).

Writes never leave a half-written checkpoint: everything goes to a staging directory next to
the destination, which is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import (CheckpointError, CheckpointNotFoundError, PickleRefusedError, ShardIndexError,
                     UnsafePathError)
from .names import hf_key_from_flax, is_transposed
from .safetensors_io import SafetensorsFile, TensorSpec
from .safetensors_writer import SafetensorsWriter
from .staging import atomic_directory

__all__ = [
    "SAFE_WEIGHTS_NAME", "SAFE_WEIGHTS_INDEX_NAME", "FLAX_WEIGHTS_NAME", "PICKLE_PATTERNS",
    "CheckpointReader", "ShardedWriter", "atomic_directory", "parse_size", "plan_shards",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
FLAX_WEIGHTS_NAME = "flax_model.safetensors"  # twinlm's Flax layout, one flat file
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.bin.index.json")
WEIGHT_FILE_RE = re.compile(r".*\.(safetensors|bin|pt|pth|msgpack|h5|ckpt)$|.*\.index\.json$")
_SHARD_RE = re.compile(r"^[^/\\]+$")
MAX_INDEX_SIZE = 64 << 20  # an index of a million tensors is ~80 MB; real ones are ~100 kB


# ---- reading ------------------------------------------------------------------------------
class CheckpointReader:
    """Lazy, validated view of the tensors of a checkpoint directory, under HF names.

    Opening validates every header (and the index against its shards) but reads no tensor
    data. `get(name)` returns a read-only memory-mapped view; `release(name)` drops its pages
    from the process once the caller has copied what it needs.
    """

    def __init__(self, directory: str | os.PathLike, *, contained: bool = False):
        """`contained`: refuse (`UnsafePathError`) any file whose real path leaves the real path
        of `directory` (a symlink out of it), checked before the file is opened."""
        self.directory = Path(directory)
        self._root = os.path.realpath(directory) if contained else None
        self.index_path: Path | None = None
        self.layout = "hf"
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, tuple[str, str]] = {}  # HF name -> (file, key in that file)
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        d = self.directory
        if not d.is_dir():
            raise CheckpointNotFoundError("checkpoint directory not found", file=d)
        if (d / SAFE_WEIGHTS_NAME).is_file():
            self._add_file(d / SAFE_WEIGHTS_NAME)
        elif (d / SAFE_WEIGHTS_INDEX_NAME).is_file():
            self._open_index(d / SAFE_WEIGHTS_INDEX_NAME)
        elif (d / FLAX_WEIGHTS_NAME).is_file():
            self.layout = "flax"
            self._add_file(d / FLAX_WEIGHTS_NAME, flax=True)
        else:
            pickles = sorted(p.name for pat in PICKLE_PATTERNS for p in d.glob(pat))
            if pickles:
                raise PickleRefusedError([d / p for p in pickles])
            raise CheckpointNotFoundError(
                "no weights found", file=d,
                expected=f"{SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} or {FLAX_WEIGHTS_NAME}",
                found=", ".join(sorted(p.name for p in d.iterdir())) or "an empty directory")

    def _guard(self, path: Path) -> None:
        """With `contained`, refuse a file whose real path lies outside the directory."""
        if self._root is None:
            return
        real = os.path.realpath(path)
        if os.path.commonpath([real, self._root]) != self._root:
            raise UnsafePathError("links out of the source directory; refusing to read it (pass "
                                  "--follow-symlinks, follow_symlinks=True, to allow links, e.g. in a Hugging "
                                  "Face cache snapshot)", file=path)

    def _add_file(self, path: Path, *, flax: bool = False,
                  only: Sequence[str] | None = None) -> SafetensorsFile:
        self._guard(path)
        f = SafetensorsFile(path)
        self._files[str(path)] = f
        # On-disk order, so a pass over keys() reads each file front to back.
        keys = only if only is not None else sorted(f.keys(), key=lambda k: f.info(k).start)
        for key in keys:
            name = key
            if flax:
                try:
                    name = hf_key_from_flax(key)
                except ValueError as e:
                    raise CheckpointError(f"not a Flax parameter path ({e})", file=path, tensor=key) from None
                if is_transposed(name) and len(f.shape(key)) != 2:
                    raise CheckpointError("a linear kernel must be 2-D", file=path, tensor=key,
                                          expected="[in, out]", found=list(f.shape(key)))
            if name in self._where:
                raise ShardIndexError("tensor appears twice", file=path, tensor=name,
                                      found=f"also in {self._where[name][0]}")
            self._where[name] = (str(path), key)
        return f

    def _open_index(self, index: Path) -> None:
        self.index_path = index
        self._guard(index)
        if index.stat().st_size > MAX_INDEX_SIZE:
            raise ShardIndexError(f"index is larger than {MAX_INDEX_SIZE} bytes", file=index)
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ShardIndexError(f"index is not valid JSON ({str(e)[:100]})", file=index) from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ShardIndexError("index lacks a 'weight_map' object of tensor -> shard file", file=index)
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            if not _SHARD_RE.match(shard) or shard in (".", ".."):
                raise ShardIndexError("shard must be a file name in the same directory", file=index,
                                      tensor=name, found=repr(shard))
            by_shard.setdefault(shard, []).append(name)
        for shard, names in by_shard.items():
            path = index.parent / shard
            if not path.is_file():
                raise ShardIndexError("index names a missing shard", file=index, tensor=names[0],
                                      expected=str(path), found="no such file")
            f = self._add_file(path, only=[])
            absent = [n for n in names if n not in f]
            if absent:
                raise ShardIndexError(f"{len(absent)} tensor(s) listed in the index are missing from "
                                      f"their shard: {', '.join(absent[:5])}", file=path, tensor=absent[0])
            unlisted = [k for k in f.keys() if weight_map.get(k) != shard]
            if unlisted:
                raise ShardIndexError("shard holds tensor(s) the index does not assign to it: "
                                      f"{', '.join(unlisted[:5])}", file=path, tensor=unlisted[0])
            for n in sorted(names, key=lambda k: f.info(k).start):
                self._where[n] = (str(path), n)

    # ---- mapping-like access ----------------------------------------------------------------
    @property
    def files(self) -> list[Path]:
        """The weight files opened, in order."""
        return [Path(p) for p in self._files]

    def keys(self) -> list[str]:
        """HF tensor names in on-disk order: file by file, by data offset."""
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def _locate(self, name: str) -> tuple[SafetensorsFile, str]:
        try:
            path, key = self._where[name]
        except KeyError:
            raise CheckpointError("no such tensor in checkpoint", file=self.directory, tensor=name) from None
        return self._files[path], key

    def file_of(self, name: str) -> Path:
        """The file holding `name`."""
        return Path(self._locate(name)[0].path)

    def shape(self, name: str) -> tuple[int, ...]:
        """HF shape (`[out, in]` for linear weights, whatever the layout on disk)."""
        f, key = self._locate(name)
        s = f.shape(key)
        return s[::-1] if self.layout == "flax" and is_transposed(name) else s

    def dtype(self, name: str) -> np.dtype:
        f, key = self._locate(name)
        return f.dtype(key)

    def nbytes(self, name: str) -> int:
        f, key = self._locate(name)
        return f.info(key).nbytes

    def get(self, name: str) -> np.ndarray:
        """Read-only view of the tensor in HF layout; no bytes are copied."""
        f, key = self._locate(name)
        arr = f.get(key)
        return arr.T if self.layout == "flax" and is_transposed(name) else arr

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor in HF layout, read with positioned reads (no memory map: a file truncated
        meanwhile is a `SourceChangedError`, never SIGBUS), into fresh memory or into `out` (see
        `SafetensorsFile.read`)."""
        f, key = self._locate(name)
        arr = f.read(key, out)
        return arr.T if self.layout == "flax" and is_transposed(name) else arr

    def check_unchanged(self) -> None:
        """Raise `SourceChangedError` when any file opened has changed on disk since."""
        for f in self._files.values():
            f.check_unchanged()

    def raw(self, name: str) -> tuple[SafetensorsFile, str]:
        """The file and key holding `name`'s bytes as stored (for kernel copies)."""
        return self._locate(name)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process (see `SafetensorsFile.release`)."""
        f, key = self._locate(name)
        f.release(key)

    @property
    def metadata(self) -> dict[str, str]:
        """`__metadata__` of the first file (all shards of one checkpoint carry the same)."""
        return dict(next(iter(self._files.values())).metadata) if self._files else {}

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---- writing ------------------------------------------------------------------------------
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """`max_shard_size` as transformers reads it: an int (bytes) or "5GB", "500MB", "2GiB";
    a lower-case "b" unit ("5Gb") means bits, as in transformers."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?[Bb])?\s*", str(size), flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"invalid size {size!r}: use bytes or a number with a unit, e.g. '5GB', '500MB'")
        unit = (m.group(2) or "B")
        value = int(float(m.group(1)) * _UNITS[unit.upper()])
        if unit.endswith("b") and unit.upper() != "B":
            value //= 8
    if value <= 0:
        raise ValueError(f"invalid size {size!r}: must be positive")
    return value


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int | str | None,
                weights_name: str = SAFE_WEIGHTS_NAME) -> list[tuple[str, list[TensorSpec]]]:
    """Split tensors into shards as `huggingface_hub` does: in order, a new shard when the next
    tensor would tip the current one over the limit, and a tensor above the limit alone."""
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    groups: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for s in specs:
        if limit is not None and s.nbytes > limit:
            groups.append([s])
            continue
        if limit is not None and current and size + s.nbytes > limit:
            groups.append(current)
            current, size = [], 0
        current.append(s)
        size += s.nbytes
    if current or not groups:
        groups.append(current)
    if len(groups) == 1:
        return [(weights_name, groups[0])]
    stem, ext = weights_name.rsplit(".", 1)
    n = len(groups)
    return [(f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}", g) for i, g in enumerate(groups)]


class ShardedWriter:
    """Write a checkpoint's tensors as HF shards plus index, atomically, tensor by tensor.

    Tensors are declared up front (`specs`, in model order, which decides the sharding) and
    written in any order. Everything is staged in `self.staging` (put `config.json` and other
    files there too); `commit()` renames it onto `directory`, `abort()` deletes it.
    """

    def __init__(self, directory: str | os.PathLike, specs: Sequence[TensorSpec], *,
                 max_shard_size: int | str | None = "5GB", metadata: Mapping[str, str] | None = None,
                 weights_name: str = SAFE_WEIGHTS_NAME, force: bool = False,
                 keep: Callable[[str], bool] | None = None, fsync: bool = True):
        self.directory = Path(directory)
        self.plan = plan_shards(specs, max_shard_size, weights_name)
        self.weights_name = weights_name
        self._ctx = atomic_directory(self.directory, force=force, keep=keep)
        self.staging = self._ctx.__enter__()
        self._writers: dict[str, SafetensorsWriter] = {}
        self._shard_of: dict[str, str] = {}
        meta = dict(metadata) if metadata is not None else {"format": "pt"}
        try:
            for fname, group in self.plan:
                self._writers[fname] = SafetensorsWriter(self.staging / fname, group, meta, fsync=fsync)
                self._shard_of.update((s.name, fname) for s in group)
        except BaseException as e:
            self.abort(e)
            raise

    @property
    def order(self) -> list[str]:
        """Tensor names in on-disk order (shard by shard); writing in it writes sequentially."""
        return [n for w in self._writers.values() for n in w.order]

    def write(self, name: str, array: np.ndarray, *, cast: bool = False) -> None:
        """Write one declared tensor (see `SafetensorsWriter.write`)."""
        if name not in self._shard_of:
            raise CheckpointError("tensor was not declared to the writer", file=self.directory, tensor=name)
        self._writers[self._shard_of[name]].write(name, array, cast=cast)

    def write_from(self, name: str, source: SafetensorsFile, key: str) -> None:
        """Write one declared tensor as a kernel copy of `key` in `source`."""
        if name not in self._shard_of:
            raise CheckpointError("tensor was not declared to the writer", file=self.directory, tensor=name)
        self._writers[self._shard_of[name]].write_from(name, source, key)

    def commit(self) -> Path:
        """Finish every shard, write the index when sharded, and rename into place."""
        try:
            for w in self._writers.values():
                w.commit()
            if len(self.plan) > 1:
                weight_map = {s.name: fname for fname, group in self.plan for s in group}
                total = sum(s.nbytes for _, group in self.plan for s in group)
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                tmp = self.staging / (self.weights_name + ".index.json")
                tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        except BaseException as e:
            self.abort(e)
            raise
        self._ctx.__exit__(None, None, None)
        return self.directory

    def abort(self, exc: BaseException | None = None) -> None:
        """Delete everything staged; the destination is left as it was."""
        for w in self._writers.values():
            w.abort()
        exc = exc if exc is not None else RuntimeError("aborted")
        with contextlib.suppress(BaseException):
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort(exc)
