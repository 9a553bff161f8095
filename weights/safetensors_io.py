"""Safetensors files read lazily through a memory map, after validating every header byte.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
N, N bytes of UTF-8 JSON mapping each tensor name to `{"dtype", "shape", "data_offsets"}` (plus
an optional `__metadata__` string map), then the data buffer. Offsets are relative to the buffer
and must tile it exactly: no overlap, no hole, nothing trailing.

We parse and validate the header ourselves rather than trusting a library, so that every
malformed file becomes a `SafetensorsFormatError` naming the file, the tensor, what was expected
and what was found. Tensor data is never copied on read: `get()` returns a read-only numpy view
of the mapped file, and `release()` drops its pages from this process so a pass over a large
file keeps resident memory near one tensor.

Writing is in `weights.safetensors_writer`.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
import weakref
from dataclasses import dataclass
from typing import Any, Iterable

import ml_dtypes
import numpy as np

from .blockcopy import pread_into
from .errors import (DataOffsetError, HeaderError, SafetensorsFormatError, SourceChangedError, TruncatedFileError,
                     UnknownDtypeError)

__all__ = ["DTYPES", "MAX_HEADER_SIZE", "TensorInfo", "TensorSpec", "SafetensorsFile", "dtype_name",
           "load_file", "release_pages"]

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
RANK = {name: i for i, name in enumerate(DTYPES)}  # the reference writer's sort key
_NAMES = {dt: name for name, dt in DTYPES.items()}
_PAGE = mmap.PAGESIZE
# The maps `SafetensorsFile.get` made (read-only, file-backed): the only memory `release_pages` touches.
_READ_ONLY_MAPS: "weakref.WeakSet[mmap.mmap]" = weakref.WeakSet()


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
        self._file = None
        try:
            # O_NONBLOCK: opening a FIFO must not block (it is refused just below); regular files
            # ignore the flag.
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            self._file = f = os.fdopen(fd, "rb")
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SafetensorsFormatError("not a regular file", file=self.path)
            size = st.st_size
            self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            self.metadata, self.tensors, self._data_start = self._read_header(f, size)
        except OSError as e:
            self.close()
            raise SafetensorsFormatError(f"cannot read file: {e.strerror or e}", file=self.path) from None
        except BaseException:
            self.close()
            raise

    def _read_header(self, f, size: int) -> tuple[dict[str, str], dict[str, TensorInfo], int]:
        path = self.path
        if size < 8:
            raise TruncatedFileError("file too short to hold the 8-byte header length",
                                     file=path, expected=">= 8 bytes", found=f"{size} bytes")
        (n,) = struct.unpack("<Q", f.read(8))
        # The length is not quoted: in a file that is not safetensors (a link to a secret, say)
        # these 8 bytes are the secret's first 8.
        if n > MAX_HEADER_SIZE:
            raise HeaderError("header length field above the 100 MB limit (not a safetensors file?)", file=path,
                              expected=f"<= {MAX_HEADER_SIZE} bytes", found=f"a file of {size} bytes")
        if 8 + n > size:
            raise TruncatedFileError("header length field runs past the end of the file (truncated, or not "
                                     "a safetensors file)", file=path, found=f"a file of {size} bytes")
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
        if self._file is None:
            raise SafetensorsFormatError("file is closed", file=self.path, tensor=name)
        self.check_unchanged(name)  # a page past a truncated end would be SIGBUS, not an error
        if self._mm is None:
            # Mapped on first use, not at open: reading headers (or copying bytes with pread, as the
            # converter does) never reserves address space for the whole file.
            try:
                self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
                _READ_ONLY_MAPS.add(self._mm)
            except OSError as e:
                raise SafetensorsFormatError(f"cannot map file: {e.strerror or e}", file=self.path) from None
        count = info.nbytes // info.np_dtype.itemsize
        return np.frombuffer(self._mm, info.np_dtype, count, info.start).reshape(info.shape)

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor as a writable array, read with positioned reads (no memory map): a file
        truncated while it is read gives `SourceChangedError`, never SIGBUS.

        In fresh memory, or, when `out` (a C-contiguous uint8 buffer) is large enough, in its
        first bytes: the result is then only valid until `out` is reused.
        """
        info = self.info(name)
        if out is not None and out.flags.c_contiguous and out.dtype == np.uint8 and out.nbytes >= info.nbytes:
            arr = out.reshape(-1)[:info.nbytes].view(info.np_dtype).reshape(info.shape)
        else:
            arr = np.empty(info.shape, info.np_dtype)
        if info.nbytes:
            done = pread_into(self.fileno(), arr.reshape(-1).view(np.uint8), info.start)
            if done < info.nbytes:
                raise SourceChangedError(f"file ended {info.nbytes - done} bytes early: truncated while "
                                         "being read", file=self.path, tensor=name)
        return arr

    def check_unchanged(self, name: str | None = None) -> None:
        """Raise `SourceChangedError` when the file on disk is no longer the one opened (size,
        modification time or inode changed, or it was replaced)."""
        if self._file is None:
            return
        st = os.fstat(self._file.fileno())
        now = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        try:
            on_disk = os.stat(self.path)
            replaced = (on_disk.st_dev, on_disk.st_ino) != now[:2]
        except OSError:
            replaced = True
        if now != self._identity or replaced:
            raise SourceChangedError("the file changed while it was being read (size, modification time "
                                     "or inode); nothing was written", file=self.path, tensor=name)

    def release(self, name: str) -> None:
        """Drop this tensor's pages from the process (they stay in the page cache).

        Without this, a pass over a memory-mapped file leaves every page it touched resident
        and counted in this process's RSS until the map is closed.
        """
        info = self.tensors.get(name)
        if info is not None and self._mm is not None:
            _drop_pages(self._mm, info.start, info.end - info.start)

    def fileno(self) -> int:
        """The open file's descriptor (for kernel copies of tensor bytes)."""
        if self._file is None:
            raise SafetensorsFormatError("file is closed", file=self.path)
        return self._file.fileno()

    def close(self) -> None:
        """Close and unmap the file. Views still alive keep the map open until they are garbage."""
        if self._file is not None:
            self._file.close()
            self._file = None
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


def release_pages(view: np.ndarray) -> None:
    """Drop from this process the pages under `view`, a C-contiguous part of a tensor that
    `SafetensorsFile.get` returned, once its bytes have been copied: a tensor loaded block by block
    then keeps one block resident, not the whole tensor. Pages only partly under `view` go too
    (touched again, they are read back from the file). Any other array (one not backed by such a
    read-only map, or a strided view) is left alone: dropping anonymous pages would zero them."""
    base = view
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    if not isinstance(base, mmap.mmap) or base not in _READ_ONLY_MAPS or not view.flags.c_contiguous:
        return
    offset = view.__array_interface__["data"][0] - np.frombuffer(base, np.uint8, 1).__array_interface__["data"][0]
    _drop_pages(base, offset, view.nbytes)


def _drop_pages(mm: mmap.mmap, offset: int, nbytes: int) -> None:
    # MADV_DONTNEED over the pages holding bytes [offset, offset + nbytes) of a read-only file map:
    # they leave this process (and its RSS) but stay in the page cache. Advice only: correctness
    # never depends on it, so a refusal is ignored.
    if nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = offset - offset % _PAGE
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, offset + nbytes - start)
    except (OSError, ValueError):
        pass


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every tensor of a file into memory (copies), after full validation."""
    with SafetensorsFile(path) as f:
        return {k: np.array(f.get(k)) for k in f.keys()}
