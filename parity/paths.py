"""Output paths of the commands: checked before any work, written atomically.

Every file a command writes (`--json`, `--html`, `record`'s reference, `demo --out`) is checked
up front, so a typo costs nothing: the path must name a file (not a directory, not `.` or ``),
its directory must exist or be creatable, and the file must be creatable or writable there
(probed by opening it, which catches `/proc/...`, read-only mounts and permissions alike; a new
file made by the probe is removed). What cannot be known up front (a full disk) surfaces at
write time as the same one-line error. Writes go to a temporary file renamed into place, so an
interrupted write never leaves half a report.
"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path
from typing import Any

from .loading import BadInputError

__all__ = ["check_output_dir", "check_output_file", "write_text_atomic"]


def _first_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _check_parent(path: Path, what: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    base = _first_existing(parent)
    if not base.is_dir():
        raise BadInputError(f"{what} {path}: {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise BadInputError(f"{what} {path}: cannot create files in {base} (permission denied)")


def _probe_mkdir(directory: Path, what: str, path: Any) -> None:
    """Probe that the missing `directory` can be made (mkdir then rmdir of its first missing
    ancestor): catches /proc/x/y and read-only mounts, which os.access does not."""
    missing = directory
    while not missing.parent.exists():
        missing = missing.parent
    try:
        os.mkdir(missing)
        os.rmdir(missing)
    except OSError as e:
        raise BadInputError(f"{what} {path}: cannot create {missing} ({e.strerror or e})") from None


def check_output_file(path: str | os.PathLike, what: str, *, overwrite: bool = True,
                      outside: str | os.PathLike | None = None) -> Path:
    """Refuse an output file path that cannot be written, before any work (`BadInputError`
    naming `what`, e.g. "--json"). With `overwrite=False` an existing file is refused too; with
    `outside` (an input checkpoint directory), so is any path inside it: outputs go next to a
    checkpoint, never into it (where they could overwrite its files, or be read as weights)."""
    if not str(path).strip():
        raise BadInputError(f"{what}: empty path")
    p = Path(path)
    if p.name in ("", ".", ".."):
        raise BadInputError(f"{what} {path}: names a directory, not a file")
    if outside is not None and os.path.isdir(outside):
        root = os.path.realpath(outside)
        if os.path.commonpath([os.path.realpath(p), root]) == root:
            raise BadInputError(f"{what} {path}: lies inside the checkpoint directory {outside}; write it elsewhere")
    if os.path.lexists(p):
        try:
            st = os.stat(p)
        except OSError as e:
            raise BadInputError(f"{what} {path}: {e.strerror or e}") from None
        if stat.S_ISDIR(st.st_mode):
            raise BadInputError(f"{what} {path}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise BadInputError(f"{what} {path}: not a regular file")
        if not overwrite:
            raise BadInputError(f"{what} {path}: already exists; pass --force to replace it")
        try:
            with open(p, "ab"):  # writable, without changing a byte
                pass
        except OSError as e:
            raise BadInputError(f"{what} {path}: cannot write ({e.strerror or e})") from None
        return p
    _check_parent(p, what)
    if not p.parent.exists():
        _probe_mkdir(p.parent, what, path)  # created at write time
        return p
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        raise BadInputError(f"{what} {path}: cannot create ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(p)
    return p


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Refuse an output directory path that cannot be created or written (`BadInputError`)."""
    if not str(path).strip():
        raise BadInputError(f"{what}: empty path")
    p = Path(path)
    if os.path.lexists(p):
        if not p.is_dir():
            raise BadInputError(f"{what} {path}: exists and is not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise BadInputError(f"{what} {path}: not writable")
        return p
    _check_parent(p / "x", what)
    _probe_mkdir(p, what, path)
    return p


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same directory, renamed into place.

    Raises `BadInputError` (one line) on any OS error, a full disk included.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise BadInputError(f"cannot write {path}: {e.strerror or e}") from None
    return path
