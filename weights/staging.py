"""Replacing a directory atomically: a staging directory renamed onto the destination."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

from .errors import DestinationExistsError

__all__ = ["atomic_directory"]


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
    """Yield a staging directory next to `dst`; on success it replaces `dst` in one rename.

    On any exception (Ctrl-C included) the staging directory is deleted and `dst` is left as
    it was. An existing `dst` is only replaced with `force`; files of it for which `keep(name)`
    is true (a tokenizer next to the weights, say) are carried over unless staged anew.
    """
    dst = Path(dst)
    if dst.exists() and not force:
        raise DestinationExistsError(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        if keep is not None and dst.is_dir():
            for p in dst.iterdir():
                if p.is_file() and keep(p.name) and not (staging / p.name).exists():
                    shutil.copy2(p, staging / p.name)
        _fsync_dir(staging)
        if dst.exists():
            if not force:
                raise DestinationExistsError(dst)
            backup = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(dst, backup)
            try:
                os.rename(staging, dst)
            except BaseException:
                os.rename(backup, dst)
                raise
            shutil.rmtree(backup) if backup.is_dir() else backup.unlink()
        else:
            os.rename(staging, dst)
        _fsync_dir(dst.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
