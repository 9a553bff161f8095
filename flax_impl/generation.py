"""`generate()`: greedy decoding, sampling (temperature, top-k, top-p, allowed tokens), beam search.

Mirrors `torch_impl/generation.py` function for function. The whole generation, prefill and a
`jax.lax.while_loop` over the decode steps, is one `jax.jit`-compiled function (the model passed
to it as a pytree) on a KV cache preallocated to prompt + `max_new_tokens`. Prompts are
left-padded further to a length bucket (`weights.shared.generation.bucket_length`: the next power of
two, at least 16), so a new prompt length in the same bucket reuses the compiled loop; batch
size, `max_new_tokens` and the branch-deciding options each select a compilation.

What both twins share (argument checks, left padding and position ids, eos handling, and the
sampling noise with its inverse-CDF rule, so that a seed gives the same tokens in both) is
numpy, written once in `weights.shared.generation`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from weights.shared.generation import (TOP_CANDIDATES, GenerationOptions, bucket_length,
                                       position_ids_from_mask, prepare_generation, sampling_noise)

from . import sharding
from .layers.attention import KVCache
from .layers.linear import linear_packs, reading_packed_linears
from .layers.precision import compute_dtype
from .model import reading_layer_stack

# HF's score for an impossible beam; adding it keeps the arithmetic finite, unlike -inf.
IMPOSSIBLE = -1.0e9


@flax.struct.dataclass
class GenerationOutput:
    """`generate(..., return_scores=True)`: the sequences and, per new token, the model's own
    distribution (log-softmax of the raw logits, before temperature and filters)."""

    sequences: jax.Array  # [B, P + N] prompt then new tokens
    token_logprobs: jax.Array  # [B, N] log-prob of the emitted token (0 once a row finished)
    top_tokens: jax.Array  # [B, N, 8] the most likely tokens, best first (pad once finished)
    top_probs: jax.Array  # [B, N, 8] their probabilities (0 once finished)


# ---- token choice: the math shared by every strategy -------------------------------------------

def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The `k` largest values of the last axis and their indices; ties go to the lower index
    (as `jax.lax.top_k` documents), so both twins break ties alike."""
    values, indices = jax.lax.top_k(x, k)
    return values, indices


def filter_mask(scaled: jax.Array, top_k_value: jax.Array | None, top_p_value: jax.Array | None,
                allowed: jax.Array | None, allowed_first: jax.Array | None = None) -> jax.Array:
    """Keep-mask `[B, V]` over temperature-scaled logits: top-k, then top-p, then `allowed`.

    `top_k_value` and `top_p_value` are one value or one per row (`[B]`); a row with k >= V or
    p >= 1 keeps every token at that filter. top-k keeps every token scoring at least the k-th
    largest (ties included, as HF). top-p keeps the most probable tokens until their renormalised
    mass reaches p (at least one; tokens tied with the last one kept are kept too). If `allowed`
    removes every survivor, the row keeps its most probable allowed token, so a disallowed token
    is never chosen. Rows with `allowed_first` (`[B]` bool, the "grok" order) apply `allowed`
    before top-k and top-p, which then choose among the allowed tokens only.
    """
    keep = jnp.ones_like(scaled, dtype=bool)
    if allowed is not None and allowed_first is not None:
        keep = keep & (allowed | ~allowed_first[:, None])
    if top_k_value is not None:
        ordered = jnp.sort(jnp.where(keep, scaled, -jnp.inf), axis=-1, descending=True)
        k = jnp.broadcast_to(jnp.asarray(top_k_value).reshape(-1, 1), (scaled.shape[0], 1))
        keep = keep & (scaled >= jnp.take_along_axis(ordered, k - 1, axis=-1))
    if top_p_value is not None:
        p = jnp.asarray(top_p_value, dtype=scaled.dtype).reshape(-1, 1)
        probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
        ordered = jnp.sort(probs, axis=-1, descending=True)
        mass_before = jnp.cumsum(ordered, axis=-1) - ordered
        count = jnp.maximum((mass_before < p).sum(-1, keepdims=True), 1)
        keep = keep & ((probs >= jnp.take_along_axis(ordered, count - 1, axis=-1)) | (p >= 1.0))
    if allowed is not None:
        best_allowed = jnp.where(allowed, scaled, -jnp.inf).max(-1, keepdims=True)
        fallback = allowed & (scaled == best_allowed)
        keep = keep & allowed
        keep = jnp.where(keep.any(-1, keepdims=True), keep, fallback)
    return keep


def sampling_weights(logits: jax.Array, temperature: jax.Array, top_k_value: jax.Array | None,
                     top_p_value: jax.Array | None, allowed: jax.Array | None,
                     allowed_first: jax.Array | None = None) -> jax.Array:
    """Unnormalised probabilities `[B, V]` of the filtered distribution (0 for filtered tokens);
    `temperature` is one value or one per row (`[B]`).

    Scaled so that the best kept token has weight 1: no row can underflow to all zeros.
    """
    scaled = logits / jnp.asarray(temperature, dtype=logits.dtype).reshape(-1, 1)
    keep = filter_mask(scaled, top_k_value, top_p_value, allowed, allowed_first)
    best = jnp.where(keep, scaled, -jnp.inf).max(-1, keepdims=True)
    return jnp.where(keep, jnp.exp(scaled - best), jnp.zeros_like(scaled))


def sample_from_weights(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Inverse-CDF sampling: per row, the first token in vocabulary order whose cumulative weight
    exceeds `u * total`, for `u [B]` in [0, 1). A zero-weight token is never returned."""
    cdf = jnp.cumsum(weights, axis=-1)
    target = u[:, None] * cdf[:, -1:]
    hit = (cdf > target) & (weights > 0)
    first = jnp.argmax(hit.astype(jnp.int32), axis=-1)
    # Only when rounding puts u * total at the very top: take the last token with weight.
    last = weights.shape[-1] - 1 - jnp.argmax(jnp.flip(weights > 0, -1).astype(jnp.int32), axis=-1)
    return jnp.where(hit.any(-1), first, last)


def greedy(logits: jax.Array, allowed: jax.Array | None) -> jax.Array:
    """The most likely (allowed) token per row; ties go to the lower index in both twins."""
    if allowed is not None:
        logits = jnp.where(allowed, logits, -jnp.inf)
    return jnp.argmax(logits, axis=-1)


def token_scores(logprobs: jax.Array, token: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log-prob of `token` `[B]`, top token ids `[B, 8]`, their probabilities `[B, 8]`)."""
    chosen = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
    values, indices = top_k(logprobs, min(TOP_CANDIDATES, logprobs.shape[-1]))
    return chosen, indices, jnp.exp(values)


# ---- the model calls ---------------------------------------------------------------------------

def next_logits(model, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
                cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Run `input_ids [B, T]` through the model, writing the cache; logits `[B, V]` of the last
    position only (the LM head never sees the other prompt positions), and the new cache."""
    out = model.model(input_ids, attention_mask, position_ids, cache, use_cache=True)
    return model.logits(out.last_hidden_state[:, -1:])[:, 0], out.past_key_values


class DecodeState(NamedTuple):
    """Greedy / sampling loop state; buffers are `[B, N]` (scores `[B, N, 8]`)."""

    step: jax.Array
    tokens: jax.Array
    finished: jax.Array
    token_logprobs: jax.Array
    top_tokens: jax.Array
    top_probs: jax.Array


def choose(state: DecodeState, logits: jax.Array, noise: jax.Array | None, allowed: jax.Array | None,
           knobs: dict, options: GenerationOptions) -> DecodeState:
    """Pick each row's next token from `logits [B, V]`, record it, and update `finished`."""
    x = logits.astype(compute_dtype(logits.dtype))
    if options.do_sample:
        weights = sampling_weights(x, knobs["temperature"], knobs["top_k"] if options.use_top_k else None,
                                   knobs["top_p"] if options.use_top_p else None, allowed,
                                   knobs["allowed_first"] if options.allowed_first else None)
        token = sample_from_weights(weights, noise[state.step])
    else:
        token = greedy(x, allowed)
    token = jnp.where(state.finished, options.pad_token_id, token).astype(jnp.int32)
    step = state.step
    state = state._replace(tokens=state.tokens.at[:, step].set(token))
    if options.return_scores:
        chosen, top_ids, top_p = token_scores(jax.nn.log_softmax(x, axis=-1), token)
        live = ~state.finished
        state = state._replace(
            token_logprobs=state.token_logprobs.at[:, step].set(jnp.where(live, chosen, 0.0)),
            top_tokens=state.top_tokens.at[:, step].set(jnp.where(live[:, None], top_ids, options.pad_token_id)),
            top_probs=state.top_probs.at[:, step].set(jnp.where(live[:, None], top_p, 0.0)))
    eos = jnp.asarray(options.eos_token_ids, dtype=token.dtype)
    finished = state.finished | jnp.isin(token, eos)
    return state._replace(step=step + 1, finished=finished)


def decode(model, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
           noise: jax.Array | None, allowed: jax.Array | None, knobs: dict, options: GenerationOptions,
           cache: KVCache) -> DecodeState:
    """Greedy or sampled decoding: prefill, then one token per step until done."""
    b, n = input_ids.shape[0], options.max_new_tokens
    cdtype = compute_dtype(cache.keys[0].dtype)
    k = min(TOP_CANDIDATES, model.config.vocab_size)
    pad = options.pad_token_id
    state = DecodeState(jnp.zeros((), jnp.int32), jnp.full((b, n), pad, dtype=jnp.int32),
                        jnp.zeros(b, dtype=bool), jnp.zeros((b, n), dtype=cdtype),
                        jnp.full((b, n, k), pad, dtype=jnp.int32),
                        jnp.zeros((b, n, k), dtype=cdtype))
    logits, cache = next_logits(model, input_ids, attention_mask, position_ids, cache)
    state = choose(state, logits, noise, allowed, knobs, options)
    next_position = position_ids[:, -1:] + 1

    def cond(carry: tuple[DecodeState, KVCache]) -> jax.Array:
        state, _ = carry
        return (state.step < n) & ~state.finished.all()

    def body(carry: tuple[DecodeState, KVCache]) -> tuple[DecodeState, KVCache]:
        state, cache = carry
        token = jax.lax.dynamic_slice_in_dim(state.tokens, state.step - 1, 1, axis=1)
        logits, cache = next_logits(model, token, attention_mask, next_position + (state.step - 1), cache)
        return choose(state, logits, noise, allowed, knobs, options), cache

    state, _ = jax.lax.while_loop(cond, body, (state, cache))
    return state


# ---- beam search (HF's vectorised `_beam_search`, transformers 4.5x) -------------------------

class BeamState(NamedTuple):
    """Beam search state. `running` and `finished` are records `(tokens, logprobs, top_tokens,
    top_probs)` (tokens only without `return_scores`), each `[B, num_beams, N, ...]`."""

    step: jax.Array
    running: tuple[jax.Array, ...]
    running_scores: jax.Array  # [B, nb] summed log-probs of the running beams, best first
    finished: tuple[jax.Array, ...]
    scores: jax.Array  # [B, nb] length-penalised scores of finished hypotheses, best first
    lengths: jax.Array  # [B, nb] new tokens in each finished hypothesis (eos included)
    is_sent_finished: jax.Array  # [B, nb] slot holds a real finished hypothesis
    unsatisfied: jax.Array  # [B, 1] a running beam may still beat the finished ones
    all_hit: jax.Array  # scalar: every candidate of the last step hit eos or the length limit
    parent: jax.Array  # [B * nb] flat beam each running beam came from (to reorder the cache)


def gather_beams(records: tuple[jax.Array, ...], index: jax.Array) -> tuple[jax.Array, ...]:
    """Select beams `index [B, k]` from each record `[B, nb, ...]` -> `[B, k, ...]`."""
    def one(r: jax.Array) -> jax.Array:
        return jnp.take_along_axis(r, index.reshape(index.shape + (1,) * (r.ndim - 2)), axis=1)
    return tuple(one(r) for r in records)


def write_step(records: tuple[jax.Array, ...], step: jax.Array, values: tuple[jax.Array, ...]
               ) -> tuple[jax.Array, ...]:
    """Records with `values[j]` written at new-token index `step` of record j."""
    return tuple(r.at[:, :, step].set(v) for r, v in zip(records, values))


def beam_step(state: BeamState, logits: jax.Array, allowed: jax.Array | None, knobs: dict,
              options: GenerationOptions) -> BeamState:
    """One step of HF's beam search on `logits [B * nb, V]`: expand every beam, keep the
    `beams_to_keep` best continuations, move those ending in eos (or at the length limit) to the
    finished pool, and keep the `nb` best others running."""
    b, nb = state.running_scores.shape
    step, n, kk = state.step, options.max_new_tokens, options.beams_to_keep
    x = logits.astype(state.running_scores.dtype)
    logprobs = jax.nn.log_softmax(x, axis=-1)
    v = logprobs.shape[-1]
    processed = logprobs if allowed is None else jnp.where(allowed, logprobs, -jnp.inf)
    accumulated = (processed.reshape(b, nb, v) + state.running_scores[:, :, None]).reshape(b, nb * v)
    topk_scores, topk_index = top_k(accumulated, kk)
    origin = topk_index // v
    token = topk_index % v
    values: tuple[jax.Array, ...] = (token,)
    if options.return_scores:
        chosen = jnp.take_along_axis(logprobs.reshape(b, nb * v), topk_index, axis=1)
        top_values, top_ids = top_k(logprobs.reshape(b, nb, v), min(TOP_CANDIDATES, v))
        values = (token, chosen, gather_beams((top_ids,), origin)[0], gather_beams((jnp.exp(top_values),), origin)[0])
    candidates = write_step(gather_beams(state.running, origin), step, values)
    eos = jnp.asarray(options.eos_token_ids, dtype=token.dtype)
    hits = jnp.isin(token, eos) | (step == n - 1)

    running_candidates = topk_scores + hits.astype(topk_scores.dtype) * IMPOSSIBLE
    running_scores, keep = top_k(running_candidates, nb)
    running = gather_beams(candidates, keep)
    parent = jnp.take_along_axis(origin, keep, axis=1) + jnp.arange(b, dtype=keep.dtype)[:, None] * nb

    just_finished = hits & (jnp.arange(kk) < nb)
    finished_candidates = topk_scores / knobs["penalties"][step]
    pool_full = state.is_sent_finished.all(-1, keepdims=True) & (options.early_stopping is True)
    finished_candidates = finished_candidates + pool_full.astype(topk_scores.dtype) * IMPOSSIBLE
    finished_candidates = finished_candidates + (~state.unsatisfied).astype(topk_scores.dtype) * IMPOSSIBLE
    finished_candidates = finished_candidates + (~just_finished).astype(topk_scores.dtype) * IMPOSSIBLE
    merged_scores = jnp.concatenate([state.scores, finished_candidates], axis=1)
    scores, best = top_k(merged_scores, nb)
    merged = tuple(jnp.concatenate([f, c], axis=1) for f, c in zip(state.finished, candidates))
    finished = gather_beams(merged, best)
    lengths = jnp.take_along_axis(jnp.concatenate([state.lengths, jnp.full_like(token, step + 1)], axis=1), best, axis=1)
    is_sent_finished = jnp.take_along_axis(jnp.concatenate([state.is_sent_finished, just_finished], axis=1), best, axis=1)

    # HF's `_check_early_stop_heuristic`, with the length reached after this step.
    hypothetical = jnp.where(knobs["hyp_at_max"], knobs["penalties"][n - 1], knobs["penalties"][step])
    best_possible = running_scores[:, :1] / hypothetical
    worst_finished = jnp.where(is_sent_finished, scores.min(1, keepdims=True), IMPOSSIBLE)
    unsatisfied = state.unsatisfied & (best_possible > worst_finished).any(-1, keepdims=True)
    return BeamState(step + 1, running, running_scores, finished, scores, lengths, is_sent_finished,
                     unsatisfied, hits.all(), parent.reshape(-1))


def beam_continues(state: BeamState, options: GenerationOptions) -> jax.Array:
    """HF's `_beam_search_has_unfinished_sequences`."""
    all_full = state.is_sent_finished.all() & (options.early_stopping is True)
    return state.unsatisfied.any() & ~all_full & ~state.all_hit


def beam_search(model, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
                allowed: jax.Array | None, knobs: dict, options: GenerationOptions,
                cache: KVCache) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Beam search over rows already expanded to `[B * nb, ...]`; returns the best finished
    hypotheses' records `[B * num_return_sequences, N, ...]` and their lengths."""
    nb, n = options.num_beams, options.max_new_tokens
    b = input_ids.shape[0] // nb
    cdtype = compute_dtype(cache.keys[0].dtype)
    k = min(TOP_CANDIDATES, model.config.vocab_size)
    pad = options.pad_token_id
    records = (jnp.full((b, nb, n), pad, dtype=jnp.int32),)
    if options.return_scores:
        records += (jnp.zeros((b, nb, n), dtype=cdtype),
                    jnp.full((b, nb, n, k), pad, dtype=jnp.int32),
                    jnp.zeros((b, nb, n, k), dtype=cdtype))
    running_scores = jnp.zeros((b, nb), dtype=cdtype)
    running_scores = running_scores.at[:, 1:].set(IMPOSSIBLE)  # only the first beam expands at the first step
    state = BeamState(jnp.zeros((), jnp.int32), records, running_scores, records, jnp.full((b, nb), IMPOSSIBLE, dtype=cdtype),
                      jnp.zeros((b, nb), dtype=jnp.int32), jnp.zeros((b, nb), dtype=bool),
                      jnp.ones((b, 1), dtype=bool), jnp.asarray(False),
                      jnp.arange(b * nb, dtype=jnp.int32))
    logits, cache = next_logits(model, input_ids, attention_mask, position_ids, cache)
    state = beam_step(state, logits, allowed, knobs, options)
    next_position = position_ids[:, -1:] + 1

    def cond(carry: tuple[BeamState, KVCache]) -> jax.Array:
        state, _ = carry
        return (state.step < n) & beam_continues(state, options)

    def body(carry: tuple[BeamState, KVCache]) -> tuple[BeamState, KVCache]:
        state, cache = carry
        cache = cache.replace(keys=tuple(key[state.parent] for key in cache.keys),
                              values=tuple(value[state.parent] for value in cache.values),
                              length=cache.length[state.parent])
        token = jax.lax.dynamic_index_in_dim(state.running[0], state.step - 1, axis=2, keepdims=False).reshape(-1, 1)
        logits, cache = next_logits(model, token, attention_mask, next_position + (state.step - 1), cache)
        return beam_step(state, logits, allowed, knobs, options), cache

    state, _ = jax.lax.while_loop(cond, body, (state, cache))
    k = options.num_return_sequences  # the k best hypotheses per prompt, adjacent rows
    return tuple(r[:, :k].reshape((-1,) + r.shape[2:]) for r in state.finished), state.lengths[:, :k].reshape(-1)


# ---- the entry point ---------------------------------------------------------------------------

def generate_records(model, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
                     noise: jax.Array | None, allowed: jax.Array | None, knobs: dict,
                     options: GenerationOptions) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Prefill and the whole decode loop on rows already expanded to `[B * num_beams, ...]`.

    Returns the records `(tokens, logprobs, top_tokens, top_probs)` `[R, N, ...]` and how many
    of the N new-token columns are in use."""
    # Under tensor parallelism each process's attention computes (and caches) only its kv heads.
    cache = KVCache.init(model.config, input_ids.shape[0], attention_mask.shape[1], dtype=model.model.dtype,
                         num_key_value_heads=sharding.local_kv_heads(model))
    if options.num_beams == 1:
        state = decode(model, input_ids, attention_mask, position_ids, noise, allowed, knobs, options, cache)
        return (state.tokens, state.token_logprobs, state.top_tokens, state.top_probs), state.step
    records, lengths = beam_search(model, input_ids, attention_mask, position_ids, allowed, knobs, options, cache)
    return records, lengths.max()


@functools.partial(jax.jit, static_argnames=("options",))
def _generate_compiled(model: nnx.Module, packs: dict, input_ids: jax.Array, attention_mask: jax.Array,
                       position_ids: jax.Array, noise: jax.Array | None, allowed: jax.Array | None, knobs: dict,
                       *, options: GenerationOptions) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """`generate_records`, compiled once per (model structure, shapes, options): the torch twin
    calls it directly. An NNX module is a pytree (its structure and static attributes the jit
    cache key, its arrays the arguments): at 22 layers jit flattens it in about a tenth of the
    host time of `nnx.split` -> `jax.jit` with the graph definition static -> `nnx.merge`, which
    walks the graph and hashes and compares the graph definition on every call. With
    `scan_layers` the layers' parameters are stacked once here, for the prefill and every decode
    step (`reading_layer_stack`), not once per step inside the loop. `packs` are the linears'
    packed weights (`prepack_linears`) that `generate()` found still fresh (`linear_packs`)."""
    with reading_layer_stack(model.model), reading_packed_linears(model, packs):
        return generate_records(model, input_ids, attention_mask, position_ids, noise, allowed, knobs, options)


def generate(model, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None, *,
             max_new_tokens: int, do_sample: bool = False, temperature: float | Sequence[float] = 1.0,
             top_k: int | Sequence[int | None] | None = None, top_p: float | Sequence[float | None] | None = None,
             allowed_tokens: jax.Array | np.ndarray | None = None, filter_order: str = "generate",
             num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool | str = False,
             num_return_sequences: int = 1, eos_token_id: int | Sequence[int] | None = None,
             use_config_eos: bool = False, bos_token_id: int | None = None, pad_token_id: int | None = None,
             seed: int = 0, return_scores: bool = False) -> jax.Array | GenerationOutput:
    """Continue each prompt of `input_ids [B, P]` (left-padded, `attention_mask` 1 = token) by up
    to `max_new_tokens` tokens with a `ForCausalLM`; returns the sequences `[B, P + N]`
    (N <= max_new_tokens: the loop stops once every row has emitted an eos token).

    Greedy by default; `do_sample` samples with `temperature`, then `top_k`, then `top_p`, then
    the per-row `allowed_tokens [B, V]` (bool) mask (`filter_order="grok"`: the mask before top-k
    and top-p), driven by the numpy noise of `seed` (same tokens as the torch twin); `temperature`,
    `top_k` and `top_p` are one value or one per prompt row (None in a row: that filter off).
    `num_beams > 1` is HF's beam search with `length_penalty` and `early_stopping` (True, False or
    "never"). `num_return_sequences` rows come back per prompt, adjacent: independent samples, or
    the best hypotheses of beam search. `input_ids` None starts one row from `bos_token_id`
    (default: the config's). `eos_token_id` None means no row ever finishes, unless
    `use_config_eos` takes the config's; `pad_token_id` defaults to the first eos token. With
    `return_scores`, returns a `GenerationOutput` with per-step log-probs and the top-8 candidates.
    """
    config = model.config
    to_np = lambda x: None if x is None else np.asarray(x)  # noqa: E731
    inputs = prepare_generation(
        to_np(input_ids), to_np(attention_mask), config, max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, allowed_tokens=to_np(allowed_tokens),
        num_beams=num_beams, early_stopping=early_stopping, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        return_scores=return_scores, num_return_sequences=num_return_sequences, bos_token_id=bos_token_id,
        use_config_eos=use_config_eos, filter_order=filter_order)
    options = inputs.options
    dtype = model.model.dtype  # the activation dtype
    np_cdtype = np.float64 if compute_dtype(dtype) == jnp.float64 else np.float32
    r, p = inputs.input_ids.shape
    n, nb = options.max_new_tokens, options.num_beams
    # Extra left padding up to the bucket: masked columns that no token can see.
    extra = bucket_length(p) - p
    ids_np = np.pad(inputs.input_ids, ((0, 0), (extra, 0)), constant_values=options.pad_token_id)
    mask_np = np.pad(inputs.attention_mask, ((0, 0), (extra, 0)))
    full_mask = np.concatenate([mask_np, np.ones((r, n), np.int64)], axis=1)  # [R, S]: new tokens are real
    position_ids = position_ids_from_mask(mask_np)
    to_jax = lambda a, t: jnp.asarray(np.repeat(a, nb, axis=0).astype(t))  # noqa: E731 rows -> rows x beams
    knobs = dict(temperature=inputs.temperature.astype(np_cdtype), top_k=to_jax(inputs.top_k, np.int32),
                 top_p=inputs.top_p.astype(np_cdtype), allowed_first=np.ones(r * nb, bool),
                 # length penalties (i + 1) ** lp in numpy, so both twins divide by the same numbers
                 penalties=(np.arange(1, n + 1, dtype=np.float64) ** length_penalty).astype(np_cdtype),
                 hyp_at_max=np.bool_(early_stopping == "never" and length_penalty > 0.0))
    allowed = None if inputs.allowed is None else to_jax(inputs.allowed, bool)
    noise = jnp.asarray(sampling_noise(seed, n, r).astype(np_cdtype)) if options.do_sample else None
    # The packed linears whose kernels are unchanged since `prepack_linears` ride along as arguments.
    records, used = _generate_compiled(model, linear_packs(model), to_jax(ids_np, np.int32),
                                       to_jax(full_mask, np.int32), to_jax(position_ids, np.int32), noise, allowed,
                                       knobs, options=options)
    records = tuple(x[:, :int(used)] for x in records)
    # Beam search returns its best hypotheses per prompt; sampled rows were repeated already.
    prompt = np.repeat(inputs.input_ids, options.num_return_sequences if nb > 1 else 1, axis=0)
    sequences = jnp.concatenate([jnp.asarray(prompt, dtype=jnp.int32), records[0]], axis=1)
    if not options.return_scores:
        return sequences
    return GenerationOutput(sequences, *records[1:])
