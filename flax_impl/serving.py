"""A serving `Runner` (the Grok-1 runner): slots, continuous batching, per-request sampling.

Mirrors `torch_impl/serving.py`. The runner owns one KV cache of `num_slots` rows, each with its
own write position (`KVCache.length[slot]`). A request is prefilled alone into a free slot: its
prompt, right-padded to a pad bucket, runs through the model on a one-row cache of the full
length, and that row replaces the slot's row (every position, so nothing of the slot's previous
request survives), with the slot's position set to the prompt length. One decode step then
runs every slot at once, each row at its own position with its own sampling settings. The
bookkeeping (queue, slots, settings, the loop) is `weights.shared.serving.ServingLoop`.

Why the padded prompt positions do no harm: they are written at cache indices at or after the
prompt length, where no real query looks (the causal mask is by cache index), and each decode
step overwrites the index it attends from before it attends.

Token choice is `generate()`'s own functions (`sampling_weights`, `sample_from_weights`,
`greedy`, `token_scores`) on per-row settings; a request's noise is its own (`request_noise`),
so its tokens equal `generate()` on that request alone.

Compilation: one program per pad bucket (prefill into a slot; the prompt length within the
bucket, the slot and the settings are values, not shapes) and one decode program over all
slots, all compiled ahead of time when the runner is built (`jax.jit(...).lower(...).compile()`),
with a progress bar. Calls then never trace or compile again; the cache buffers are donated, so
each step updates them in place.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from weights.config import ModelConfig
from weights.shared.serving import DEFAULT_BUCKETS, ServingLoop, SlotSettings, StepOutput, check_runner_config

from .generation import greedy, sample_from_weights, sampling_weights, token_scores, top_k
from .layers.attention import KVCache
from .layers.precision import compute_dtype

__all__ = ["Runner", "sample_rows"]


def sample_rows(logits: jax.Array, temperature: jax.Array, top_k_value: jax.Array, top_p_value: jax.Array,
                allowed: jax.Array, allowed_first: jax.Array, do_sample: jax.Array, u: jax.Array
                ) -> tuple[jax.Array, ...]:
    """Each row's token from `logits [R, V]` with its own settings (`[R]`, `allowed [R, V]`):
    sampled rows by inverse CDF with `u [R]`, the others greedy. Returns (token, its log-prob,
    top-8 ids and probabilities of the model's distribution, top-8 of the filtered one)."""
    x = logits.astype(compute_dtype(logits.dtype))
    # top-k and top-p sort the vocabulary: skipped when no row asks for them (k = V, p = 1 keep all).
    use_filters = (top_k_value < x.shape[-1]).any() | (top_p_value < 1.0).any()
    weights = jax.lax.cond(use_filters,
                           lambda: sampling_weights(x, temperature, top_k_value, top_p_value, allowed, allowed_first),
                           lambda: sampling_weights(x, temperature, None, None, allowed, allowed_first))
    token = jnp.where(do_sample, sample_from_weights(weights, u), greedy(x, allowed))
    chosen, top_ids, top_probs = token_scores(jax.nn.log_softmax(x, axis=-1), token)
    filtered, filtered_ids = top_k(weights / weights.sum(-1, keepdims=True), top_ids.shape[-1])
    return token, chosen, top_ids, top_probs, filtered_ids, filtered


def _prefill_program(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, ids: jax.Array, positions: jax.Array,
                     last: jax.Array, slot: jax.Array, *settings: jax.Array) -> tuple[KVCache, tuple[jax.Array, ...]]:
    """Prefill `ids [1, L]` into row `slot` of `cache`; the token chosen at position `last`."""
    model = nnx.merge(graphdef, state)
    row = KVCache.init(model.config, 1, cache.capacity, dtype=cache.keys[0].dtype)
    out = model.model(ids, None, positions, row, use_cache=True)
    logits = model.logits(jax.lax.dynamic_slice_in_dim(out.last_hidden_state, last, 1, axis=1))[:, 0]
    row = out.past_key_values
    keys = tuple(jax.lax.dynamic_update_slice_in_dim(k, r, slot, axis=0) for k, r in zip(cache.keys, row.keys))
    values = tuple(jax.lax.dynamic_update_slice_in_dim(v, r, slot, axis=0) for v, r in zip(cache.values, row.values))
    cache = cache.replace(keys=keys, values=values, length=cache.length.at[slot].set(last + 1))
    return cache, sample_rows(logits, *settings)


def _decode_program(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, tokens: jax.Array, active: jax.Array,
                    *settings: jax.Array) -> tuple[KVCache, tuple[jax.Array, ...]]:
    """One token for every slot; only `active` slots move their position."""
    model = nnx.merge(graphdef, state)
    length = cache.length
    out = model.model(tokens[:, None], None, length[:, None], cache, use_cache=True)
    cache = out.past_key_values.replace(length=jnp.where(active, length + 1, length))
    logits = model.logits(out.last_hidden_state)[:, 0]
    return cache, sample_rows(logits, *settings)


class Runner(ServingLoop):
    """Continuous batching over `num_slots` slots of `max_len` positions with a `ForCausalLM`.

    `submit(Request(...)) -> id`, `step() -> [TokenEvent]`, `run(requests) -> iterator of
    TokenEvent (request id, token, log-prob, top-8)`. A prompt is padded to the smallest of
    `pad_buckets` that holds it; `tokenizer` (`weights.tokenizer.load_tokenizer`) lets prompts be
    text. Every program is compiled here, with a progress bar when `progress`."""

    def __init__(self, model, num_slots: int, max_len: int, pad_buckets: Sequence[int] = DEFAULT_BUCKETS, *,
                 tokenizer=None, progress: bool = False):
        config: ModelConfig = model.config
        check_runner_config(config, max_len)
        self.model = model
        self.dtype = model.model.dtype
        cdtype = np.float64 if compute_dtype(self.dtype) == jnp.float64 else np.float32
        super().__init__(num_slots, max_len, pad_buckets, config.vocab_size, cdtype, tokenizer)
        self.cache = KVCache.init(config, self.num_slots, self.max_len, dtype=self.dtype)
        self.graphdef, self.state = nnx.split(model)
        self.compiled = {}
        s, v = self.num_slots, config.vocab_size
        settings = lambda r: (np.ones(r, cdtype), np.ones(r, np.int32), np.ones(r, cdtype), np.ones((r, v), bool),  # noqa: E731
                              np.zeros(r, bool), np.zeros(r, bool), np.zeros(r, cdtype))
        jobs = [(b, functools.partial(_prefill_program, self.graphdef),
                 (np.zeros((1, b), np.int32), np.zeros((1, b), np.int32), np.int32(0), np.int32(0)) + settings(1))
                for b in self.pad_buckets]
        jobs.append(("decode", functools.partial(_decode_program, self.graphdef),
                     (np.zeros(s, np.int32), np.zeros(s, bool)) + settings(s)))
        for name, fn, args in tqdm(jobs, desc=f"compiling {len(jobs)} programs ({s} slots)", disable=not progress):
            self.compiled[name] = jax.jit(fn, donate_argnums=(1,)).lower(self.state, self.cache, *args).compile()

    def _settings(self, settings: SlotSettings, u: np.ndarray) -> tuple[np.ndarray, ...]:
        return (settings.temperature, settings.top_k.astype(np.int32), settings.top_p, settings.allowed,
                settings.allowed_first, settings.do_sample, u)

    def prefill(self, slot: int, prompt: np.ndarray, bucket: int, settings: SlotSettings, u: np.ndarray
                ) -> StepOutput:
        """Run `prompt` (right-padded to `bucket`) into `slot`'s cache row; its first token."""
        p = prompt.size
        ids = np.zeros((1, bucket), np.int32)
        ids[0, :p] = prompt
        # Padded positions repeat the last real one: dynamic NTK rope reads max(position) + 1.
        positions = np.minimum(np.arange(bucket), p - 1)[None].astype(np.int32)
        self.cache, out = self.compiled[bucket](self.state, self.cache, ids, positions, np.int32(p - 1), np.int32(slot),
                                                *self._settings(settings, u))
        return StepOutput(*jax.device_get(out))

    def decode(self, tokens: np.ndarray, active: np.ndarray, settings: SlotSettings, u: np.ndarray) -> StepOutput:
        """One token for every slot (`tokens [S]`: each slot's last token); only `active` slots
        move their position."""
        self.cache, out = self.compiled["decode"](self.state, self.cache, tokens.astype(np.int32), active,
                                                  *self._settings(settings, u))
        return StepOutput(*jax.device_get(out))
