"""What both twins' `generate` share, in numpy: argument checks, the options, and the noise.

Like `rope.py`, this is framework-neutral math that must be identical in the two twins, so it
lives once, here:

- prompts are left-padded, and position ids come from the attention mask
  (`position_ids_from_mask`: `cumsum - 1`, clipped at 0);
- a row that emits an eos token is finished and gets `pad_token_id` from then on; the loop stops
  when every row is finished or after `max_new_tokens`;
- all randomness of sampling is drawn here: `sampling_noise(seed)` gives one uniform `u` per
  (step, row) with numpy, and each twin takes the first token, in vocabulary order, at which the
  cumulative filtered probability exceeds `u` times its total (inverse CDF). The same seed
  therefore gives the same tokens in both twins, whatever their own random generators do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

__all__ = ["FILTER_ORDERS", "GenerationInputs", "GenerationOptions", "TOP_CANDIDATES", "bucket_length",
           "position_ids_from_mask", "prepare_generation", "sampling_noise"]

TOP_CANDIDATES = 8  # candidates reported per step with `return_scores`
MIN_BUCKET = 16  # shortest prompt bucket of the Flax twin's compiled loop
# The order of the sampling filters. "generate": temperature, top-k, top-p, then the allowed
# mask (a row the mask would empty keeps its best allowed token). "grok": temperature, the mask,
# then top-k and top-p over the allowed tokens only (Grok-1's `sample_token`: temperature, mask,
# nucleus).
FILTER_ORDERS = ("generate", "grok")


@dataclass(frozen=True)
class GenerationOptions:
    """The static (shape- or branch-deciding) settings of one `generate` call; hashable, so the
    Flax twin compiles once per distinct value. Numeric knobs (temperature, top-k, top-p,
    length penalty) are passed separately as values and never cause a recompilation."""

    max_new_tokens: int
    do_sample: bool
    use_top_k: bool
    use_top_p: bool
    has_allowed: bool
    num_beams: int
    early_stopping: bool | str
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    return_scores: bool
    num_return_sequences: int = 1
    allowed_first: bool = False  # filter order "grok": the allowed mask before top-k / top-p

    @property
    def beams_to_keep(self) -> int:
        """Candidates kept per step in beam search: HF's `max(2, 1 + n_eos) * num_beams`."""
        return max(2, 1 + len(self.eos_token_ids)) * self.num_beams


def sampling_noise(seed: int, steps: int, batch_size: int) -> np.ndarray:
    """Uniform numbers in [0, 1), `[steps, B]` float64, from numpy's PCG64 seeded with `seed`.

    Row b's token at step i is drawn with `noise[i, b]` by inverse CDF; this array is the only
    randomness of sampling, and both twins receive the same one.
    """
    return np.random.default_rng(seed).random((steps, batch_size))


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Position ids of padded rows: real tokens count 0, 1, 2, ... from the first real token
    (`cumsum(mask) - 1`, clipped at 0): left padding gets 0, right padding repeats the last
    position (any value works there, padded slots are masked). The one rule of the twins'
    `generate()` and of the parity inputs."""
    return np.clip(np.cumsum(attention_mask, axis=-1) - 1, 0, None).astype(np.int64)


def bucket_length(length: int) -> int:
    """The prompt length the Flax twin compiles for: the next power of two, at least 16."""
    return max(MIN_BUCKET, 1 << (int(length) - 1).bit_length())


def _eos_tuple(eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(e) for e in eos_token_id)


class GenerationInputs(NamedTuple):
    """Everything `generate` resolved from its arguments, per output row (R = B x
    `num_return_sequences`; rows of one prompt are adjacent, as HF's `repeat_interleave`)."""

    options: GenerationOptions
    input_ids: np.ndarray  # [R, P] int64
    attention_mask: np.ndarray  # [R, P] int64
    allowed: np.ndarray | None  # [R, V] bool
    temperature: np.ndarray  # [R] float64
    top_k: np.ndarray  # [R] int64, V where a row has no top-k
    top_p: np.ndarray  # [R] float64, 1.0 where a row has no top-p


def _per_row(name: str, value, b: int) -> list:
    """A scalar (or None) for every row, or one value per row."""
    if value is None or np.ndim(value) == 0:
        return [value] * b
    values = list(np.asarray(value, dtype=object).reshape(-1))
    if len(values) != b:
        raise ValueError(f"{name}: expected one value or {b} (one per prompt row), got {len(values)}")
    return values


def _row_knobs(b: int, vocab_size: int, do_sample: bool, temperature, top_k, top_p
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row (temperature, top-k, top-p), each checked; no top-k is V, no top-p is 1."""
    temps, ks, ps = _per_row("temperature", temperature, b), _per_row("top_k", top_k, b), _per_row("top_p", top_p, b)
    for t in temps:
        if t is None or (do_sample and not float(t) > 0):
            raise ValueError(f"temperature: must be > 0 when sampling, got {t!r}")
    for k in ks:
        if k is not None and (not isinstance(k, (int, np.integer)) or k < 1):
            raise ValueError(f"top_k: must be None or an integer >= 1, got {k!r}")
    for q in ps:
        if q is not None and not 0.0 < q <= 1.0:
            raise ValueError(f"top_p: must be None or in (0, 1], got {q!r}")
    return (np.array([float(t) for t in temps]), np.array([vocab_size if k is None else min(int(k), vocab_size) for k in ks]),
            np.array([1.0 if q is None else float(q) for q in ps]))


def prepare_generation(input_ids: np.ndarray | None, attention_mask: np.ndarray | None, config, *,
                       max_new_tokens: int, do_sample: bool, temperature, top_k, top_p,
                       allowed_tokens: np.ndarray | None, num_beams: int, early_stopping: bool | str,
                       eos_token_id: int | Sequence[int] | None, pad_token_id: int | None, return_scores: bool,
                       num_return_sequences: int = 1, bos_token_id: int | None = None,
                       use_config_eos: bool = False, filter_order: str = "generate") -> GenerationInputs:
    """Check every argument of `generate` against `config` (a `ModelConfig`) and resolve defaults.

    `input_ids` None starts one row from `bos_token_id` (default: the config's), as HF does.
    `eos_token_id` None means no row ever finishes, unless `use_config_eos` takes the config's.
    `temperature`, `top_k` and `top_p` are one value or one per prompt row. Raises `ValueError`
    naming the argument for anything the decode loop could not honour.
    """
    vocab_size = config.vocab_size
    if input_ids is None:
        bos = bos_token_id if bos_token_id is not None else config.bos_token_id
        if isinstance(bos, (tuple, list)):
            bos = bos[0]
        if bos is None:
            raise ValueError("input_ids: None needs a bos_token_id (none given and the config has none)")
        if not 0 <= int(bos) < vocab_size:
            raise ValueError(f"bos_token_id: {bos} is outside the vocabulary [0, {vocab_size})")
        input_ids, attention_mask = np.full((1, 1), int(bos), np.int64), None
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected a non-empty [batch, prompt] array, got shape {list(input_ids.shape)}")
    b, _ = input_ids.shape
    if attention_mask is None:
        attention_mask = np.ones(input_ids.shape, np.int64)
    attention_mask = np.asarray(attention_mask).astype(np.int64)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {list(input_ids.shape)} (as input_ids), "
                         f"got {list(attention_mask.shape)}")
    if not np.isin(attention_mask, (0, 1)).all():
        raise ValueError("attention_mask: values must be 0 (padding) or 1 (token)")
    if (attention_mask.sum(-1) == 0).any():
        raise ValueError(f"attention_mask: row {int(np.argmax(attention_mask.sum(-1) == 0))} has no tokens")
    if (np.diff(attention_mask, axis=-1) < 0).any():
        row = int(np.argmax((np.diff(attention_mask, axis=-1) < 0).any(-1)))
        raise ValueError(f"attention_mask: row {row} has padding after a token; generate needs "
                         "left-padded prompts (padding first, then the tokens)")
    if input_ids.min() < 0 or input_ids.max() >= vocab_size:
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)][0]
        raise ValueError(f"input_ids: token id {int(bad)} is outside the vocabulary [0, {vocab_size})")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
        raise ValueError(f"num_beams: must be an integer >= 1, got {num_beams!r}")
    if do_sample and num_beams > 1:
        raise ValueError("do_sample with num_beams > 1 (beam sampling) is not implemented; "
                         "use do_sample=False for beam search")
    nrs = num_return_sequences
    if not isinstance(nrs, (int, np.integer)) or nrs < 1:
        raise ValueError(f"num_return_sequences: must be an integer >= 1, got {nrs!r}")
    if nrs > 1 and not do_sample and num_beams == 1:
        raise ValueError("num_return_sequences > 1 with greedy decoding would repeat one sequence; "
                         "sample (do_sample=True) or use beam search (num_beams >= num_return_sequences)")
    if num_beams > 1 and nrs > num_beams:
        raise ValueError(f"num_return_sequences: {nrs} is more than num_beams ({num_beams})")
    temps, ks, ps = _row_knobs(b, vocab_size, do_sample, temperature, top_k, top_p)
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping: must be True, False or 'never', got {early_stopping!r}")
    if filter_order not in FILTER_ORDERS:
        raise ValueError(f"filter_order: must be one of {', '.join(FILTER_ORDERS)}, got {filter_order!r}")
    if eos_token_id is None and use_config_eos:
        eos_token_id = config.eos_token_id
    eos = _eos_tuple(eos_token_id)
    for e in eos:
        if not 0 <= e < vocab_size:
            raise ValueError(f"eos_token_id: {e} is outside the vocabulary [0, {vocab_size})")
    # HF's rule: without a pad token, finished rows are filled with the (first) eos token.
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if not 0 <= pad < vocab_size:
        raise ValueError(f"pad_token_id: {pad} is outside the vocabulary [0, {vocab_size})")
    allowed = None
    if allowed_tokens is not None:
        allowed = np.asarray(allowed_tokens).astype(bool)
        allowed = np.broadcast_to(allowed, (b, vocab_size)).copy() if allowed.shape in ((vocab_size,), (1, vocab_size)) else allowed
        if allowed.shape != (b, vocab_size):
            raise ValueError(f"allowed_tokens: expected shape [{b}, {vocab_size}] or [{vocab_size}], "
                             f"got {list(allowed.shape)}")
        if not allowed.any(-1).all():
            raise ValueError(f"allowed_tokens: row {int(np.argmin(allowed.any(-1)))} allows no token")
    if num_beams > 1 and num_beams * vocab_size < max(2, 1 + len(eos)) * num_beams:
        raise ValueError(f"num_beams: {num_beams} beams need a vocabulary of at least "
                         f"{max(2, 1 + len(eos))} tokens, the model has {vocab_size}")
    options = GenerationOptions(
        max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample),
        use_top_k=bool(do_sample and (ks < vocab_size).any()), use_top_p=bool(do_sample and (ps < 1.0).any()),
        has_allowed=allowed is not None, num_beams=int(num_beams), early_stopping=early_stopping,
        eos_token_ids=eos, pad_token_id=int(pad), return_scores=bool(return_scores), num_return_sequences=int(nrs),
        allowed_first=allowed is not None and filter_order == "grok")
    # Sampled rows are repeated here, one per returned sequence; beam search returns its best
    # `num_return_sequences` hypotheses per prompt instead.
    rep = nrs if num_beams == 1 else 1
    expand = lambda a: None if a is None else np.repeat(a, rep, axis=0)  # noqa: E731
    return GenerationInputs(options, expand(input_ids.astype(np.int64)), expand(attention_mask), expand(allowed),
                            expand(temps), expand(ks), expand(ps))
