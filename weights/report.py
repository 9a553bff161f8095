"""Matching a checkpoint's tensors against what a model expects: `LoadReport` and `match_state`.

Strict by default: every missing, unexpected or mis-shaped tensor is reported at once, in one
`StateMismatchError`. A few differences are benign and handled rather than reported, because
`transformers` itself produces them:

- rotary `inv_freq` buffers, saved by old transformers versions, are ignored;
- the legacy `transformer.` prefix (old `LlamaForQuestionAnswering` checkpoints) reads as `model.`;
- with `tie_word_embeddings`, `lm_head.weight` may be absent (it is the embedding) or present and
  equal to the embedding; present and different is an error, since the model cannot hold both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol

import numpy as np

from .errors import (MissingKeysError, ShapeMismatchError, StateMismatchError, TiedWeightsMismatchError,
                     UnexpectedKeysError)
from .names import is_legacy_name, is_rotary_buffer, legacy_name

__all__ = ["TensorMismatch", "LoadReport", "TensorSource", "match_state", "iter_tensors",
           "EMBED_KEY", "LM_HEAD_KEY"]

EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"


class TensorSource(Protocol):
    """What matching needs from a reader (`CheckpointReader` is one)."""

    def keys(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> np.dtype: ...
    def get(self, name: str) -> np.ndarray: ...
    def release(self, name: str) -> None: ...


@dataclass(frozen=True)
class TensorMismatch:
    """One tensor whose shape or dtype kind does not fit the model."""

    name: str  # the model's parameter name
    expected_shape: tuple[int, ...]
    expected_dtype: str
    found_shape: tuple[int, ...]
    found_dtype: str
    reason: str = "shape"  # "shape", "dtype" (kind differs: float vs int), or "tied"

    def describe(self) -> str:
        what = {"shape": "shape mismatch", "dtype": "dtype mismatch",
                "tied": "tied to model.embed_tokens.weight but differs"}[self.reason]
        return (f"{self.name}: {what}: expected {list(self.expected_shape)} {self.expected_dtype}, "
                f"found {list(self.found_shape)} {self.found_dtype}")


@dataclass
class LoadReport:
    """What loading found. `sources` maps each loadable model parameter to the checkpoint
    tensor that fills it (a tied head maps to the embedding)."""

    missing: list[str] = field(default_factory=list)  # model parameters absent from the checkpoint
    unexpected: list[str] = field(default_factory=list)  # checkpoint tensors the model lacks
    mismatched: list[TensorMismatch] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # benign checkpoint tensors skipped on purpose
    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint name -> model name
    sources: dict[str, str] = field(default_factory=dict)  # model name -> checkpoint name
    file: str | None = None  # the checkpoint, for messages

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        """Every problem, one per line, with expected and found shape/dtype."""
        lines = []
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} tensor(s) do not fit the model:")
            lines += _first(m.describe() for m in self.mismatched)
        if self.missing:
            lines.append(f"{len(self.missing)} model parameter(s) missing from the checkpoint:")
            lines += _first(self.missing)
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} unexpected tensor(s) in the checkpoint:")
            lines += _first(self.unexpected)
        return "\n".join(lines) if lines else "checkpoint matches the model"

    def raise_if_failed(self) -> None:
        """Raise the most specific `StateMismatchError` subclass when anything is wrong."""
        if self.ok:
            return
        cls: type[StateMismatchError]
        if any(m.reason == "tied" for m in self.mismatched):
            cls = TiedWeightsMismatchError
        elif self.mismatched:
            cls = ShapeMismatchError
        elif self.missing:
            cls = MissingKeysError
        else:
            cls = UnexpectedKeysError
        raise cls(self, file=self.file)


# Problems listed per kind; the count says how many more there are (a config off by 10**4 layers
# would otherwise produce a multi-megabyte "one-line" message).
DESCRIBE_LIMIT = 20


def _first(items: Any) -> list[str]:
    items = list(items)
    lines = [f"  {x}" for x in items[:DESCRIBE_LIMIT]]
    if len(items) > DESCRIBE_LIMIT:
        lines.append(f"  ... and {len(items) - DESCRIBE_LIMIT} more")
    return lines


def _kind(dt: np.dtype) -> str:
    # ml_dtypes floats (bfloat16, float8) report kind 'V'; treat every non-int, non-bool as float.
    dt = np.dtype(dt)
    return "b" if dt.kind == "b" else "i" if dt.kind in "iu" else "c" if dt.kind == "c" else "f"


def _equal(reader: TensorSource, a: str, b: str) -> bool:
    if reader.shape(a) != reader.shape(b) or reader.dtype(a) != reader.dtype(b):
        return False
    try:
        return bool(np.array_equal(reader.get(a), reader.get(b), equal_nan=True))
    finally:
        reader.release(a)
        reader.release(b)


def match_state(expected: Mapping[str, tuple[tuple[int, ...], Any]], reader: TensorSource, *,
                tie_word_embeddings: bool = False, strict: bool = True,
                file: str | None = None) -> LoadReport:
    """Compare the model's `{name: (shape, dtype)}` with the checkpoint's tensors.

    Shapes must be equal. Dtypes may differ within a kind (bf16 checkpoint into an f32 model is
    a cast the caller makes); a different kind (float into an int buffer) is a mismatch. With
    `strict`, any problem raises a `StateMismatchError` listing all of them; otherwise the report
    is returned and `report.sources` holds what can be loaded.
    """
    if file is None and getattr(reader, "directory", None) is not None:
        file = str(reader.directory)
    report = LoadReport(file=file)
    use_legacy = not any(is_legacy_name(k) for k in expected)
    keys = reader.keys()
    present = set(keys)
    by_model_name: dict[str, str] = {}
    for key in keys:
        if is_rotary_buffer(key):
            report.ignored.append(key)
            continue
        name = key
        if use_legacy and is_legacy_name(key):
            name = legacy_name(key)
            if name in present:
                report.unexpected.append(key)  # the same parameter twice: keep the modern name
                continue
            report.renamed[key] = name
        by_model_name[name] = key

    tied_head = tie_word_embeddings and LM_HEAD_KEY in by_model_name and EMBED_KEY in by_model_name
    for name, (shape, dtype) in expected.items():
        key = by_model_name.get(name)
        if key is None:
            if name == LM_HEAD_KEY and tie_word_embeddings and EMBED_KEY in by_model_name:
                key = by_model_name[EMBED_KEY]  # the head is the embedding
            else:
                report.missing.append(name)
                continue
        found_shape, found_dtype = tuple(reader.shape(key)), np.dtype(reader.dtype(key))
        reason = None
        if found_shape != tuple(shape):
            reason = "shape"
        elif _kind(found_dtype) != _kind(dtype):
            reason = "dtype"
        if reason:
            report.mismatched.append(TensorMismatch(name, tuple(shape), str(np.dtype(dtype)),
                                                    found_shape, str(found_dtype), reason))
        else:
            report.sources[name] = key

    for name, key in by_model_name.items():
        if name == LM_HEAD_KEY and tied_head:
            embed_key = by_model_name[EMBED_KEY]
            if _equal(reader, key, embed_key):
                report.ignored.append(key)
                if name in report.sources:  # load the one tensor the two parameters share
                    report.sources[name] = embed_key
            else:
                report.sources.pop(name, None)
                report.mismatched.append(TensorMismatch(
                    name, tuple(reader.shape(embed_key)), str(reader.dtype(embed_key)),
                    tuple(reader.shape(key)), str(reader.dtype(key)), "tied"))
        elif name not in expected:
            report.unexpected.append(key)
    if strict:
        report.raise_if_failed()
    return report


def iter_tensors(reader: TensorSource, sources: Mapping[str, str],
                 dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(model_name, array)` one tensor at a time, cast to `dtype` when given.

    Without a cast the array is the read-only memory-mapped view (bit-exact, no copy). Its pages
    are released when the consumer asks for the next tensor, so copy what you keep first.
    """
    target = np.dtype(dtype) if dtype is not None else None
    for name, key in sources.items():
        arr = reader.get(key)
        if target is not None and arr.dtype != target and _kind(arr.dtype) == "f":
            arr = arr.astype(target)
        yield name, arr
        reader.release(key)
