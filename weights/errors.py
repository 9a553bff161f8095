"""The errors a checkpoint or its config can raise, one class per kind of problem.

Every message names the file, the tensor when there is one, what was expected and what was
found, so a user can fix the input without reading a traceback. `LOAD_ERRORS` is the complete
list of what reading untrusted checkpoint bytes may raise; anything else is a bug in twinlm.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

__all__ = [
    "ConfigError",
    "CheckpointError",
    "SafetensorsFormatError",
    "TruncatedFileError",
    "HeaderError",
    "UnknownDtypeError",
    "DataOffsetError",
    "ShardIndexError",
    "CheckpointNotFoundError",
    "StateMismatchError",
    "ConfigMismatchError",
    "NonFiniteWeightsError",
    "MemoryLimitError",
    "UnsafePathError",
    "SourceChangedError",
    "MissingKeysError",
    "UnexpectedKeysError",
    "ShapeMismatchError",
    "TiedWeightsMismatchError",
    "PickleRefusedError",
    "MissingDependencyError",
    "DestinationExistsError",
    "LOAD_ERRORS",
]


class ConfigError(ValueError):
    """A config value breaks a rule; the message names the field and the rule."""

    def __init__(self, field_name: str, rule: str, *, source: str | None = None):
        self.field = field_name
        self.rule = rule
        where = f"{source}: " if source else ""
        super().__init__(f"{where}config field '{field_name}': {rule}")


class CheckpointError(Exception):
    """Base class: a checkpoint on disk is missing, malformed, or does not fit the model.

    Attributes keep the parts of the message for programs: `file`, `tensor`, `expected`,
    `found`, `problem`.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | os.PathLike | None = None,
        tensor: str | None = None,
        expected: Any = None,
        found: Any = None,
    ):
        self.problem = problem
        self.file = os.fspath(file) if file is not None else None
        self.tensor = tensor
        self.expected = expected
        self.found = found
        super().__init__(self._format())

    def _format(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(f"{self.file}:")
        if self.tensor is not None:
            parts.append(f"tensor {self.tensor!r}:")
        parts.append(self.problem)
        msg = " ".join(parts)
        if self.expected is not None or self.found is not None:
            msg += f" (expected {self.expected}, found {self.found})"
        return msg


class SafetensorsFormatError(CheckpointError):
    """A `.safetensors` file breaks the format (header, dtypes, offsets)."""


class TruncatedFileError(SafetensorsFormatError):
    """The file ends before its header or its tensor data does."""


class HeaderError(SafetensorsFormatError):
    """The header is too large, not UTF-8 JSON, not an object, or has a malformed entry."""


class UnknownDtypeError(SafetensorsFormatError):
    """A tensor's dtype is not one twinlm can represent in numpy."""


class DataOffsetError(SafetensorsFormatError):
    """Tensor data offsets are out of range, overlap, leave holes, or disagree with shape x dtype."""


class ShardIndexError(CheckpointError):
    """`model.safetensors.index.json` is invalid, names a missing shard, or disagrees with a shard."""


class CheckpointNotFoundError(CheckpointError):
    """The directory holds no weights file twinlm knows how to read."""


class StateMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the model; `report` holds every offending tensor.

    Strict loading raises the most specific subclass (shape mismatch, then missing, then
    unexpected); the message lists all problems of all kinds, one per line.
    """

    def __init__(self, report: Any, *, file: str | os.PathLike | None = None):
        self.report = report
        super().__init__(report.describe(), file=file)


class MissingKeysError(StateMismatchError):
    """The model has parameters the checkpoint lacks."""


class UnexpectedKeysError(StateMismatchError):
    """The checkpoint has tensors the model has no parameter for."""


class ShapeMismatchError(StateMismatchError):
    """A tensor's shape (or dtype kind) disagrees with the model built from the config."""


class TiedWeightsMismatchError(StateMismatchError):
    """`tie_word_embeddings` is set, but `lm_head.weight` differs from the input embedding."""


class ConfigMismatchError(CheckpointError):
    """The checkpoint's header disagrees with what config.json implies (tensor count or total
    size), found before any module is built."""


class NonFiniteWeightsError(CheckpointError):
    """The checkpoint holds NaN or infinite values; `tensors` lists (name, count) of each."""

    def __init__(self, tensors: Sequence[tuple[str, int]], *, file: str | os.PathLike | None = None):
        self.tensors = list(tensors)
        shown = ", ".join(f"{n} ({c} value{'s' if c != 1 else ''})" for n, c in self.tensors[:8])
        more = f" and {len(self.tensors) - 8} more" if len(self.tensors) > 8 else ""
        super().__init__(f"{len(self.tensors)} tensor(s) hold NaN or infinite values: {shown}{more}; "
                         "pass --allow-nonfinite-weights (allow_nonfinite=True) to compare them anyway",
                         file=file)


class MemoryLimitError(CheckpointError):
    """The work needs more memory than this process can ever hold (physical memory + swap, or
    RLIMIT_AS), found before allocating it."""


class UnsafePathError(CheckpointError):
    """A path leaves the directory it must stay in (a symlink out of the source), or an output
    path is one that must not be written (inside the source, the source itself, a symlink)."""


class SourceChangedError(CheckpointError):
    """A source file changed (size, modification time or inode) while it was being read."""


class PickleRefusedError(CheckpointError):
    """Only pickle weights (`.bin`, `.pt`) were found and pickles were not allowed."""

    def __init__(self, files: Sequence[str | os.PathLike]):
        names = ", ".join(os.fspath(f) for f in files)
        super().__init__(
            "refusing to load pickle weights, which can run arbitrary code; convert them with "
            "`twinlm convert --allow-pickle SRC DST` (loads with torch.load(weights_only=True))",
            file=names,
        )


class MissingDependencyError(CheckpointError):
    """An optional dependency (torch, for pickles) is needed and not installed."""


class DestinationExistsError(CheckpointError):
    """The destination exists and overwriting it was not asked for."""

    def __init__(self, path: str | os.PathLike):
        super().__init__("destination already exists; pass --force (force=True) to replace it",
                         file=path)


# Everything reading untrusted checkpoint bytes or config.json may raise.
LOAD_ERRORS: tuple[type[Exception], ...] = (CheckpointError, ConfigError)
