"""`generate()`: greedy decoding, sampling (temperature, top-k, top-p, allowed tokens), beam search.

Mirrors `flax_impl/generation.py` function for function. The loop runs under
`torch.inference_mode()` on a KV cache preallocated to prompt + `max_new_tokens`.

`generate(..., compile=True)` runs each greedy or sampled decode step (not the prefill: a
different shape, run once) through `torch.compile`, with CUDA graphs on a GPU
(`mode="reduce-overhead"`, as gpt-fast does). The step is the same `next_logits` as the eager
path, on the same static cache: shapes never change inside the loop (one token per row, the
cache's fixed capacity, positions as tensors), so it compiles once per batch shape.

What both twins share (argument checks, left padding and position ids, eos handling, and the
sampling noise with its inverse-CDF rule, so that a seed gives the same tokens in both) is
numpy, written once in `weights.shared.generation`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from weights.shared.generation import (TOP_CANDIDATES, GenerationOptions, position_ids_from_mask,
                                       prepare_generation, sampling_noise)

from . import sharding
from .layers.attention import KVCache
from .layers.precision import compute_dtype

# HF's score for an impossible beam; adding it keeps the arithmetic finite, unlike -inf.
IMPOSSIBLE = -1.0e9


@dataclass
class GenerationOutput:
    """`generate(..., return_scores=True)`: the sequences and, per new token, the model's own
    distribution (log-softmax of the raw logits, before temperature and filters)."""

    sequences: torch.Tensor  # [B, P + N] prompt then new tokens
    token_logprobs: torch.Tensor  # [B, N] log-prob of the emitted token (0 once a row finished)
    top_tokens: torch.Tensor  # [B, N, 8] the most likely tokens, best first (pad once finished)
    top_probs: torch.Tensor  # [B, N, 8] their probabilities (0 once finished)


# ---- token choice: the math shared by every strategy -------------------------------------------

def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` largest values of the last axis and their indices; ties go to the lower index
    (the order of a stable sort, as `jax.lax.top_k` documents), so both twins break ties alike.

    `torch.topk` (25x faster than a full sort of a 32k vocabulary on CPU) leaves tied entries in
    no defined order, so a row where a kept value occurs more than once is redone: each of its k
    slots takes, among the entries equal to its value, the r-th lowest index, r being the
    earlier slots holding that value.
    """
    values, indices = torch.topk(x, k, dim=-1)  # [..., k], largest first
    flat_x, flat_v, flat_i = x.reshape(-1, x.shape[-1]), values.reshape(-1, k), indices.reshape(-1, k).clone()
    tied = ((flat_x >= flat_v[:, -1:]).sum(-1) > k) | (flat_v[:, 1:] == flat_v[:, :-1]).any(-1)
    if bool(tied.any()):
        xs, vs = flat_x[tied], flat_v[tied]
        rank = torch.tril(vs[:, :, None] == vs[:, None, :], diagonal=-1).sum(-1)  # [R, k]
        hits = xs[:, None, :] == vs[:, :, None]  # [R, k, V]
        nth = hits.cumsum(-1) == (rank + 1)[:, :, None]
        flat_i[tied] = torch.argmax((hits & nth).to(torch.uint8), dim=-1)
    return values, flat_i.reshape(indices.shape)


def filter_mask(scaled: torch.Tensor, top_k_value: torch.Tensor | int | None, top_p_value: torch.Tensor | None,
                allowed: torch.Tensor | None, allowed_first: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask `[B, V]` over temperature-scaled logits: top-k, then top-p, then `allowed`.

    `top_k_value` and `top_p_value` are one value or one per row (`[B]`); a row with k >= V or
    p >= 1 keeps every token at that filter. top-k keeps every token scoring at least the k-th
    largest (ties included, as HF). top-p keeps the most probable tokens until their renormalised
    mass reaches p (at least one; tokens tied with the last one kept are kept too). If `allowed`
    removes every survivor, the row keeps its most probable allowed token, so a disallowed token
    is never chosen. Rows with `allowed_first` (`[B]` bool, the "grok" order) apply `allowed`
    before top-k and top-p, which then choose among the allowed tokens only.
    """
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if allowed is not None and allowed_first is not None:
        keep = keep & (allowed | ~allowed_first[:, None])
    if top_k_value is not None:
        ordered = torch.sort(torch.where(keep, scaled, -torch.inf), dim=-1, descending=True).values
        k = torch.as_tensor(top_k_value, device=scaled.device).reshape(-1, 1).expand(scaled.shape[0], 1)
        keep = keep & (scaled >= torch.gather(ordered, -1, k - 1))
    if top_p_value is not None:
        p = torch.as_tensor(top_p_value, dtype=scaled.dtype, device=scaled.device).reshape(-1, 1)
        probs = torch.softmax(torch.where(keep, scaled, -torch.inf), dim=-1)
        ordered = torch.sort(probs, dim=-1, descending=True).values
        mass_before = torch.cumsum(ordered, dim=-1) - ordered
        count = (mass_before < p).sum(-1, keepdim=True).clamp(min=1)
        keep = keep & ((probs >= torch.gather(ordered, -1, count - 1)) | (p >= 1.0))
    if allowed is not None:
        best_allowed = torch.where(allowed, scaled, -torch.inf).max(-1, keepdim=True).values
        fallback = allowed & (scaled == best_allowed)
        keep = keep & allowed
        keep = torch.where(keep.any(-1, keepdim=True), keep, fallback)
    return keep


def sampling_weights(logits: torch.Tensor, temperature: torch.Tensor, top_k_value: torch.Tensor | int | None,
                     top_p_value: torch.Tensor | None, allowed: torch.Tensor | None,
                     allowed_first: torch.Tensor | None = None) -> torch.Tensor:
    """Unnormalised probabilities `[B, V]` of the filtered distribution (0 for filtered tokens);
    `temperature` is one value or one per row (`[B]`).

    Scaled so that the best kept token has weight 1: no row can underflow to all zeros.
    """
    scaled = logits / torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device).reshape(-1, 1)
    keep = filter_mask(scaled, top_k_value, top_p_value, allowed, allowed_first)
    best = torch.where(keep, scaled, -torch.inf).max(-1, keepdim=True).values
    return torch.where(keep, torch.exp(scaled - best), torch.zeros_like(scaled))


def sample_from_weights(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: per row, the first token in vocabulary order whose cumulative weight
    exceeds `u * total`, for `u [B]` in [0, 1). A zero-weight token is never returned."""
    cdf = torch.cumsum(weights, dim=-1)
    target = u[:, None] * cdf[:, -1:]
    hit = (cdf > target) & (weights > 0)
    first = torch.argmax(hit.to(torch.int32), dim=-1)
    # Only when rounding puts u * total at the very top: take the last token with weight.
    last = weights.shape[-1] - 1 - torch.argmax((weights > 0).flip(-1).to(torch.int32), dim=-1)
    return torch.where(hit.any(-1), first, last)


def greedy(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """The most likely (allowed) token per row; ties go to the lower index in both twins."""
    if allowed is not None:
        logits = torch.where(allowed, logits, -torch.inf)
    return torch.argmax(logits, dim=-1)


def token_scores(logprobs: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-prob of `token` `[B]`, top token ids `[B, 8]`, their probabilities `[B, 8]`)."""
    chosen = torch.gather(logprobs, -1, token[:, None])[:, 0]
    values, indices = top_k(logprobs, min(TOP_CANDIDATES, logprobs.shape[-1]))
    return chosen, indices, torch.exp(values)


# ---- the model calls ---------------------------------------------------------------------------

def next_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: KVCache) -> tuple[torch.Tensor, KVCache]:
    """Run `input_ids [B, T]` through the model, writing the cache; logits `[B, V]` of the last
    position only (the LM head never sees the other prompt positions), and the cache (the same
    object, written in place)."""
    out = model.model(input_ids, attention_mask, position_ids, cache, use_cache=True)
    return model.logits(out.last_hidden_state[:, -1:])[:, 0], out.past_key_values


# torch.compile modes `generate(compile=...)` takes; True picks the first on CUDA, "frozen" elsewhere.
# "frozen" is the default mode with Inductor's freezing: the weights become constants of the graph,
# which on the CPU turns each float32 linear into an MKL GEMM on a weight packed once (at batch 8,
# 2-2.5x faster per matmul than the unpacked one every eager call repacks).
COMPILE_MODES = ("reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs", "frozen")
_COMPILED: dict[str, Callable] = {}  # mode -> the compiled `_decode_step` (dynamo caches per shape)
# model -> (address, version) of each parameter when a compiled step last ran it: a frozen graph
# keeps the weights it was built with, so a change (training, a load) rebuilds the compiled steps.
_WEIGHTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
# model -> the cache buffers its last compiled decoding used. CUDA graphs replay fixed addresses:
# reusing the buffers (zeroed) lets the next generate() of that shape replay instead of re-record.
_STATIC_CACHES: "weakref.WeakKeyDictionary[torch.nn.Module, KVCache]" = weakref.WeakKeyDictionary()


def _decode_step(model, token: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 keys: list[torch.Tensor], values: list[torch.Tensor], length: torch.Tensor) -> torch.Tensor:
    # `next_logits` as a function of tensors only (what torch.compile traces): the cache buffers
    # are written in place, `length` is read, and the caller advances its own cache.
    logits, _ = next_logits(model, token, attention_mask, position_ids, KVCache(list(keys), list(values), length))
    return logits


def _compile_mode(compile: bool | str, device: torch.device, options: GenerationOptions, config) -> str | None:
    """The `torch.compile` mode of `generate(compile=...)`: None (eager) for False, True ->
    "reduce-overhead" (CUDA graphs) on CUDA and "frozen" elsewhere, or a mode named."""
    if compile is False or compile is None:
        return None
    if compile is not True and compile not in COMPILE_MODES:
        raise ValueError(f"compile: expected True, False or one of {', '.join(COMPILE_MODES)}; got {compile!r}")
    if options.num_beams > 1:
        raise ValueError("compile: greedy and sampled decoding only; beam search (num_beams > 1) runs eagerly")
    if config.rope.rope_type == "dynamic":
        raise ValueError("compile: dynamic NTK rotary scaling reads the positions on the host each step; "
                         "decode eagerly (compile=False)")
    if compile is True:
        return "reduce-overhead" if device.type == "cuda" else "frozen"
    return compile


def _compiled_next_logits(mode: str) -> Callable:
    """`next_logits` for the decode loop, the model call compiled with `mode` (one compiled
    function per mode, shared by every model: dynamo keeps one graph per model and batch shape)."""
    if mode not in _COMPILED:
        how = dict(options={"freezing": True}) if mode == "frozen" else dict(mode=mode)
        _COMPILED[mode] = torch.compile(_decode_step, fullgraph=True, dynamic=False, **how)
    compiled = _COMPILED[mode]

    def step(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
             cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        # A new CUDA graph generation: the last step's logits are consumed (choose() copied what
        # it keeps), so this replay may overwrite them. The token (a view of the record) is
        # copied to a tensor of its own.
        torch.compiler.cudagraph_mark_step_begin()
        logits = compiled(model, input_ids.clone(), attention_mask, position_ids, cache.keys, cache.values,
                          cache.length)
        return logits, cache.advance(input_ids.shape[1])

    return step


def _static_cache(model, cache: KVCache) -> KVCache:
    """`cache`, or the buffers of `model`'s last compiled decoding when they have its shape,
    dtype and device (zeroed, length 0), marked as fixed addresses for CUDA graphs. Compiled
    steps built before `model`'s weights last changed are dropped first (`_WEIGHTS`)."""
    weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
    if _WEIGHTS.get(model, weights) != weights and "frozen" in _COMPILED:
        torch._dynamo.reset()  # every compiled graph goes (and recompiles at its next call)
        _COMPILED.clear()
    _WEIGHTS[model] = weights
    old = _STATIC_CACHES.get(model)
    same = old is not None and len(old.keys) == len(cache.keys) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device for a, b in zip(old.keys, cache.keys))
    if same:
        for buffer in old.keys + old.values:
            buffer.zero_()
        old.length = torch.zeros_like(cache.length)
        return old
    for buffer in cache.keys + cache.values:
        torch._dynamo.mark_static_address(buffer)
    _STATIC_CACHES[model] = cache
    return cache


class DecodeState(NamedTuple):
    """Greedy / sampling loop state; buffers are `[B, N]` (scores `[B, N, 8]`)."""

    step: int
    tokens: torch.Tensor
    finished: torch.Tensor
    token_logprobs: torch.Tensor
    top_tokens: torch.Tensor
    top_probs: torch.Tensor


def choose(state: DecodeState, logits: torch.Tensor, noise: torch.Tensor | None, allowed: torch.Tensor | None,
           knobs: dict, options: GenerationOptions) -> DecodeState:
    """Pick each row's next token from `logits [B, V]`, record it, and update `finished`."""
    x = logits.to(compute_dtype(logits.dtype))
    if options.do_sample:
        weights = sampling_weights(x, knobs["temperature"], knobs["top_k"] if options.use_top_k else None,
                                   knobs["top_p"] if options.use_top_p else None, allowed,
                                   knobs["allowed_first"] if options.allowed_first else None)
        token = sample_from_weights(weights, noise[state.step])
    else:
        token = greedy(x, allowed)
    token = torch.where(state.finished, options.pad_token_id, token)
    step = state.step
    state.tokens[:, step] = token
    if options.return_scores:
        chosen, top_ids, top_p = token_scores(torch.log_softmax(x, dim=-1), token)
        live = ~state.finished
        state.token_logprobs[:, step] = torch.where(live, chosen, 0.0)
        state.top_tokens[:, step] = torch.where(live[:, None], top_ids, options.pad_token_id)
        state.top_probs[:, step] = torch.where(live[:, None], top_p, 0.0)
    eos = torch.tensor(options.eos_token_ids, dtype=token.dtype, device=token.device)
    finished = state.finished | torch.isin(token, eos)
    return state._replace(step=step + 1, finished=finished)


def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
           noise: torch.Tensor | None, allowed: torch.Tensor | None, knobs: dict, options: GenerationOptions,
           cache: KVCache, compile: str | None = None) -> DecodeState:
    """Greedy or sampled decoding: prefill, then one token per step until done; with `compile`
    (a `torch.compile` mode) each step after the prefill runs compiled."""
    b, n = input_ids.shape[0], options.max_new_tokens
    cdtype = compute_dtype(cache.keys[0].dtype)
    k = min(TOP_CANDIDATES, model.config.vocab_size)
    pad, dev = options.pad_token_id, input_ids.device
    state = DecodeState(0, torch.full((b, n), pad, dtype=torch.int64, device=dev),
                        torch.zeros(b, dtype=torch.bool, device=dev), torch.zeros(b, n, dtype=cdtype, device=dev),
                        torch.full((b, n, k), pad, dtype=torch.int64, device=dev),
                        torch.zeros(b, n, k, dtype=cdtype, device=dev))
    cache = cache if compile is None else _static_cache(model, cache)
    logits, cache = next_logits(model, input_ids, attention_mask, position_ids, cache)
    state = choose(state, logits, noise, allowed, knobs, options)
    next_position = position_ids[:, -1:] + 1
    step = next_logits if compile is None else _compiled_next_logits(compile)
    while state.step < n and not bool(state.finished.all()):
        token = state.tokens[:, state.step - 1:state.step]
        logits, cache = step(model, token, attention_mask, next_position + (state.step - 1), cache)
        state = choose(state, logits, noise, allowed, knobs, options)
    return state


# ---- beam search (HF's vectorised `_beam_search`, transformers 4.5x) -------------------------

class BeamState(NamedTuple):
    """Beam search state. `running` and `finished` are records `(tokens, logprobs, top_tokens,
    top_probs)` (tokens only without `return_scores`), each `[B, num_beams, N, ...]`."""

    step: int
    running: tuple[torch.Tensor, ...]
    running_scores: torch.Tensor  # [B, nb] summed log-probs of the running beams, best first
    finished: tuple[torch.Tensor, ...]
    scores: torch.Tensor  # [B, nb] length-penalised scores of finished hypotheses, best first
    lengths: torch.Tensor  # [B, nb] new tokens in each finished hypothesis (eos included)
    is_sent_finished: torch.Tensor  # [B, nb] slot holds a real finished hypothesis
    unsatisfied: torch.Tensor  # [B, 1] a running beam may still beat the finished ones
    all_hit: torch.Tensor  # scalar: every candidate of the last step hit eos or the length limit
    parent: torch.Tensor  # [B * nb] flat beam each running beam came from (to reorder the cache)


def gather_beams(records: tuple[torch.Tensor, ...], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Select beams `index [B, k]` from each record `[B, nb, ...]` -> `[B, k, ...]`."""
    def one(r: torch.Tensor) -> torch.Tensor:
        return torch.take_along_dim(r, index.reshape(index.shape + (1,) * (r.dim() - 2)), dim=1)
    return tuple(one(r) for r in records)


def write_step(records: tuple[torch.Tensor, ...], step: int, values: tuple[torch.Tensor, ...]
               ) -> tuple[torch.Tensor, ...]:
    """Records with `values[j]` written at new-token index `step` of record j (in place: the
    records are fresh gathers, shared with nothing)."""
    for r, v in zip(records, values):
        r[:, :, step] = v
    return records


def beam_step(state: BeamState, logits: torch.Tensor, allowed: torch.Tensor | None, knobs: dict,
              options: GenerationOptions) -> BeamState:
    """One step of HF's beam search on `logits [B * nb, V]`: expand every beam, keep the
    `beams_to_keep` best continuations, move those ending in eos (or at the length limit) to the
    finished pool, and keep the `nb` best others running."""
    b, nb = state.running_scores.shape
    step, n, kk = state.step, options.max_new_tokens, options.beams_to_keep
    x = logits.to(state.running_scores.dtype)
    logprobs = torch.log_softmax(x, dim=-1)
    v = logprobs.shape[-1]
    processed = logprobs if allowed is None else torch.where(allowed, logprobs, -torch.inf)
    accumulated = (processed.reshape(b, nb, v) + state.running_scores[:, :, None]).reshape(b, nb * v)
    topk_scores, topk_index = top_k(accumulated, kk)
    origin = topk_index // v
    token = topk_index % v
    values: tuple[torch.Tensor, ...] = (token,)
    if options.return_scores:
        chosen = torch.gather(logprobs.reshape(b, nb * v), 1, topk_index)
        top_values, top_ids = top_k(logprobs.reshape(b, nb, v), min(TOP_CANDIDATES, v))
        values = (token, chosen, gather_beams((top_ids,), origin)[0], gather_beams((torch.exp(top_values),), origin)[0])
    candidates = write_step(gather_beams(state.running, origin), step, values)
    eos = torch.tensor(options.eos_token_ids, dtype=token.dtype, device=token.device)
    hits = torch.isin(token, eos) | (step == n - 1)

    running_candidates = topk_scores + hits.to(topk_scores.dtype) * IMPOSSIBLE
    running_scores, keep = top_k(running_candidates, nb)
    running = gather_beams(candidates, keep)
    parent = torch.gather(origin, 1, keep) + torch.arange(b, device=keep.device)[:, None] * nb

    just_finished = hits & (torch.arange(kk, device=hits.device) < nb)
    finished_candidates = topk_scores / knobs["penalties"][step]
    pool_full = state.is_sent_finished.all(-1, keepdim=True) & (options.early_stopping is True)
    finished_candidates = finished_candidates + pool_full.to(topk_scores.dtype) * IMPOSSIBLE
    finished_candidates = finished_candidates + (~state.unsatisfied).to(topk_scores.dtype) * IMPOSSIBLE
    finished_candidates = finished_candidates + (~just_finished).to(topk_scores.dtype) * IMPOSSIBLE
    merged_scores = torch.cat([state.scores, finished_candidates], dim=1)
    scores, best = top_k(merged_scores, nb)
    merged = tuple(torch.cat([f, c], dim=1) for f, c in zip(state.finished, candidates))
    finished = gather_beams(merged, best)
    lengths = torch.gather(torch.cat([state.lengths, torch.full_like(token, step + 1)], dim=1), 1, best)
    is_sent_finished = torch.gather(torch.cat([state.is_sent_finished, just_finished], dim=1), 1, best)

    # HF's `_check_early_stop_heuristic`, with the length reached after this step.
    hypothetical = torch.where(knobs["hyp_at_max"], knobs["penalties"][n - 1], knobs["penalties"][step])
    best_possible = running_scores[:, :1] / hypothetical
    worst_finished = torch.where(is_sent_finished, scores.min(1, keepdim=True).values, IMPOSSIBLE)
    unsatisfied = state.unsatisfied & (best_possible > worst_finished).any(-1, keepdim=True)
    return BeamState(step + 1, running, running_scores, finished, scores, lengths, is_sent_finished,
                     unsatisfied, hits.all(), parent.reshape(-1))


def beam_continues(state: BeamState, options: GenerationOptions) -> torch.Tensor:
    """HF's `_beam_search_has_unfinished_sequences`."""
    all_full = state.is_sent_finished.all() & (options.early_stopping is True)
    return state.unsatisfied.any() & ~all_full & ~state.all_hit


def beam_search(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                allowed: torch.Tensor | None, knobs: dict, options: GenerationOptions,
                cache: KVCache) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Beam search over rows already expanded to `[B * nb, ...]`; returns the best finished
    hypotheses' records `[B * num_return_sequences, N, ...]` and their lengths."""
    nb, n = options.num_beams, options.max_new_tokens
    b = input_ids.shape[0] // nb
    cdtype = compute_dtype(cache.keys[0].dtype)
    k = min(TOP_CANDIDATES, model.config.vocab_size)
    pad, dev = options.pad_token_id, input_ids.device
    records = (torch.full((b, nb, n), pad, dtype=torch.int64, device=dev),)
    if options.return_scores:
        records += (torch.zeros(b, nb, n, dtype=cdtype, device=dev),
                    torch.full((b, nb, n, k), pad, dtype=torch.int64, device=dev),
                    torch.zeros(b, nb, n, k, dtype=cdtype, device=dev))
    running_scores = torch.zeros(b, nb, dtype=cdtype, device=dev)
    running_scores[:, 1:] = IMPOSSIBLE  # only the first beam expands at the first step
    state = BeamState(0, records, running_scores, records, torch.full((b, nb), IMPOSSIBLE, dtype=cdtype, device=dev),
                      torch.zeros(b, nb, dtype=torch.int64, device=dev), torch.zeros(b, nb, dtype=torch.bool, device=dev),
                      torch.ones(b, 1, dtype=torch.bool, device=dev), torch.tensor(False, device=dev),
                      torch.arange(b * nb, device=dev))
    logits, cache = next_logits(model, input_ids, attention_mask, position_ids, cache)
    state = beam_step(state, logits, allowed, knobs, options)
    next_position = position_ids[:, -1:] + 1
    while state.step < n and bool(beam_continues(state, options)):
        cache.keys = [key[state.parent] for key in cache.keys]
        cache.values = [value[state.parent] for value in cache.values]
        cache.length = cache.length[state.parent]
        token = state.running[0][:, :, state.step - 1].reshape(-1, 1)
        logits, cache = next_logits(model, token, attention_mask, next_position + (state.step - 1), cache)
        state = beam_step(state, logits, allowed, knobs, options)
    k = options.num_return_sequences  # the k best hypotheses per prompt, adjacent rows
    return tuple(r[:, :k].flatten(0, 1) for r in state.finished), state.lengths[:, :k].flatten()


# ---- the entry point ---------------------------------------------------------------------------

def generate_records(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                     noise: torch.Tensor | None, allowed: torch.Tensor | None, knobs: dict,
                     options: GenerationOptions, compile: str | None = None
                     ) -> tuple[tuple[torch.Tensor, ...], int | torch.Tensor]:
    """Prefill and the whole decode loop on rows already expanded to `[B * num_beams, ...]`.

    Returns the records `(tokens, logprobs, top_tokens, top_probs)` `[R, N, ...]` and how many
    of the N new-token columns are in use."""
    # Under tensor parallelism each process's attention computes (and caches) only its kv heads.
    cache = KVCache.init(model.config, input_ids.shape[0], attention_mask.shape[1], dtype=model.model.dtype,
                         device=input_ids.device, num_key_value_heads=sharding.local_kv_heads(model))
    if options.num_beams == 1:
        state = decode(model, input_ids, attention_mask, position_ids, noise, allowed, knobs, options, cache, compile)
        return (state.tokens, state.token_logprobs, state.top_tokens, state.top_probs), state.step
    records, lengths = beam_search(model, input_ids, attention_mask, position_ids, allowed, knobs, options, cache)
    return records, lengths.max()


def generate(model, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int, do_sample: bool = False, temperature: float | Sequence[float] = 1.0,
             top_k: int | Sequence[int | None] | None = None, top_p: float | Sequence[float | None] | None = None,
             allowed_tokens: torch.Tensor | np.ndarray | None = None, filter_order: str = "generate",
             num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool | str = False,
             num_return_sequences: int = 1, eos_token_id: int | Sequence[int] | None = None,
             use_config_eos: bool = False, bos_token_id: int | None = None, pad_token_id: int | None = None,
             seed: int = 0, return_scores: bool = False, compile: bool | str = False
             ) -> torch.Tensor | GenerationOutput:
    """Continue each prompt of `input_ids [B, P]` (left-padded, `attention_mask` 1 = token) by up
    to `max_new_tokens` tokens with a `ForCausalLM`; returns the sequences `[B, P + N]`
    (N <= max_new_tokens: the loop stops once every row has emitted an eos token).

    Greedy by default; `do_sample` samples with `temperature`, then `top_k`, then `top_p`, then
    the per-row `allowed_tokens [B, V]` (bool) mask (`filter_order="grok"`: the mask before top-k
    and top-p), driven by the numpy noise of `seed` (same tokens as the Flax twin); `temperature`,
    `top_k` and `top_p` are one value or one per prompt row (None in a row: that filter off).
    `num_beams > 1` is HF's beam search with `length_penalty` and `early_stopping` (True, False or
    "never"). `num_return_sequences` rows come back per prompt, adjacent: independent samples, or
    the best hypotheses of beam search. `input_ids` None starts one row from `bos_token_id`
    (default: the config's). `eos_token_id` None means no row ever finishes, unless
    `use_config_eos` takes the config's; `pad_token_id` defaults to the first eos token. With
    `return_scores`, returns a `GenerationOutput` with per-step log-probs and the top-8 candidates.

    `compile` (torch only: the Flax twin's loop is always jitted) runs each decode step after the
    prefill under `torch.compile`: True is `mode="reduce-overhead"` (CUDA graphs) on CUDA and
    "frozen" elsewhere (weights as graph constants, rebuilt when they change); a string names the
    mode (`COMPILE_MODES`). Same tokens as eager, logits within the tolerance table; the first call
    of a batch shape and length pays the compilation (a minute or more on a CPU). Greedy and
    sampled decoding only (beam search reorders its cache every step).
    """
    config = model.config
    dev = input_ids.device if input_ids is not None else next(model.parameters()).device
    to_np = lambda x: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x  # noqa: E731
    inputs = prepare_generation(
        to_np(input_ids), to_np(attention_mask), config, max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, allowed_tokens=to_np(allowed_tokens),
        num_beams=num_beams, early_stopping=early_stopping, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        return_scores=return_scores, num_return_sequences=num_return_sequences, bos_token_id=bos_token_id,
        use_config_eos=use_config_eos, filter_order=filter_order)
    options = inputs.options
    mode = _compile_mode(compile, dev, options, config)
    dtype = model.model.dtype  # the activation dtype
    np_cdtype = np.float64 if compute_dtype(dtype) == torch.float64 else np.float32
    r = inputs.input_ids.shape[0]
    n, nb = options.max_new_tokens, options.num_beams
    full_mask = np.concatenate([inputs.attention_mask, np.ones((r, n), np.int64)], axis=1)  # [R, S]: new tokens are real
    position_ids = position_ids_from_mask(inputs.attention_mask)
    as_tensor = lambda x: torch.from_numpy(np.asarray(x, np_cdtype)).to(dev)  # noqa: E731
    to_torch = lambda a: torch.from_numpy(np.repeat(a, nb, axis=0)).to(dev)  # noqa: E731 rows -> rows x beams
    knobs = dict(temperature=as_tensor(inputs.temperature), top_k=to_torch(inputs.top_k), top_p=as_tensor(inputs.top_p),
                 allowed_first=torch.ones(r * nb, dtype=torch.bool, device=dev),
                 # length penalties (i + 1) ** lp in numpy, so both twins divide by the same numbers
                 penalties=as_tensor(np.arange(1, n + 1, dtype=np.float64) ** length_penalty),
                 hyp_at_max=torch.tensor(early_stopping == "never" and length_penalty > 0.0, device=dev))
    allowed = None if inputs.allowed is None else to_torch(inputs.allowed)
    noise = torch.from_numpy(sampling_noise(seed, n, r).astype(np_cdtype)).to(dev) if options.do_sample else None
    ids = to_torch(inputs.input_ids)
    # Under FSDP2 each rank generates its own rows with the whole model gathered (data parallel).
    with sharding.gathered_for_generation(model), torch.inference_mode():
        records, used = generate_records(model, ids, to_torch(full_mask), to_torch(position_ids), noise, allowed, knobs,
                                         options, mode)
    # Cloned outside inference mode: inference tensors could not be saved for a later backward
    # pass (training on generated sequences).
    records = tuple(x[:, :int(used)].clone() for x in records)
    # Beam search returns its best hypotheses per prompt; sampled rows were repeated already.
    prompt = torch.from_numpy(np.repeat(inputs.input_ids, options.num_return_sequences if nb > 1 else 1, axis=0))
    id_dtype = input_ids.dtype if input_ids is not None else torch.int64
    sequences = torch.cat([prompt.to(dev, id_dtype), records[0].to(id_dtype)], dim=1)
    if not options.return_scores:
        return sequences
    return GenerationOutput(sequences, *records[1:])
