"""`twinlm convert`: re-type, re-shard, and re-layout checkpoints, one tensor at a time.

Tensors whose bytes do not change are copied by the kernel (`copy_file_range`), the others read
with positioned reads into reused memory (the next one read ahead on a thread), then transposed
or cast block by block: peak memory stays near the largest tensor plus the one read ahead (plus
one 8 MB block), whatever the model size. No tensor byte is read through a memory map, so a
source truncated during the conversion is a `SourceChangedError` rather than SIGBUS; a source
changed in place (same size) is caught by the size/mtime/inode check before the commit. The
destination is staged next to DST and renamed into place at the end (`weights.staging`): a
crash or Ctrl-C leaves DST absent, or as it was, and the next run removes the staging directory
of one that was killed.

The source is validated as loading validates it, before DST is touched: config.json, then every
tensor's name, shape and kind against what the config implies (strict by default), and it is
contained: files whose real path leaves SRC are not read without `follow_symlinks`.

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
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .checkpoint import (FLAX_WEIGHTS_NAME, PICKLE_PATTERNS, SAFE_WEIGHTS_NAME, WEIGHT_FILE_RE,
                         CheckpointReader, ShardedWriter, parse_size)
from .config import ModelConfig
from .dtypes import FLOAT_DTYPES
from .errors import (CheckpointError, DestinationExistsError, MissingDependencyError, PickleRefusedError,
                     SourceChangedError, UnsafePathError)
from .hf_config import CONFIG_NAME, parse_config_json, read_config_bytes
from .names import flax_key, is_rotary_buffer, is_transposed, legacy_name
from .pretrained import natural_key
from .report import match_state
from .shapes import check_fits, detect_head, parameter_shapes, parameter_totals
from .safetensors_io import TensorSpec
from .staging import clean_stale

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
    head: str = "causal_lm"  # the head the tensors were validated against
    passed_through: tuple[str, ...] = ()  # tensors the model has no parameter for (--no-strict)
    skipped: tuple[str, ...] = ()  # side files not copied, each with the reason
    cleaned: tuple[str, ...] = ()  # stale staging directories of earlier runs, removed


# Re-typed by --dtype. float8 tensors are left alone: they are quantised weights whose meaning
# depends on scale tensors next to them, and a plain cast would silently break that.
_RETYPED = tuple(FLOAT_DTYPES.values())


class PickleReader:
    """Tensors of `.bin` / `.pt` files, loaded with `torch.load(weights_only=True, mmap=True)`.

    Same interface as `CheckpointReader`. Used only when pickles are explicitly allowed.
    """

    def __init__(self, directory: str | os.PathLike, *, contained: bool = False):
        self.directory = Path(directory)
        torch = _import_torch(self.directory)
        self._torch = torch
        self._tensors: dict[str, Any] = {}
        self._file: dict[str, Path] = {}
        paths = sorted({p for pat in PICKLE_PATTERNS if not pat.endswith(".json")
                        for p in self.directory.glob(pat)})
        root = os.path.realpath(self.directory)
        for path in paths:
            if contained and os.path.commonpath([os.path.realpath(path), root]) != root:
                raise UnsafePathError("links out of the source directory; refusing to read it (pass "
                                      "--follow-symlinks to allow)", file=path)
            if not path.is_file():  # a FIFO would block torch.load forever
                raise CheckpointError("not a regular file", file=path)
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

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor as numpy (see `get`); `out` is not used (torch owns the memory)."""
        return self.get(name)

    def check_unchanged(self) -> None:
        """Nothing checked: torch owns the files of a pickle (see the module doc)."""

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


def open_source(src: str | os.PathLike, *, allow_pickle: bool = False,
                contained: bool = False) -> CheckpointReader | PickleReader:
    """A reader for `src`: safetensors (HF or Flax layout), or pickles when allowed. With
    `contained`, no file whose real path leaves `src` is opened (`UnsafePathError`)."""
    try:
        return CheckpointReader(src, contained=contained)
    except PickleRefusedError:
        if not allow_pickle:
            raise
        return PickleReader(src, contained=contained)


def _read_config(src: Path, target: np.dtype | None) -> tuple[ModelConfig, bytes]:
    """config.json validated (read once, within `read_config_bytes`' limits), and its bytes with
    the dtype field updated when the dtype changes."""
    raw, source = read_config_bytes(src)
    config = ModelConfig.from_hf_dict(parse_config_json(raw, source), source=source)
    if target is None:
        return config, raw
    name = next(k for k, v in DTYPE_NAMES.items() if v == target)
    d = json.loads(raw)
    keys = [k for k in ("torch_dtype", "dtype") if k in d] or ["torch_dtype"]
    for k in keys:
        d[k] = name
    return config, (json.dumps(d, indent=2, sort_keys=True) + "\n").encode("utf-8")


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


def _check_paths(src: Path, dst: Path, force: bool) -> Path:
    """The real path of SRC, after refusing a DST that would destroy or alias it: DST must name a
    directory entry (not "", ".", ".."), must not be a symlink, must not be SRC, inside SRC, or
    contain SRC."""
    if not str(src).strip() or not src.is_dir():
        raise CheckpointError("source checkpoint directory not found", file=src)
    if not str(dst).strip() or dst.name in ("", ".", ".."):
        raise UnsafePathError("DST must name a new directory, not the current or parent directory",
                              file=str(dst) or '""')
    real_src = Path(os.path.realpath(src))
    if dst.is_symlink():
        raise UnsafePathError("DST is a symlink; refusing to write through it", file=dst)
    real_dst = Path(os.path.realpath(dst))
    if real_dst == real_src or real_src in real_dst.parents:
        raise UnsafePathError(f"DST is {'SRC' if real_dst == real_src else 'inside SRC'}: writing it would "
                              "change the source being read", file=dst)
    if real_dst in real_src.parents:
        raise UnsafePathError("DST contains SRC: replacing it would delete the source", file=dst)
    if os.path.lexists(dst) and not force:
        raise DestinationExistsError(dst)  # before any work, so a typo costs nothing
    if os.path.lexists(dst) and not dst.is_dir():
        raise UnsafePathError("DST exists and is not a directory", file=dst)
    base = dst.parent if str(dst.parent) else Path(".")
    while not os.path.lexists(base) and base != base.parent:
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise UnsafePathError(f"cannot create DST: {base} is not a writable directory", file=dst)
    if not os.path.lexists(dst):  # probe: os.access says yes to root under /proc or on read-only mounts
        first = dst
        while not os.path.lexists(first.parent) and first.parent != first:
            first = first.parent
        try:
            os.mkdir(first)
            os.rmdir(first)
        except OSError as e:
            raise UnsafePathError(f"cannot create DST ({e.strerror or e})", file=first) from None
    return real_src


def _side_files(src: Path, follow_symlinks: bool) -> tuple[list[tuple[str, int]], list[str]]:
    """(name, fd) of the regular files of SRC to copy next to the weights (tokenizer, generation
    config, ...), each opened without following a link (unless `follow_symlinks`), and the names
    skipped with why. The caller closes the fds."""
    keep, skipped = [], []
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0))
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if entry.name == CONFIG_NAME or WEIGHT_FILE_RE.match(entry.name) or entry.is_dir(follow_symlinks=False):
            continue
        if entry.is_symlink() and not follow_symlinks:
            skipped.append(f"{entry.name} (a symlink; --follow-symlinks copies its target)")
            continue
        try:
            fd = os.open(entry.path, flags)
        except OSError as e:
            skipped.append(f"{entry.name} ({e.strerror or e})")
            continue
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            skipped.append(f"{entry.name} (not a regular file)")
            continue
        keep.append((entry.name, fd))
    return keep, skipped


def _copy_fd(fd: int, dst: Path) -> None:
    with os.fdopen(os.dup(fd), "rb") as f, open(dst, "xb") as out:
        shutil.copyfileobj(f, out, 1 << 20)


def _unlisted_weights(src: Path, reader: Any) -> list[str]:
    """Weight files in SRC that the reader does not read (a shard left out of the index)."""
    read = {p.name for p in getattr(reader, "files", [])}
    if getattr(reader, "index_path", None) is not None:
        read.add(reader.index_path.name)
    return sorted(p.name for p in src.iterdir() if p.name.endswith(".safetensors") and p.name not in read
                  and p.name != FLAX_WEIGHTS_NAME)


def _validate(reader: Any, config: ModelConfig, src: Path, strict: bool) -> tuple[str, tuple[str, ...]]:
    """(head, names passed through) after checking the source's tensors against the config as
    loading does: strict, every tensor named, shaped and typed (float vs int) as the config
    implies; not strict, tensors the model has no parameter for pass through, the rest as strict.
    An empty result is refused either way."""
    if len(reader) == 0:
        raise CheckpointError("the source holds no tensors; refusing to write an empty checkpoint", file=src)
    head = detect_head(config, reader.keys())
    if strict:
        unlisted = _unlisted_weights(src, reader)
        if unlisted:
            raise CheckpointError(f"weight file(s) not read: {', '.join(unlisted[:5])} (the index does not "
                                  "list them); fix the index, or pass --no-strict", file=src)
        check_fits(reader, config, head, source=src)
        return head, ()
    expected = {name: (shape, np.float32) for name, shape in parameter_shapes(config, head).items()} \
        if parameter_totals(config, head)[0] <= 2 * len(reader) + 16 else None
    if expected is None:
        check_fits(reader, config, head, source=src)  # refuses from the totals
    report = match_state(expected, reader, tie_word_embeddings=config.tie_word_embeddings, strict=False,
                         file=str(src))
    if report.missing or report.mismatched:
        report.unexpected = []  # passed through on purpose
        report.raise_if_failed()
    return head, tuple(report.unexpected)


def _check_disk(dst: Path, nbytes: int) -> None:
    base = dst.parent if str(dst.parent) else Path(".")
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        st = os.statvfs(base)
    except (OSError, AttributeError):
        return
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise CheckpointError(f"DST needs {nbytes / 1e9:.3g} GB and its filesystem has {free / 1e9:.3g} GB free",
                              file=dst)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
            max_shard_size: int | str = "5GB", layout: str = "hf", force: bool = False,
            allow_pickle: bool = False, progress: bool | None = None, fsync: bool = True,
            strict: bool = True, follow_symlinks: bool = False) -> ConvertResult:
    """Convert the checkpoint directory `src` into a new directory `dst`.

    `dtype` re-types floating tensors (`float32`, `bfloat16`, `float16`); without it every
    tensor keeps its bits. `max_shard_size` shards the `hf` layout like transformers. `layout`
    is `hf` or `flax`; the source layout is detected. `progress=None` shows the bar on a TTY.

    The source is validated as loading validates it (`strict`: every tensor named, shaped and
    typed as config.json implies, no weight file left unread; `strict=False` passes tensors the
    model has no parameter for through), and contained: no file whose real path leaves `src` is
    read unless `follow_symlinks`, side files are copied without following links, and `dst`
    may not be `src`, lie inside it, contain it, or be a symlink. Every check runs before DST is
    touched (`CheckpointError` / `ConfigError`); stale staging directories of earlier runs that
    died are removed first (`ConvertResult.cleaned`).
    """
    src, dst = Path(src), Path(dst)
    if layout not in ("hf", "flax"):
        raise ValueError(f"layout must be 'hf' or 'flax', got {layout!r}")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    target = DTYPE_NAMES[dtype] if dtype is not None else None
    limit = parse_size(max_shard_size) if layout == "hf" else None
    _check_paths(src, dst, force)
    if not follow_symlinks and os.path.islink(src / CONFIG_NAME):
        raise UnsafePathError("config.json is a symlink; pass --follow-symlinks to read it", file=src / CONFIG_NAME)
    config, config_bytes = _read_config(src, target)

    with open_source(src, allow_pickle=allow_pickle, contained=not follow_symlinks) as reader:
        head, passed = _validate(reader, config, src, strict)
        plan = _plan(reader, layout, target)
        # Shards follow the natural order of names (layer 2 before layer 10), whatever the source
        # order, so the same checkpoint always shards the same way; reads keep source order.
        specs = sorted((spec for spec, _, _ in plan), key=lambda s: natural_key(s.name))
        weights_name = FLAX_WEIGHTS_NAME if layout == "flax" else SAFE_WEIGHTS_NAME
        meta = {"format": "flax" if layout == "flax" else "pt"}
        total = sum(spec.nbytes for spec, _, _ in plan)
        sides, skipped = _side_files(src, follow_symlinks)
        try:
            _check_disk(dst, total + sum(os.fstat(fd).st_size for _, fd in sides))
            cleaned, _ = clean_stale(dst)
            with ShardedWriter(dst, specs, max_shard_size=limit, metadata=meta,
                               weights_name=weights_name, force=force, fsync=fsync) as writer, \
                    _progress_bar(total, progress, f"convert {src.name} -> {dst.name}") as bar:
                (writer.staging / CONFIG_NAME).write_bytes(config_bytes)
                for name, fd in sides:  # tokenizer, generation config, ...: bytes of the file opened above
                    _copy_fd(fd, writer.staging / name)
                with _Reads(reader, [key for spec, key, transpose in plan
                                     if not _kernel_copy(reader, spec, key, transpose)]) as reads:
                    for i, (spec, key, transpose) in enumerate(plan):
                        _write_tensor(reader, writer, spec, key, transpose, reads)
                        bar.update(spec.nbytes)
                        bar.set_postfix_str(f"tensor {i + 1}/{len(plan)}", refresh=False)
                reader.check_unchanged()  # modified in place, same size: caught here, before the commit
                files = tuple(fname for fname, _ in writer.plan)
        finally:
            for _, fd in sides:
                os.close(fd)
    return ConvertResult(dst, layout, files, len(plan), total, head, passed, tuple(skipped),
                         tuple(str(p) for p in cleaned))


class _ReadBuffer:
    """One buffer for every tensor read whole, grown to the largest: reading into fresh memory
    each time costs a page fault per 4 KB (measured: `preadv` into a fresh 128 MB buffer takes
    twice the CPU of a reused one)."""

    def __init__(self) -> None:
        self._buffer: np.ndarray | None = None

    def get(self, nbytes: int) -> np.ndarray:
        if self._buffer is None or self._buffer.nbytes < nbytes:
            self._buffer = None  # freed before the larger one is made
            self._buffer = np.empty(nbytes, np.uint8)
        return self._buffer


class _Reads:
    """The tensors read whole (`keys`, in the order they are written), each read one tensor
    ahead on a thread: while tensor i is transposed and written, tensor i + 1 is read into the
    other of two reused buffers.

    Why: a `preadv` from the page cache is a copy the kernel makes on the calling thread; read in
    turn, it ran alone between two tensors' transposes, with the other core idle (0.6 s of the
    1.1B checkpoint's ~3 s). Ahead, it runs while the transposes and writes do. Measured (hf ->
    flax, 1.1B bf16, wall / a file copy, both fsync'd, paired runs at load 2-5.6 from other
    jobs): faster in 18 of 26 pairs, the median 2-10% lower in each of four series; CPU time
    unchanged, so where no core is idle (as there) it gains little.

    Memory: two buffers instead of one. Each grows only to the largest tensor read into it, and
    tensors alternate between them, so the extra is about the second-largest tensor read, not the
    largest (1.1B bf16, hf -> flax: peak RSS 183 -> 206 MB, the extra a 23 MB MLP kernel).

    `take(key)` returns the tensor (valid until the next `take`, which starts reading the tensor
    after the next into its buffer) and starts the next read; leaving the `with` waits for a read
    still running, so no thread touches the source or a buffer once the converter moves on (or
    fails).
    """

    def __init__(self, reader: Any, keys: list[str]) -> None:
        self._reader, self._keys = reader, keys
        self._next = 0  # index in keys of the tensor `take` expects
        self._buffers = (_ReadBuffer(), _ReadBuffer())
        self._ahead: Future | None = None  # the read of keys[self._next], once started
        self._pool: ThreadPoolExecutor | None = None

    def _read(self, i: int) -> np.ndarray:
        key = self._keys[i]
        out = self._buffers[i % 2].get(self._reader.nbytes(key)) if isinstance(self._reader, CheckpointReader) \
            else None  # pickles come from torch's memory
        return self._reader.read(key, out)

    def take(self, key: str) -> np.ndarray:
        i = self._next
        if i >= len(self._keys) or self._keys[i] != key:
            raise RuntimeError(f"tensor {key!r} read out of the planned order")  # a bug here, not in the source
        arr = self._ahead.result() if self._ahead is not None else self._read(i)  # re-raises the read's error
        self._ahead, self._next = None, i + 1
        if self._next < len(self._keys) and isinstance(self._reader, CheckpointReader):
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="twinlm-read")
            self._ahead = self._pool.submit(self._read, self._next)
        return arr

    def __enter__(self) -> "_Reads":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # a read still running finishes before the source closes
            self._pool = None
        self._ahead = None


def _kernel_copy(reader: Any, spec: TensorSpec, key: str, transpose: bool) -> bool:
    """Whether the tensor's bytes are written unchanged, so the kernel copies them file to file."""
    if not isinstance(reader, CheckpointReader):
        return False  # pickles: torch owns the bytes (and `get` would copy them)
    view = reader.get(key)  # a view of the map: no byte is read
    out = view.T if transpose else view
    return out.dtype == spec.dtype and out.flags.c_contiguous


def _write_tensor(reader: Any, writer: ShardedWriter, spec: TensorSpec, key: str, transpose: bool,
                  reads: _Reads) -> None:
    """One tensor from the source into the staged shard: a kernel copy when the bytes are the
    same, else read with positioned reads (never through the memory map, so a source truncated
    meanwhile is a `SourceChangedError`, not SIGBUS), then transposed or cast block by block."""
    if _kernel_copy(reader, spec, key, transpose):
        f, raw_key = reader.raw(key)  # same bytes: the kernel copies them
        try:
            writer.write_from(spec.name, f, raw_key)
        except EOFError as e:
            raise SourceChangedError(f"{e}: truncated while being read", file=f.path, tensor=key) from None
        return
    arr = reads.take(key)  # read ahead while the previous tensor was written (see `_Reads`)
    out = arr.T if transpose else arr
    writer.write(spec.name, out, cast=out.dtype != spec.dtype)
