"""Safetensors files written atomically, tensor by tensor, in the reference layout.

The writer produces byte for byte what `safetensors.numpy.save_file` writes (same tensor order,
same compact JSON, header padded with spaces to 8 bytes). The header goes first, from declared
shapes and dtypes, so tensors can then be streamed one at a time, in any order, each to its
own offset of a temporary file in the destination's directory; the file is renamed into place
only once every tensor is written.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .blockcopy import BlockWriter, copy_file_range, pwrite_all, start_writeback
from .errors import HeaderError, SafetensorsFormatError
from .safetensors_io import DTYPES, MAX_HEADER_SIZE, RANK, SafetensorsFile, TensorSpec, dtype_name

__all__ = ["SafetensorsWriter", "save_file"]


def _file_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    # The reference writer's layout: dtype rank descending (widest first, so every tensor starts
    # aligned to its itemsize), then name.
    return sorted(specs, key=lambda s: (-RANK[dtype_name(s.dtype)], s.name))


def _header_bytes(ordered: list[TensorSpec], metadata: Mapping[str, str] | None) -> tuple[bytes, dict[str, int]]:
    header: dict[str, Any] = {}
    if metadata is not None:  # the reference writer keeps an empty map too
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offsets, cursor = {}, 0
    for s in ordered:
        header[s.name] = {"dtype": dtype_name(s.dtype), "shape": list(s.shape),
                          "data_offsets": [cursor, cursor + s.nbytes]}
        offsets[s.name] = cursor
        cursor += s.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_SIZE:
        raise HeaderError("header would exceed the 100 MB limit", found=f"{len(raw)} bytes")
    return struct.pack("<Q", len(raw)) + raw, offsets


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor, atomically.

    The header is written first from `specs`, so nothing is held in memory; `write()` then
    accepts tensors in any order (each goes to its own offset). `commit()` checks that every
    tensor was written, fsyncs and renames the temporary file onto `path`; `abort()` (or an
    exception inside the `with` block) deletes it, leaving `path` as it was.
    """

    def __init__(self, path: str | os.PathLike, specs: Iterable[TensorSpec],
                 metadata: Mapping[str, str] | None = None, *, fsync: bool = True):
        self.path = Path(path)
        self.specs = {s.name: s for s in _file_order(specs)}
        for name in self.specs:
            if name == "__metadata__":
                raise HeaderError("'__metadata__' is reserved and cannot name a tensor", file=self.path)
        header, offsets = _header_bytes(list(self.specs.values()), metadata)
        self._base = {name: len(header) + off for name, off in offsets.items()}
        self._written: set[str] = set()
        self._fsync = fsync
        self._blocks: BlockWriter | None = None  # threads + scratch, reused by every re-laid-out tensor
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._f = open(self.tmp_path, "wb")
        try:
            self._f.write(header)
            self._f.truncate(len(header) + sum(s.nbytes for s in self.specs.values()))
            self._f.flush()  # tensor data goes straight to the descriptor, at its offset
        except BaseException:
            self.abort()
            raise

    @property
    def order(self) -> list[str]:
        """Tensor names in file order; writing in this order writes the file sequentially."""
        return list(self.specs)

    def write(self, name: str, array: np.ndarray, *, cast: bool = False) -> None:
        """Write one tensor. Its shape must match the spec; so must its dtype unless `cast`,
        which converts block by block (bf16/fp16 bits are only ever touched by a cast)."""
        spec = self.specs.get(name)
        if spec is None:
            raise SafetensorsFormatError("tensor was not declared to the writer", file=self.path, tensor=name)
        if tuple(array.shape) != tuple(spec.shape):
            raise SafetensorsFormatError("shape differs from the declared one", file=self.path, tensor=name,
                                         expected=list(spec.shape), found=list(array.shape))
        target = DTYPES[dtype_name(spec.dtype)]
        # A byte-order change keeps every value, so it is not a cast anyone has to ask for.
        cast = cast or array.dtype.newbyteorder("<") == target
        if array.dtype != target and not cast:
            raise SafetensorsFormatError("dtype differs from the declared one", file=self.path, tensor=name,
                                         expected=str(target), found=str(array.dtype))
        fd = self._f.fileno()
        if array.dtype == target and array.flags.c_contiguous:
            if array.size:
                pwrite_all(fd, array.reshape(-1).view(np.uint8), self._base[name])
        else:
            if self._blocks is None:
                self._blocks = BlockWriter()
            self._blocks.write(fd, self._base[name], array, target)
        self._start_writeback(name)
        self._written.add(name)

    def write_from(self, name: str, source: "SafetensorsFile", key: str) -> None:
        """Write tensor `name` as a byte copy of `key` in `source`, made by the kernel: nothing
        passes through this process. Shape and dtype must be the declared ones."""
        spec, info = self.specs.get(name), source.info(key)
        if spec is None:
            raise SafetensorsFormatError("tensor was not declared to the writer", file=self.path, tensor=name)
        if tuple(spec.shape) != info.shape or dtype_name(spec.dtype) != info.dtype:
            raise SafetensorsFormatError("source tensor differs from the declared one", file=self.path,
                                         tensor=name, expected=f"{dtype_name(spec.dtype)}{list(spec.shape)}",
                                         found=f"{info.dtype}{list(info.shape)} in {source.path}")
        copy_file_range(source.fileno(), info.start, self._f.fileno(), self._base[name], info.nbytes)
        self._start_writeback(name)
        self._written.add(name)

    def _start_writeback(self, name: str) -> None:
        # A durable file's tensors go to disk as soon as each is written (see `start_writeback`):
        # the final fsync then has almost nothing left. Without fsync the caller chose not to wait
        # for the disk, and a slow one could make the writeback block: nothing is started.
        if self._fsync:
            start_writeback(self._f.fileno(), self._base[name], self.specs[name].nbytes)

    def commit(self) -> Path:
        """Finish the file and rename it onto `path`."""
        missing = [n for n in self.specs if n not in self._written]
        if missing:
            self.abort()
            raise SafetensorsFormatError(f"{len(missing)} declared tensors were never written",
                                         file=self.path, tensor=missing[0])
        self._close_blocks()
        self._f.flush()
        if self._fsync:
            os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Delete the temporary file; `path` is left untouched."""
        self._close_blocks()
        if not self._f.closed:
            self._f.close()
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass

    def _close_blocks(self) -> None:
        if getattr(self, "_blocks", None) is not None:
            self._blocks.close()
            self._blocks = None

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None, *, fsync: bool = True) -> Path:
    """Write `tensors` to `path` atomically (same bytes as `safetensors.numpy.save_file`)."""
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with SafetensorsWriter(path, specs, metadata, fsync=fsync) as w:
        for name in w.order:
            w.write(name, np.asarray(tensors[name]))
    return Path(path)
