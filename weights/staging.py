"""Replacing a directory atomically, and cleaning up after writers that died.

A writer stages everything in `.DST.tmp-XXXXXXXX`, a sibling of DST, and holds an exclusive
`flock` on `.DST.tmp-XXXXXXXX.lock` for as long as it works. The lock is what tells a live
staging directory from a dead one: the kernel drops it when its holder exits, however it exits
(kill -9 included). So at the next run `clean_stale(dst)` removes every `.DST.tmp-*` and
`.DST.old-*` sibling whose lock it can take, or that has no lock (left by a version without
locks, or by a writer killed between removing its staging directory and its lock), and leaves
alone those a live writer holds.

Replacing an existing DST uses `renameat2(RENAME_EXCHANGE)` (Linux >= 3.15, through libc by
ctypes): staging and DST swap names in one step, so DST never ceases to exist, and the old
content, now under the staging name, is deleted after. Where the exchange is not available
(another OS, or a filesystem without it, e.g. some network mounts), the fallback is two renames:
DST -> `.DST.old-*`, staging -> DST; between them DST is briefly absent, and a crash there leaves
the old content in `.DST.old-*`, which the next run removes (or, if DST is then absent, a user
can rename back).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

from .errors import DestinationExistsError

__all__ = ["atomic_directory", "clean_stale", "exchange", "staging_siblings"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap the names `a` and `b` atomically (both must exist). False where the OS or the
    filesystem cannot (the caller falls back to two renames); OSError on any other failure."""
    libc = _libc()
    fn = getattr(libc, "renameat2", None) if libc is not None else None
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a))


def staging_siblings(dst: str | os.PathLike) -> list[Path]:
    """The `.DST.tmp-*` and `.DST.old-*` siblings of `dst` (their lock files left out)."""
    dst = Path(dst)
    parent = dst.parent if str(dst.parent) else Path(".")
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    prefixes = (f".{dst.name}.tmp-", f".{dst.name}.old-")
    return sorted(parent / n for n in names if n.startswith(prefixes) and not n.endswith(".lock"))


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path` (created if absent), or None when another
    process holds it."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(dst: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """Remove the staging siblings of `dst` that no live writer holds; returns (removed, in use).

    A sibling is stale when its lock can be taken or it has none (see the module doc)."""
    removed, in_use = [], []
    for p in staging_siblings(dst):
        lock = p.with_name(p.name + ".lock")
        fd = _try_lock(lock) if os.path.lexists(lock) else -1
        if fd is None:
            in_use.append(p)
            continue
        try:
            _remove(p)
            removed.append(p)
        finally:
            if fd >= 0:
                _remove(lock)
                os.close(fd)
    # Lock files whose directory is gone (a writer killed after its cleanup began).
    parent = Path(dst).parent if str(Path(dst).parent) else Path(".")
    with contextlib.suppress(OSError):
        for n in os.listdir(parent):
            if n.startswith((f".{Path(dst).name}.tmp-", f".{Path(dst).name}.old-")) and n.endswith(".lock") \
                    and not os.path.lexists(parent / n[:-len(".lock")]):
                fd = _try_lock(parent / n)
                if fd is not None:
                    _remove(parent / n)
                    os.close(fd)
    return removed, in_use


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, force: bool = False,
                     keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a staging directory next to `dst`; on success it replaces `dst` atomically.

    On any exception (Ctrl-C included) the staging directory is deleted and `dst` is left as
    it was; after kill -9, the next run's `clean_stale` deletes it. An existing `dst` is only
    replaced with `force`; files of it for which `keep(name)` is true (a tokenizer next to the
    weights, say) are carried over unless staged anew.
    """
    dst = Path(dst)
    if os.path.lexists(dst) and not force:
        raise DestinationExistsError(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dst)
    token = uuid.uuid4().hex[:8]
    staging = dst.with_name(f".{dst.name}.tmp-{token}")
    lock = staging.with_name(staging.name + ".lock")
    lock_fd = _try_lock(lock)  # taken before the directory exists: a lockless one is always stale
    try:
        staging.mkdir()
        yield staging
        if keep is not None and dst.is_dir() and not dst.is_symlink():
            for p in dst.iterdir():
                if p.is_file() and not p.is_symlink() and keep(p.name) and not (staging / p.name).exists():
                    shutil.copy2(p, staging / p.name, follow_symlinks=False)
        _fsync_dir(staging)
        if os.path.lexists(dst):
            if not force:
                raise DestinationExistsError(dst)
            if exchange(staging, dst):  # staging now holds the old content
                _fsync_dir(dst.parent)
                _remove(staging)
            else:
                backup = dst.with_name(f".{dst.name}.old-{token}")
                os.rename(dst, backup)
                try:
                    os.rename(staging, dst)
                except BaseException:
                    os.rename(backup, dst)
                    raise
                _fsync_dir(dst.parent)
                _remove(backup)
        else:
            os.rename(staging, dst)
            _fsync_dir(dst.parent)
    finally:
        if os.path.lexists(staging):
            _remove(staging)
        if lock_fd is not None:
            _remove(lock)
            os.close(lock_fd)
