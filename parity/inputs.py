"""Input batches for parity checks: token ids, padding masks, position ids and labels per head.

A batch is framework-neutral (numpy) so the same bits go to both twins. `seeded_batch` builds
the deterministic batch `twinlm check` uses: it always holds a left-padded and a right-padded
row, because padding is where mask and position bugs hide. `parity.strategies.batches` draws
the same kind of batch for hypothesis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from weights.config import ModelConfig
from weights.names import HEADS, IGNORE_INDEX  # head key -> class name in each twin; the ignored label
from weights.shared.generation import position_ids_from_mask  # the rule of the twins' generate()

__all__ = ["Batch", "HEADS", "MAX_BATCH", "MAX_SEQ_LEN", "PADDINGS", "check_run_size", "head_labels",
           "position_ids_from_mask", "run_bytes", "seeded_batch", "sequence_labels", "span_positions"]

PADDINGS = ("left", "right", "none")


@dataclass(frozen=True)
class Batch:
    """One batch of inputs as numpy arrays (framework-neutral); padding slots carry the pad id."""

    input_ids: np.ndarray  # [B, T] int64
    attention_mask: np.ndarray  # [B, T] int64, 1 = real token
    position_ids: np.ndarray | None  # [B, T] int64, or None for the default arange
    labels: np.ndarray  # [B, T] int64 causal-LM labels (-100 where padded)
    class_labels: np.ndarray | None = None  # sequence classification: [B] int, or float [B] / [B, C]
    start_positions: np.ndarray | None = None  # question answering: [B] int64
    end_positions: np.ndarray | None = None  # question answering: [B] int64
    padding: tuple[str, ...] = ()  # per row: "left", "right" or "none" (empty when unknown)

    def head_labels(self, head: str) -> dict[str, np.ndarray]:
        """The loss keyword arguments of `head`'s forward (`labels=`, or the two span positions)."""
        if head == "causal_lm":
            return {"labels": self.labels}
        if head == "sequence_classification":
            if self.class_labels is None:
                raise ValueError("this batch has no sequence-classification labels")
            return {"labels": self.class_labels}
        if head == "question_answering":
            if self.start_positions is None or self.end_positions is None:
                raise ValueError("this batch has no question-answering span positions")
            return {"start_positions": self.start_positions, "end_positions": self.end_positions}
        raise KeyError(f"unknown head {head!r}; one of {tuple(HEADS)}")

    def rows(self, rows: slice | list[int]) -> "Batch":
        """The same batch restricted to some rows."""
        take = lambda a: None if a is None else a[rows]
        pad = tuple(np.asarray(self.padding, dtype=object)[rows]) if self.padding else ()
        return Batch(self.input_ids[rows], self.attention_mask[rows], take(self.position_ids),
                     self.labels[rows], take(self.class_labels), take(self.start_positions),
                     take(self.end_positions), pad)


def problem_type(config: ModelConfig) -> str:
    """The sequence-classification loss HF infers for integer labels (ours when unset)."""
    if config.problem_type is not None:
        return config.problem_type
    return "regression" if config.num_labels == 1 else "single_label_classification"


def sequence_labels(config: ModelConfig, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Sequence-classification labels of the kind the config's problem type reads: class ids
    `[B]`, regression targets `[B]` / `[B, C]`, or multi-label 0/1 targets `[B, C]`."""
    kind = problem_type(config)
    if kind == "single_label_classification":
        return rng.integers(0, config.num_labels, size=batch_size).astype(np.int64)
    if kind == "regression":
        shape = (batch_size,) if config.num_labels == 1 else (batch_size, config.num_labels)
        return rng.standard_normal(shape)
    return rng.integers(0, 2, size=(batch_size, config.num_labels)).astype(np.float64)


def span_positions(attention_mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Question-answering answer spans `(start [B], end [B])` inside each row's real tokens."""
    starts, ends = [], []
    for row in attention_mask:
        real = np.flatnonzero(row)
        real = real if real.size else np.arange(row.shape[0])
        a, b = sorted(rng.choice(real, size=2))
        starts.append(a)
        ends.append(b)
    return np.asarray(starts, np.int64), np.asarray(ends, np.int64)


def head_labels(config: ModelConfig, attention_mask: np.ndarray, input_ids: np.ndarray,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Labels for every head at once, as `Batch` keyword arguments."""
    start, end = span_positions(attention_mask, rng)
    return {"labels": np.where(attention_mask == 1, input_ids, IGNORE_INDEX).astype(np.int64),
            "class_labels": sequence_labels(config, input_ids.shape[0], rng),
            "start_positions": start, "end_positions": end}


def seeded_batch(config: ModelConfig, batch_size: int = 3, seq_len: int = 16, seed: int = 0,
                 paddings: tuple[str, ...] | None = None) -> Batch:
    """The deterministic batch of `twinlm check`: rows padded left, right, none, left, ...

    Padding covers a quarter of a row (at least one slot, always leaving a real token); real
    tokens never equal the pad id, so a classifier finds each row's last real token. Position
    ids follow the mask as in HF `generate`. Without a `pad_token_id` padding slots hold token 0
    (the mask alone hides them).
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch {batch_size} x seq_len {seq_len}: both must be >= 1")
    paddings = paddings or tuple(PADDINGS[i % len(PADDINGS)] for i in range(batch_size))
    if len(paddings) != batch_size or any(p not in PADDINGS for p in paddings):
        raise ValueError(f"paddings must be {batch_size} of {PADDINGS}, got {paddings}")
    if seq_len < 2 and any(p != "none" for p in paddings):
        raise ValueError("a padded row needs seq_len >= 2 (one pad slot and one real token)")
    rng = np.random.default_rng(seed)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    # Uniform over the vocabulary without the pad id: the same draws as `rng.choice` over the
    # list of real ids, without building that list (a 16 M-token vocabulary would take seconds).
    pad = config.pad_token_id
    n_real = config.vocab_size - (pad is not None)
    if n_real > 0:
        ids = rng.integers(0, n_real, size=(batch_size, seq_len)).astype(np.int64)
        ids = ids + (ids >= pad) if pad is not None else ids
    else:
        ids = rng.integers(0, 1, size=(batch_size, seq_len)).astype(np.int64)
    mask = np.ones((batch_size, seq_len), np.int64)
    for row, side in enumerate(paddings):
        n_pad = min(seq_len - 1, max(1, seq_len // 4 + row % 2))
        if side == "left":
            mask[row, :n_pad] = 0
        elif side == "right":
            mask[row, seq_len - n_pad:] = 0
    ids = np.where(mask == 1, ids, pad_id)
    return Batch(ids, mask, position_ids_from_mask(mask), padding=tuple(paddings),
                 **head_labels(config, mask, ids, rng))


# Bounds of one check's inputs, before any memory estimate: beyond them a run is a typo.
MAX_BATCH = 1 << 12
MAX_SEQ_LEN = 1 << 20


def run_bytes(config: ModelConfig, batch_size: int, seq_len: int, dtype: str, *, twins: int = 2) -> int:
    """A lower estimate of the memory one check of `batch_size x seq_len` needs beyond the weights:
    what each twin keeps for its outputs and its backward pass (every layer's attention map
    `[B, H, T, T]`, hidden state `[B, T, E]` and MLP activations `[B, T, I]`, the logits
    `[B, T, V]`), in `dtype`, plus the float64 copies the comparison makes of the largest one."""
    b, t = batch_size, seq_len
    per_layer = b * config.num_attention_heads * t * t + 2 * b * t * config.hidden_size \
        + 3 * b * t * config.intermediate_size
    per_twin = config.num_hidden_layers * per_layer + b * t * config.vocab_size
    largest = max(b * config.num_attention_heads * t * t, b * t * config.vocab_size)
    from weights.dtypes import FLOAT_DTYPES

    itemsize = FLOAT_DTYPES[dtype].itemsize if dtype in FLOAT_DTYPES else 8
    return twins * per_twin * itemsize + 2 * 8 * largest


def check_run_size(config: ModelConfig, batch_size: int, seq_len: int, dtype: str, *, twins: int = 2,
                   new_tokens: int = 0) -> None:
    """Refuse a batch shape the model cannot take or the machine cannot hold, before anything
    runs: `ValueError` naming the argument. `seq_len + new_tokens` positions must fit
    `max_position_embeddings` (dynamic NTK rope excepted: it is built to run past it)."""
    from weights.shapes import memory_limit

    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"--batch must be between 1 and {MAX_BATCH}, got {batch_size}")
    if not 1 <= seq_len <= MAX_SEQ_LEN:
        raise ValueError(f"--seq-len must be between 1 and {MAX_SEQ_LEN}, got {seq_len}")
    positions = seq_len + new_tokens
    if positions > config.max_position_embeddings and config.rope.rope_type != "dynamic":
        raise ValueError(f"--seq-len {seq_len}" + (f" + {new_tokens} generated tokens" if new_tokens else "")
                         + f" exceeds the model's max_position_embeddings ({config.max_position_embeddings})")
    need, limit = run_bytes(config, batch_size, seq_len, dtype, twins=twins), memory_limit()
    if limit is not None and need > limit:
        raise ValueError(f"--batch {batch_size} x --seq-len {seq_len} needs at least {need / 1e9:.3g} GB of "
                         f"activations in {dtype}, more than this process can hold ({limit / 1e9:.3g} GB)")
