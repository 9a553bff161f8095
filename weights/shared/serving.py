"""What both twins' serving `Runner` share, in numpy: requests, their checks, the slot
bookkeeping of continuous batching, and the per-slot sampling settings.

A `Runner` (`torch_impl/serving.py`, `flax_impl/serving.py`) owns a KV cache of `num_slots`
rows, each with its own write position. `Scheduler` decides which request sits in which slot:
`submit` queues a request, `admit` moves waiting requests into free slots (the twin then
prefills all of them in one forward pass, each into its own row), `record` appends a token to a
request and frees its slot when the request is done. It also keeps the per-slot sampling settings as arrays `[S]` / `[S, V]`,
the values the twin's one decode step reads; a freed slot gets the neutral settings back, so
nothing of a finished request reaches the next one.

Randomness is per request, never per slot: a request's token at its own step i is drawn with
`request_noise(seed, max_new_tokens)[i]`, the same number `generate()` uses for that request
alone (`sampling_noise(seed, N, 1)[i, 0]`). Its tokens therefore do not depend on its slot, on
when it was admitted, or on what else is running.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from .generation import FILTER_ORDERS, sampling_noise

__all__ = ["DEFAULT_BUCKETS", "FILTER_ORDERS", "Request", "RunnerStats", "Scheduler", "ServingLoop", "SlotSettings",
           "StepOutput", "TokenEvent", "TopTokens", "check_request", "check_runner_config", "choose_bucket",
           "prefill_inputs", "request_noise", "resolve_key_buckets", "resolve_row_buckets"]

DEFAULT_BUCKETS = (16, 32, 64, 128)


@dataclass(frozen=True)
class Request:
    """One generation request (Grok-1's `Request`, with `generate()`'s sampling knobs).

    `prompt` is token ids, or text when the runner has a tokenizer. Greedy unless `do_sample`;
    sampling applies `temperature`, `top_k`, `top_p` and the `allowed_tokens` mask (`[V]` bool)
    in `filter_order`: "generate" (temperature, top-k, top-p, then the mask: `generate()`'s order)
    or "grok" (temperature, the mask, then top-k and top-p over the allowed tokens: Grok-1's
    `sample_token`). The request ends after `max_new_tokens` tokens or at the first token in
    `stop_tokens` (emitted). `seed` keys its sampling noise.
    """

    prompt: Sequence[int] | str
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    allowed_tokens: np.ndarray | Sequence[bool] | None = None
    stop_tokens: Sequence[int] = ()
    seed: int = 0
    filter_order: str = "generate"


class TopTokens(NamedTuple):
    """The 8 most likely tokens of one step, best first, under two distributions: the model's
    own (softmax of the raw logits, as `generate(return_scores=True)` reports) and the filtered
    one the token was drawn from (after temperature, top-k, top-p and the mask, renormalised;
    for a greedy request: the model's distribution restricted to the allowed tokens). Grok-1
    reports the filtered one."""

    ids: np.ndarray  # [8] int
    probs: np.ndarray  # [8]
    filtered_ids: np.ndarray  # [8] int
    filtered_probs: np.ndarray  # [8]


class TokenEvent(NamedTuple):
    """One streamed token: `(request id, token, its log-prob under the model's distribution, top-8)`."""

    request_id: int
    token: int
    logprob: float
    top8: TopTokens


def request_noise(seed: int, steps: int) -> np.ndarray:
    """The uniform numbers `[steps]` of one request: `generate()`'s noise for that request alone."""
    return sampling_noise(seed, steps, 1)[:, 0]


def check_runner_config(config, max_len: int) -> None:
    """Refuse a model the runner cannot serve with per-request identity.

    Dynamic NTK rope recomputes its frequencies from the largest position in the batch once that
    passes `max_position_embeddings` (HF's convention, which `generate()` keeps): a request's
    tokens would then depend on the other slots. Below that length the scaling is off, so a
    runner whose `max_len` stays within it is exact."""
    if not isinstance(max_len, (int, np.integer)) or max_len < 2:
        raise ValueError(f"max_len: must be an integer >= 2, got {max_len!r}")
    if config.rope.rope_type == "dynamic" and max_len > config.max_position_embeddings:
        raise ValueError(f"max_len: {max_len} is past max_position_embeddings ({config.max_position_embeddings}) "
                         "of a dynamic-NTK rope model, where a slot's rotary frequencies would depend on the "
                         "other slots; use max_len <= max_position_embeddings")


def choose_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest of `buckets` holding `length`: a prompt's tokens, a key length or a row count
    (only a prompt can outgrow its buckets: key and row buckets end at `max_len` and `num_slots`)."""
    for b in sorted(buckets):
        if length <= b:
            return b
    raise ValueError(f"prompt: {length} tokens is longer than the largest pad bucket ({max(buckets)}); "
                     "pass longer pad_buckets to the Runner")


def resolve_key_buckets(pad_buckets: Sequence[int], max_len: int, given: Sequence[int] | None = None) -> tuple[int, ...]:
    """The key lengths a decode step may attend over, ending at `max_len`.

    A decode step needs only the filled part of the cache: it attends over the smallest key
    bucket that holds every active row's next position, so its cost follows the longest running
    request, not `max_len` (the Flax runner compiles one decode program per key bucket). The
    default doubles from the smallest pad bucket: at most twice the keys needed, with few
    programs."""
    if given is not None:
        if not given or any(not isinstance(k, (int, np.integer)) or not 1 <= k <= max_len for k in given):
            raise ValueError(f"key_buckets: must be integers in [1, max_len={max_len}], got {tuple(given)!r}")
        return tuple(sorted(set(int(k) for k in given) | {max_len}))
    out, k = [], min(pad_buckets)
    while k < max_len:
        out.append(k)
        k *= 2
    return tuple(out) + (max_len,)


def resolve_row_buckets(num_slots: int, given: Sequence[int] | None = None) -> tuple[int, ...]:
    """Row counts, ending at `num_slots`, that a batched prefill is padded to and that a decode
    step runs (the first slots, holding every active one): a step's cost grows with its rows, so
    a runner with few busy slots decodes only those. The Flax runner compiles one prefill program
    per row count and pad bucket and one decode program per row count and key bucket. The
    default, powers of two, pads at most twice the rows needed; fewer row counts compile fewer
    programs, at the price of more padding rows."""
    if given is not None:
        if any(not isinstance(r, (int, np.integer)) or not 1 <= r <= num_slots for r in given):
            raise ValueError(f"row_buckets: must be integers in [1, num_slots={num_slots}], got {tuple(given)!r}")
        return tuple(sorted(set(int(r) for r in given) | {num_slots}))
    return tuple(sorted({1 << i for i in range(num_slots.bit_length()) if 1 << i < num_slots} | {num_slots}))


def prefill_inputs(prompts: Sequence[np.ndarray], bucket: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The prompts right-padded to `bucket`: ids `[R, L]`, position ids `[R, L]`, and each row's
    last real position `[R]` (where its first token is read).

    Right padding keeps each row's prompt at cache indices 0 ... P-1, where a solo run puts it;
    the padded positions lie at or after P, where no real query looks (the mask is causal by
    cache index), and later decode steps overwrite them before attending from them."""
    ids = np.zeros((len(prompts), bucket), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, :prompt.size] = prompt
    last = np.array([p.size - 1 for p in prompts], np.int64)
    # Padded positions repeat the last real one: dynamic NTK rope reads max(position) + 1.
    positions = np.minimum(np.arange(bucket)[None], last[:, None])
    return ids, positions, last


@dataclass
class SlotSettings:
    """Per-slot sampling settings, numpy arrays over the S slots (the decode step's inputs).

    A slot without a request, and every greedy request, holds the neutral values: temperature 1,
    top-k = V (keeps all), top-p = 1 (keeps all), every token allowed; then the filtered
    distribution of a greedy row is the model's own restricted to its allowed tokens."""

    temperature: np.ndarray  # [S] compute dtype
    top_k: np.ndarray  # [S] int32
    top_p: np.ndarray  # [S] compute dtype
    allowed: np.ndarray  # [S, V] bool
    allowed_first: np.ndarray  # [S] bool: the "grok" filter order
    do_sample: np.ndarray  # [S] bool

    @classmethod
    def neutral(cls, num_slots: int, vocab_size: int, dtype: np.dtype) -> "SlotSettings":
        return cls(np.ones(num_slots, dtype), np.full(num_slots, vocab_size, np.int32), np.ones(num_slots, dtype),
                   np.ones((num_slots, vocab_size), bool), np.zeros(num_slots, bool), np.zeros(num_slots, bool))

    def rows(self, slots: np.ndarray) -> "SlotSettings":
        """The settings of `slots` (`[R]` int), as arrays of R rows."""
        return SlotSettings(*(getattr(self, f)[slots] for f in self.__dataclass_fields__))


@dataclass
class Active:
    """A request in a slot: its id, checked settings, noise, and the tokens emitted so far."""

    request_id: int
    prompt: np.ndarray  # [P] int64
    request: Request
    noise: np.ndarray  # [max_new_tokens] compute dtype
    stop: frozenset[int]
    tokens: list[int] = field(default_factory=list)

    @property
    def step(self) -> int:
        """This request's own step index: how many tokens it has emitted."""
        return len(self.tokens)

    @property
    def length(self) -> int:
        """Its cache row's write position: the prompt and every emitted token but the last, which
        the next decode step writes."""
        return self.prompt.size + self.step - 1


def check_request(request: Request, prompt: np.ndarray, vocab_size: int, max_len: int,
                  buckets: Sequence[int]) -> None:
    """Raise `ValueError` naming the field for anything the runner could not honour."""
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError(f"prompt: expected a non-empty list of token ids, got shape {list(prompt.shape)}")
    if prompt.min() < 0 or prompt.max() >= vocab_size:
        bad = prompt[(prompt < 0) | (prompt >= vocab_size)][0]
        raise ValueError(f"prompt: token id {int(bad)} is outside the vocabulary [0, {vocab_size})")
    n = request.max_new_tokens
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"max_new_tokens: must be an integer >= 1, got {n!r}")
    if prompt.size + n > max_len:
        raise ValueError(f"max_new_tokens: prompt ({prompt.size}) + max_new_tokens ({n}) exceeds the runner's "
                         f"max_len ({max_len})")
    choose_bucket(prompt.size, buckets)
    if request.do_sample and not request.temperature > 0:
        raise ValueError(f"temperature: must be > 0 when sampling, got {request.temperature!r}")
    if request.top_k is not None and (not isinstance(request.top_k, (int, np.integer)) or request.top_k < 1):
        raise ValueError(f"top_k: must be None or an integer >= 1, got {request.top_k!r}")
    if request.top_p is not None and not 0.0 < request.top_p <= 1.0:
        raise ValueError(f"top_p: must be None or in (0, 1], got {request.top_p!r}")
    if request.filter_order not in FILTER_ORDERS:
        raise ValueError(f"filter_order: must be one of {', '.join(FILTER_ORDERS)}, got {request.filter_order!r}")
    if not isinstance(request.seed, (int, np.integer)) or request.seed < 0:
        raise ValueError(f"seed: must be an integer >= 0, got {request.seed!r}")
    for s in request.stop_tokens:
        if not 0 <= int(s) < vocab_size:
            raise ValueError(f"stop_tokens: {s} is outside the vocabulary [0, {vocab_size})")
    if request.allowed_tokens is not None:
        allowed = np.asarray(request.allowed_tokens)
        if allowed.shape != (vocab_size,):
            raise ValueError(f"allowed_tokens: expected a [{vocab_size}] bool mask, got shape {list(allowed.shape)}")
        if not allowed.astype(bool).any():
            raise ValueError("allowed_tokens: the mask allows no token")


class Scheduler:
    """Continuous batching bookkeeping: a FIFO of waiting requests, `num_slots` slots, and the
    per-slot settings. Framework-free; each twin's `Runner` drives it."""

    def __init__(self, num_slots: int, max_len: int, buckets: Sequence[int], vocab_size: int, dtype: np.dtype):
        if not isinstance(num_slots, (int, np.integer)) or num_slots < 1:
            raise ValueError(f"num_slots: must be an integer >= 1, got {num_slots!r}")
        if not buckets:
            raise ValueError("pad_buckets: give at least one prompt length")
        if any(not isinstance(b, (int, np.integer)) or b < 1 for b in buckets):
            raise ValueError(f"pad_buckets: must be positive integers, got {tuple(buckets)!r}")
        if max(buckets) > max_len:
            raise ValueError(f"pad_buckets: {max(buckets)} is longer than max_len ({max_len}); a prompt is "
                             "written into the cache at its bucket's length")
        self.num_slots, self.max_len, self.vocab_size, self.dtype = int(num_slots), int(max_len), vocab_size, dtype
        self.buckets = tuple(sorted(int(b) for b in dict.fromkeys(buckets)))
        self.waiting: collections.deque[Active] = collections.deque()
        self.slots: list[Active | None] = [None] * self.num_slots
        self.settings = SlotSettings.neutral(self.num_slots, vocab_size, dtype)
        self.done: dict[int, list[int]] = {}
        self._next_id = 0

    def submit(self, request: Request, prompt: Sequence[int] | np.ndarray) -> int:
        """Check and queue a request (prompt already as token ids); returns its id."""
        ids = np.asarray(prompt, dtype=np.int64).reshape(-1) if len(prompt) else np.zeros(0, np.int64)
        check_request(request, ids, self.vocab_size, self.max_len, self.buckets)
        request_id = self._next_id
        self._next_id += 1
        noise = request_noise(request.seed, request.max_new_tokens).astype(self.dtype)
        self.waiting.append(Active(request_id, ids, request, noise, frozenset(int(s) for s in request.stop_tokens)))
        return request_id

    @property
    def active(self) -> np.ndarray:
        """`[S]` bool: the slots holding a request."""
        return np.array([a is not None for a in self.slots])

    def idle(self) -> bool:
        """Nothing waiting and nothing running."""
        return not self.waiting and not any(a is not None for a in self.slots)

    def admit(self) -> list[tuple[int, Active]]:
        """Move waiting requests, oldest first, into free slots (lowest first); set their settings."""
        admitted = []
        for slot in range(self.num_slots):
            if not self.waiting:
                break
            if self.slots[slot] is None:
                entry = self.waiting.popleft()
                self.slots[slot] = entry
                self._set(slot, entry.request)
                admitted.append((slot, entry))
        return admitted

    def lengths(self) -> np.ndarray:
        """`[S]` int64: each active slot's write position; 0 for a free slot, so its (ignored)
        decode write stays inside any key bucket (its row is replaced whole at its next prefill)."""
        return np.array([0 if a is None else a.length for a in self.slots], np.int64)

    def noise(self) -> np.ndarray:
        """`[S]`: each active request's uniform number for its own current step (0 for free slots)."""
        u = np.zeros(self.num_slots, self.dtype)
        for slot, a in enumerate(self.slots):
            if a is not None and a.step < a.noise.size:
                u[slot] = a.noise[a.step]
        return u

    def record(self, slot: int, token: int) -> bool:
        """Append `token` to the request in `slot`; if that ends it, free the slot. Returns
        whether the request ended."""
        a = self.slots[slot]
        a.tokens.append(int(token))
        if int(token) in a.stop or a.step >= a.request.max_new_tokens:
            self.done[a.request_id] = a.tokens
            self.slots[slot] = None
            self._set(slot, None)
            return True
        return False

    def _set(self, slot: int, request: Request | None) -> None:
        s, v = self.settings, self.vocab_size
        sampling = request is not None and request.do_sample
        s.temperature[slot] = request.temperature if sampling else 1.0
        s.top_k[slot] = min(request.top_k, v) if sampling and request.top_k is not None else v
        s.top_p[slot] = request.top_p if sampling and request.top_p is not None else 1.0
        allowed = None if request is None else request.allowed_tokens
        s.allowed[slot] = True if allowed is None else np.asarray(allowed, bool)
        s.allowed_first[slot] = request is not None and request.filter_order == "grok"
        s.do_sample[slot] = sampling


class StepOutput(NamedTuple):
    """What one prefill or decode program returns for its R rows, as numpy."""

    tokens: np.ndarray  # [R] int
    logprobs: np.ndarray  # [R] log-prob of the token under the model's distribution
    top_ids: np.ndarray  # [R, 8]
    top_probs: np.ndarray  # [R, 8]
    filtered_ids: np.ndarray  # [R, 8]
    filtered_probs: np.ndarray  # [R, 8]

    def event(self, request_id: int, row: int) -> TokenEvent:
        top = TopTokens(self.top_ids[row].astype(np.int64), self.top_probs[row],
                        self.filtered_ids[row].astype(np.int64), self.filtered_probs[row])
        return TokenEvent(request_id, int(self.tokens[row]), float(self.logprobs[row]), top)


@dataclass
class RunnerStats:
    """Where a runner's time went since it was built (or since `stats.reset()`): the prefill and
    decode calls, each timed from its inputs to its outputs as numpy (so the Flax programs are
    waited for). `decode_tokens / decode_seconds` and `prefill_tokens / prefill_seconds` are the
    decode and prefill rates a serving dashboard shows; `bench serve` reads them to split a
    pass's time."""

    prefills: int = 0  # prefill calls (each admits every request that found a free slot)
    prefill_requests: int = 0  # requests admitted
    prefill_tokens: int = 0  # their prompt tokens, without the bucket padding
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_rows: int = 0  # rows run (the row bucket), active or not
    decode_tokens: int = 0  # tokens emitted by decode steps (active rows)
    decode_seconds: float = 0.0

    def count_prefill(self, seconds: float, prompt_sizes: Sequence[int]) -> None:
        """Add one prefill call of `len(prompt_sizes)` requests."""
        self.prefills += 1
        self.prefill_requests += len(prompt_sizes)
        self.prefill_tokens += sum(prompt_sizes)
        self.prefill_seconds += seconds

    def count_decode(self, seconds: float, rows: int, active: int) -> None:
        """Add one decode step of `rows` rows, `active` of them holding a request."""
        self.decode_steps += 1
        self.decode_rows += rows
        self.decode_tokens += active
        self.decode_seconds += seconds

    def reset(self) -> None:
        """Zero every count."""
        for name in self.__dataclass_fields__:
            setattr(self, name, type(getattr(self, name))())


class ServingLoop:
    """The framework-free half of a twin's `Runner`: submit, the step loop, and `run`.

    A subclass provides `prefill(slots, ids, positions, last, settings, u)` (the requests admitted
    in one step, in one forward pass, each into its slot; their first tokens) and
    `decode(tokens, lengths, active, key_length, settings, u)` (one token for each of the first R
    slots, R = `len(tokens)`, attending over the first `key_length` cache positions), both
    returning a `StepOutput`; the model work and the KV cache are the subclass's.
    """

    def __init__(self, num_slots: int, max_len: int, pad_buckets: Sequence[int], vocab_size: int, dtype: np.dtype,
                 tokenizer=None, key_buckets: Sequence[int] | None = None, row_buckets: Sequence[int] | None = None):
        self.scheduler = Scheduler(num_slots, max_len, pad_buckets, vocab_size, dtype)
        self.stats = RunnerStats()
        self.tokenizer = tokenizer
        self.key_buckets = resolve_key_buckets(self.scheduler.buckets, self.scheduler.max_len, key_buckets)
        self.row_buckets = resolve_row_buckets(self.scheduler.num_slots, row_buckets)

    @property
    def num_slots(self) -> int:
        return self.scheduler.num_slots

    @property
    def max_len(self) -> int:
        return self.scheduler.max_len

    @property
    def pad_buckets(self) -> tuple[int, ...]:
        return self.scheduler.buckets

    def submit(self, request: Request) -> int:
        """Queue `request` (its prompt as token ids, or text with a tokenizer); returns its id."""
        prompt = request.prompt
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text needs a tokenizer (pass tokenizer= to the Runner, or token ids)")
            prompt = self.tokenizer.encode(prompt)
        return self.scheduler.submit(request, prompt)

    def step(self) -> list[TokenEvent]:
        """Admit waiting requests into free slots (one batched prefill: each emits its first
        token), then one decode step for every active slot. Returns the tokens emitted, admitted
        requests first, then in slot order.

        The decode step runs the first R slots only, R the smallest row bucket holding the last
        active slot (requests take the lowest free slot, so the busy ones gather at the front):
        with few requests left, as when a trace drains, a step costs what its rows need."""
        sched = self.scheduler
        events = []
        admitted = sched.admit()
        if admitted:
            # One forward pass for all admissions, at the largest of their pad buckets: a shorter
            # prompt's extra padding lies past its length, where its own queries never look.
            slots = np.array([slot for slot, _ in admitted], np.int64)
            bucket = max(choose_bucket(entry.prompt.size, sched.buckets) for _, entry in admitted)
            ids, positions, last = prefill_inputs([entry.prompt for _, entry in admitted], bucket)
            u = np.array([entry.noise[0] for _, entry in admitted], sched.dtype)
            start = time.perf_counter()
            out = self.prefill(slots, ids, positions, last, sched.settings.rows(slots), u)
            self.stats.count_prefill(time.perf_counter() - start, [entry.prompt.size for _, entry in admitted])
            for row, (slot, entry) in enumerate(admitted):
                events.append(out.event(entry.request_id, row))
                sched.record(slot, int(out.tokens[row]))
        active = sched.active
        if active.any():
            rows = choose_bucket(int(np.flatnonzero(active)[-1]) + 1, self.row_buckets)
            tokens = np.array([a.tokens[-1] if a is not None else 0 for a in sched.slots[:rows]], np.int64)
            lengths = sched.lengths()[:rows]
            key_length = choose_bucket(int(lengths.max()) + 1, self.key_buckets)
            start = time.perf_counter()
            out = self.decode(tokens, lengths, active[:rows], key_length, sched.settings.rows(np.arange(rows)),
                              sched.noise()[:rows])
            self.stats.count_decode(time.perf_counter() - start, rows, int(active.sum()))
            for slot in np.flatnonzero(active):
                events.append(out.event(sched.slots[slot].request_id, slot))
                sched.record(slot, int(out.tokens[slot]))
        return events

    def run(self, requests: Sequence[Request] = ()) -> Iterator[TokenEvent]:
        """Submit `requests`, then step until nothing is waiting or running, yielding every token
        as it comes: continuous batching (a finished request's slot takes the next one)."""
        for r in requests:
            self.submit(r)
        while not self.scheduler.idle():
            yield from self.step()

    def result(self, request_id: int) -> list[int]:
        """The tokens of a finished request."""
        return list(self.scheduler.done[request_id])

    def prefill(self, slots: np.ndarray, ids: np.ndarray, positions: np.ndarray, last: np.ndarray,
                settings: SlotSettings, u: np.ndarray) -> StepOutput:
        raise NotImplementedError

    def decode(self, tokens: np.ndarray, lengths: np.ndarray, active: np.ndarray, key_length: int,
               settings: SlotSettings, u: np.ndarray) -> StepOutput:
        raise NotImplementedError
