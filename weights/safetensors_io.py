"""Safetensors files read lazily through a memory map and written atomically, tensor by tensor.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
N, N bytes of UTF-8 JSON mapping each tensor name to `{"dtype", "shape", "data_offsets"}` (plus
an optional `__metadata__` string map), then the data buffer. Offsets are relative to the buffer
and must tile it exactly: no overlap, no hole, nothing trailing.

We parse and validate the header ourselves rather than trusting a library, so that every
malformed file becomes a `SafetensorsFormatError` naming the file, the tensor, what was expected
and what was found. Tensor data is never copied on read: `get()` returns a read-only numpy view
of the mapped file, and `release()` drops its pages from this process so a pass over a large
file keeps resident memory near one tensor.

The writer produces byte for byte what `safetensors.numpy.save_file` writes (same tensor order,
same compact JSON, header padded with spaces to 8 bytes), streams each tensor to a temporary file
in the destination's directory, and renames it into place only once everything is written.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from .errors import DataOffsetError, HeaderError, SafetensorsFormatError, TruncatedFileError, UnknownDtypeError

__all__ = [
    "DTYPES",
    "MAX_HEADER_SIZE",
    "TensorInfo",
    "TensorSpec",
    "SafetensorsFile",
    "SafetensorsWriter",
    "dtype_name",
    "load_file",
    "save_file",
]

# The safetensors reference implementation refuses headers above 100 MB; so do we, before
# reading one byte of it, so a lying length cannot make us allocate gigabytes.
MAX_HEADER_SIZE = 100_000_000

# Safetensors dtype name -> numpy dtype, little-endian. Insertion order is the Rust `Dtype`
# enum's order, which the reference writer sorts by (descending) to lay tensors out; sub-byte
# types (F4, F6_*) have no numpy representation and are rejected as unknown.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "C64": np.dtype("<c8"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
}
_RANK = {name: i for i, name in enumerate(DTYPES)}
_NAMES = {dt: name for name, dt in DTYPES.items()}
_PAGE = mmap.PAGESIZE
_CHUNK_BYTES = 16 << 20  # non-contiguous or re-typed tensors are written in blocks of this size


def dtype_name(dtype: Any) -> str:
    """numpy dtype -> safetensors dtype name (`ml_dtypes.bfloat16` -> `"BF16"`)."""
    dt = np.dtype(dtype)
    name = _NAMES.get(dt.newbyteorder("<") if dt.byteorder == ">" else dt)
    if name is None:
        raise UnknownDtypeError("dtype cannot be stored in safetensors", found=str(dt),
                                expected=", ".join(DTYPES))
    return name


@dataclass(frozen=True)
class TensorSpec:
    """What the writer needs to know about a tensor before its data: name, shape, dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class TensorInfo:
    """A validated header entry; `start`/`end` are absolute offsets in the file."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(Exception):
    pass


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _parse_entry(path: str, name: str, entry: Any, data_len: int, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise HeaderError("header entry is not an object", file=path, tensor=name,
                          expected='{"dtype", "shape", "data_offsets"}', found=type(entry).__name__)
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise HeaderError(f"header entry lacks {', '.join(missing)}", file=path, tensor=name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UnknownDtypeError("unknown or unsupported dtype", file=path, tensor=name,
                                expected="one of " + ", ".join(DTYPES), found=repr(dtype))
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise HeaderError("shape is not a list of non-negative integers", file=path, tensor=name,
                          found=repr(shape)[:80])
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
        raise DataOffsetError("data_offsets is not a pair of non-negative integers", file=path,
                              tensor=name, found=repr(offsets)[:80])
    begin, end = offsets
    if begin > end or end > data_len:
        raise DataOffsetError("data_offsets out of range", file=path, tensor=name,
                              expected=f"0 <= begin <= end <= {data_len} (data buffer size)",
                              found=f"[{begin}, {end}]")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise DataOffsetError("data_offsets do not match shape x dtype size", file=path, tensor=name,
                              expected=f"{nbytes} bytes for {dtype}{list(shape)}",
                              found=f"{end - begin} bytes at [{begin}, {end}]")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_tiling(path: str, infos: Iterable[TensorInfo], data_start: int, data_len: int) -> None:
    """The buffer must be tiled exactly (the format forbids holes, which would allow polyglots)."""
    cursor, prev = 0, None
    for info in sorted(infos, key=lambda i: (i.start, i.end)):
        begin = info.start - data_start
        if begin < cursor:
            raise DataOffsetError(f"data overlaps tensor {prev!r}", file=path, tensor=info.name,
                                  expected=f"begin >= {cursor}", found=f"begin {begin}")
        if begin > cursor:
            raise DataOffsetError("hole in the data buffer before this tensor", file=path,
                                  tensor=info.name, expected=f"begin {cursor}", found=f"begin {begin}")
        cursor, prev = info.end - data_start, info.name
    if cursor != data_len:
        raise DataOffsetError("data buffer has bytes no tensor owns", file=path,
                              expected=f"{data_len} bytes covered", found=f"{cursor}")


class SafetensorsFile:
    """One `.safetensors` file: validated header, lazy memory-mapped tensors.

    `get(name)` is a read-only view into the map (no copy); `release(name)` tells the kernel this
    process is done with those pages. Use as a context manager, or call `close()`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._mm: mmap.mmap | None = None
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self.metadata, self.tensors, data_start = self._read_header(f, size)
                if size > data_start:
                    self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise SafetensorsFormatError(f"cannot read file: {e.strerror or e}", file=self.path) from None

    def _read_header(self, f, size: int) -> tuple[dict[str, str], dict[str, TensorInfo], int]:
        path = self.path
        if size < 8:
            raise TruncatedFileError("file too short to hold the 8-byte header length",
                                     file=path, expected=">= 8 bytes", found=f"{size} bytes")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_SIZE:
            raise HeaderError("header length above the 100 MB limit", file=path,
                              expected=f"<= {MAX_HEADER_SIZE} bytes", found=f"{n} bytes")
        if 8 + n > size:
            raise TruncatedFileError("header length runs past the end of the file", file=path,
                                     expected=f"<= {size - 8} bytes", found=f"{n} bytes")
        raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except UnicodeDecodeError as e:
            raise HeaderError(f"header is not UTF-8 (byte {e.start})", file=path) from None
        except _DuplicateKey as e:
            raise HeaderError("header names a tensor twice", file=path, tensor=str(e)) from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError, int-digits limit, deep nesting
            raise HeaderError(f"header is not valid JSON ({str(e)[:100]})", file=path) from None
        if not isinstance(header, dict):
            raise HeaderError("header is not a JSON object", file=path, expected="object",
                              found=type(header).__name__)
        meta = header.pop("__metadata__", None)
        if meta is None:
            meta = {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise HeaderError("__metadata__ is not a map of strings to strings", file=path,
                              found=repr(meta)[:80])
        data_start, data_len = 8 + n, size - 8 - n
        for text in [*header, *meta, *meta.values()]:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate escape: JSON allows it, UTF-8 does not
                raise HeaderError("header string is not valid Unicode", file=path, found=ascii(text)[:80]) from None
        infos = {k: _parse_entry(path, k, v, data_len, data_start) for k, v in header.items()}
        _check_tiling(path, infos.values(), data_start, data_len)
        return meta, infos, data_start

    # ---- mapping-like access ----------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names, in header order."""
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise SafetensorsFormatError("no such tensor in file", file=self.path, tensor=name) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> np.dtype:
        return self.info(name).np_dtype

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only view of the mapped file; bf16/fp16 bits untouched."""
        info = self.info(name)
        if info.nbytes == 0:
            out = np.zeros(info.shape, info.np_dtype)
            out.flags.writeable = False
            return out
        if self._mm is None:
            raise SafetensorsFormatError("file is closed", file=self.path, tensor=name)
        count = info.nbytes // info.np_dtype.itemsize
        return np.frombuffer(self._mm, info.np_dtype, count, info.start).reshape(info.shape)

    def release(self, name: str) -> None:
        """Drop this tensor's pages from the process (they stay in the page cache).

        Without this, a pass over a memory-mapped file leaves every page it touched resident
        and counted in this process's RSS until the map is closed.
        """
        info = self.tensors.get(name)
        if info is None or self._mm is None or info.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = info.start - info.start % _PAGE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, info.end - start)
        except (OSError, ValueError):
            pass  # advice only; correctness never depends on it

    def close(self) -> None:
        """Unmap the file. Views still alive keep the map open until they are garbage."""
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
            self._mm = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---- writing ------------------------------------------------------------------------------
def _file_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    # The reference writer's layout: dtype rank descending (widest first, so every tensor starts
    # aligned to its itemsize), then name.
    return sorted(specs, key=lambda s: (-_RANK[dtype_name(s.dtype)], s.name))


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


def _blocks(array: np.ndarray, dtype: np.dtype) -> Iterator[np.ndarray]:
    """C-contiguous blocks of `array` in `dtype`, about `_CHUNK_BYTES` each, in row-major order.

    Bounds the extra memory of a transpose or a cast to one block instead of one tensor.
    """
    if array.ndim == 0 or array.size == 0:
        yield np.ascontiguousarray(array, dtype=dtype)
        return
    row_bytes = max(1, array[0].size * max(array.itemsize, dtype.itemsize))
    step = max(1, _CHUNK_BYTES // row_bytes)
    for i in range(0, array.shape[0], step):
        yield np.ascontiguousarray(array[i:i + step], dtype=dtype)


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
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._f = open(self.tmp_path, "wb")
        try:
            self._f.write(header)
            self._f.truncate(len(header) + sum(s.nbytes for s in self.specs.values()))
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
        self._f.seek(self._base[name])
        if array.dtype == target and array.flags.c_contiguous:
            if array.size:
                self._f.write(array.reshape(-1).view(np.uint8))
        else:
            for block in _blocks(array, target):
                self._f.write(block.reshape(-1).view(np.uint8))
        self._written.add(name)

    def commit(self) -> Path:
        """Finish the file and rename it onto `path`."""
        missing = [n for n in self.specs if n not in self._written]
        if missing:
            self.abort()
            raise SafetensorsFormatError(f"{len(missing)} declared tensors were never written",
                                         file=self.path, tensor=missing[0])
        self._f.flush()
        if self._fsync:
            os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Delete the temporary file; `path` is left untouched."""
        if not self._f.closed:
            self._f.close()
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass

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


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every tensor of a file into memory (copies), after full validation."""
    with SafetensorsFile(path) as f:
        return {k: np.array(f.get(k)) for k in f.keys()}
