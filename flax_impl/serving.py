"""A serving `Runner` (the Grok-1 runner): slots, continuous batching, per-request sampling.

Mirrors `torch_impl/serving.py`. The runner owns one KV cache of `num_slots` rows, each with its
own write position (`KVCache.length[slot]`). The requests admitted in one step are prefilled
together: their prompts, right-padded to the largest of their pad buckets, run through the
model in one forward pass on a cache of that many positions, and each row then replaces its
slot's row (every position: the rest is zeroed, so nothing of the slot's previous request
survives), with the slot's position set to its prompt length. One decode step then runs the
slots at once, each row at its own position with its own sampling settings: the first slots up
to the smallest row bucket holding every active one, attending only over the filled part of the
cache, the smallest key bucket holding every active row's next position (the buffers' first
rows and positions, sliced, written, and put back). The bookkeeping (queue, slots,
settings, lengths, the loop) is `weights.shared.serving.ServingLoop`.

Why the padded prompt positions do no harm: they are written at cache indices at or after the
prompt length, where no real query looks (the causal mask is by cache index), and each decode
step overwrites the index it attends from before it attends. Keys past the key bucket lie past
every active row's position, so the causal mask hides them anyway.

Token choice is `generate()`'s own functions (`sampling_weights`, `sample_from_weights`,
`greedy`, `token_scores`) on per-row settings; a request's noise is its own (`request_noise`),
so its tokens equal `generate()` on that request alone.

Compilation: one prefill program per (row count, pad bucket) — the admitted rows are padded to
a row bucket (by default powers of two and `num_slots`), the padding rows aimed at no slot —
and one decode program per (row count, key bucket), all compiled ahead of time when the
runner is built (`jax.jit(...).lower(...).compile()`, then run once, as XLA:CPU's first run of a
program pays a set-up), with a progress bar. Prompt lengths
within a bucket, slots and settings are values, not shapes, so calls never trace or compile
again; the cache buffers are donated, so each step updates them in place. With the layers
scanned (`DecoderModel.scan_layers`) every program reads one stack of their parameters, made when
the runner is built (and remade if the weights change), passed in as an argument; so do the
packed linears' `[out, in]` copies (`prepack_linears`) fresh when the runner is built.
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
from .layers.linear import linear_layers, linear_packs, reading_packed_linears
from .layers.precision import compute_dtype
from .model import reading_layer_stack, stack_layers

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
    sampling = do_sample.any()
    best = greedy(x, allowed)

    def model_distribution() -> tuple[jax.Array, ...]:
        # Greedy rows allowing every token hold the neutral settings (temperature 1, no filter):
        # their filtered distribution is the model's own, so its top-8 is the one token_scores
        # reports, and the filtered weights (a softmax and a top-8 over [R, V]) are not needed.
        chosen, top_ids, top_probs = token_scores(jax.nn.log_softmax(x, axis=-1), best)
        return best, chosen, top_ids, top_probs, top_ids, top_probs

    def filtered_distribution() -> tuple[jax.Array, ...]:
        weights = jax.lax.cond(
            use_filters, lambda: sampling_weights(x, temperature, top_k_value, top_p_value, allowed, allowed_first),
            lambda: sampling_weights(x, temperature, None, None, allowed, allowed_first))
        # Inverse-CDF sampling scans the vocabulary (a cumulative sum): skipped when every row is greedy.
        sampled = jax.lax.cond(sampling, lambda: sample_from_weights(weights, u), lambda: best)
        token = jnp.where(do_sample, sampled, best)
        chosen, top_ids, top_probs = token_scores(jax.nn.log_softmax(x, axis=-1), token)
        filtered, filtered_ids = top_k(weights / weights.sum(-1, keepdims=True), top_ids.shape[-1])
        return token, chosen, top_ids, top_probs, filtered_ids, filtered

    return jax.lax.cond(allowed.all() & ~sampling, model_distribution, filtered_distribution)


def _prefill_program(graphdef: nnx.GraphDef, state: nnx.State, layer_stack: nnx.State | None, packs: dict,
                     cache: KVCache, ids: jax.Array, positions: jax.Array, last: jax.Array, slots: jax.Array,
                     *settings: jax.Array) -> tuple[KVCache, tuple[jax.Array, ...]]:
    """Prefill `ids [R, L]` in one forward pass, row r into cache row `slots[r]` (a slot index
    past the cache is a padding row: dropped); each row's token chosen at its `last` position.
    `layer_stack`: the layers' stacked parameters when they are scanned (`Runner`), else None;
    `packs`: the packed linears' copies (`Runner._linear_packs`)."""
    model = nnx.merge(graphdef, state)
    rows = KVCache.init(model.config, ids.shape[0], ids.shape[1], dtype=cache.keys[0].dtype)
    with reading_layer_stack(model.model, layer_stack), reading_packed_linears(model, packs):
        out = model.model(ids, None, positions, rows, use_cache=True)
        hidden = jnp.take_along_axis(out.last_hidden_state, last[:, None, None], axis=1)
        logits = model.logits(hidden)[:, 0]
    rows = out.past_key_values
    pad = ((0, 0), (0, 0), (0, cache.capacity - ids.shape[1]), (0, 0))
    keys = tuple(k.at[slots].set(jnp.pad(r, pad), mode="drop") for k, r in zip(cache.keys, rows.keys))
    values = tuple(v.at[slots].set(jnp.pad(r, pad), mode="drop") for v, r in zip(cache.values, rows.values))
    cache = cache.replace(keys=keys, values=values, length=cache.length.at[slots].set(last + 1, mode="drop"))
    return cache, sample_rows(logits, *settings)


def _decode_program(key_length: int, graphdef: nnx.GraphDef, state: nnx.State, layer_stack: nnx.State | None,
                    packs: dict, cache: KVCache, tokens: jax.Array, lengths: jax.Array, active: jax.Array,
                    *settings: jax.Array) -> tuple[KVCache, tuple[jax.Array, ...]]:
    """One token for each of the first R slots (R = `tokens.shape[0]`), attending over the first
    `key_length` cache positions; only `active` slots move their position."""
    model = nnx.merge(graphdef, state)
    rows = tokens.shape[0]
    view = KVCache(tuple(k[:rows, :, :key_length] for k in cache.keys),
                   tuple(v[:rows, :, :key_length] for v in cache.values), lengths)
    with reading_layer_stack(model.model, layer_stack), reading_packed_linears(model, packs):
        out = model.model(tokens[:, None], None, lengths[:, None], view, use_cache=True)
        logits = model.logits(out.last_hidden_state)[:, 0]
    view = out.past_key_values
    # The written first rows and positions go back into the (donated) buffers, in place.
    keys = tuple(jax.lax.dynamic_update_slice(k, w, (0, 0, 0, 0)) for k, w in zip(cache.keys, view.keys))
    values = tuple(jax.lax.dynamic_update_slice(v, w, (0, 0, 0, 0)) for v, w in zip(cache.values, view.values))
    cache = cache.replace(keys=keys, values=values,
                          length=cache.length.at[:rows].set(jnp.where(active, lengths + 1, lengths)))
    return cache, sample_rows(logits, *settings)


class Runner(ServingLoop):
    """Continuous batching over `num_slots` slots of `max_len` positions with a `ForCausalLM`.

    `submit(Request(...)) -> id`, `step() -> [TokenEvent]`, `run(requests) -> iterator of
    TokenEvent (request id, token, log-prob, top-8)`. A prompt is padded to the smallest of
    `pad_buckets` that holds it; a decode step attends over the smallest of `key_buckets`
    (default: doubling from the smallest pad bucket to `max_len`) that holds every active row;
    the admitted rows of a prefill are padded to the smallest of `row_buckets` (default: powers
    of two and `num_slots`) that holds them, and a decode step runs the first slots up to the
    smallest row bucket holding every active one; `tokenizer` (`weights.tokenizer.load_tokenizer`) lets
    prompts be text. Every program is compiled here, with a progress bar when `progress`."""

    def __init__(self, model, num_slots: int, max_len: int, pad_buckets: Sequence[int] = DEFAULT_BUCKETS, *,
                 key_buckets: Sequence[int] | None = None, row_buckets: Sequence[int] | None = None, tokenizer=None,
                 progress: bool = False):
        config: ModelConfig = model.config
        check_runner_config(config, max_len)
        self.model = model
        self.dtype = model.model.dtype
        cdtype = np.float64 if compute_dtype(self.dtype) == jnp.float64 else np.float32
        super().__init__(num_slots, max_len, pad_buckets, config.vocab_size, cdtype, tokenizer, key_buckets,
                         row_buckets)
        self.cache = KVCache.init(config, self.num_slots, self.max_len, dtype=self.dtype)
        self.graphdef, self.state = nnx.split(model)
        # Scanned layers (`scan_layers`, as split here) read one stack of their parameters, made
        # here and remade only when the model's weights change (`_layer_stack`), not one per
        # program call: a copy per decode step would triple each step's weight traffic. It costs
        # one more copy of the layers' weights in memory while the runner lives.
        self.layer_variables = [v for layer in model.model.layers for _, v in nnx.to_flat_state(nnx.state(layer))]
        self.scanned = model.model.scan_layers
        self.stacked_from, self.layer_stack = [], None
        # Packed linears (`prepack_linears`) fresh when the runner is built are read by every
        # program, passed in as an argument whose structure the programs are compiled for; a
        # kernel changed later gets a new copy here (`_linear_packs`), as the stack does.
        self.packs = linear_packs(model)
        self.packed_layers = {key: layer for key, layer in linear_layers(model).items() if key in self.packs}
        self.packed_from = {key: layer.kernel.get_value() for key, layer in self.packed_layers.items()}
        self.compiled = {}
        s, v = self.num_slots, config.vocab_size
        settings = lambda r: (np.ones(r, cdtype), np.ones(r, np.int32), np.ones(r, cdtype), np.ones((r, v), bool),  # noqa: E731
                              np.zeros(r, bool), np.zeros(r, bool), np.zeros(r, cdtype))
        jobs = [((r, b), functools.partial(_prefill_program, self.graphdef),
                 (np.zeros((r, b), np.int32), np.zeros((r, b), np.int32), np.zeros(r, np.int32), np.zeros(r, np.int32))
                 + settings(r)) for r in self.row_buckets for b in self.pad_buckets]
        jobs += [(("decode", r, k), functools.partial(_decode_program, k, self.graphdef),
                  (np.zeros(r, np.int32), np.zeros(r, np.int32), np.zeros(r, bool)) + settings(r))
                 for r in self.row_buckets for k in self.key_buckets]
        for name, fn, args in tqdm(jobs, desc=f"compiling {len(jobs)} programs ({s} slots)", disable=not progress):
            self.compiled[name] = jax.jit(fn, donate_argnums=(3,)).lower(
                self.state, self._layer_stack(), self._linear_packs(), self.cache, *args).compile()
            # A program's first run pays a one-time set-up on XLA:CPU (measured: 0.3 to 1 s for the
            # bench's mid-size model): each runs once here, on dummy inputs, so no request pays it.
            self.cache, _ = self.compiled[name](self.state, self._layer_stack(), self._linear_packs(), self.cache,
                                                *args)
        self.cache = KVCache.init(config, self.num_slots, self.max_len, dtype=self.dtype)  # the dummy runs wrote in it

    def _layer_stack(self) -> nnx.State | None:
        """The layers' stacked parameters when they are scanned (else None), remade when any of
        them is no longer the array it was stacked from (the model's weights were changed)."""
        if not self.scanned:
            return None
        current = [v.get_value() for v in self.layer_variables]
        if len(current) != len(self.stacked_from) or any(a is not b for a, b in zip(current, self.stacked_from)):
            self.layer_stack = stack_layers(self.model.model.layers)
            self.stacked_from = current
        return self.layer_stack

    def _linear_packs(self) -> dict[str, dict[int, jax.Array]]:
        """The packed linears' `[out, in]` copies the programs were compiled with (`linear_packs`
        when the runner was built), a layer's made again when its kernel is no longer the array
        it was copied from (the model's weights were changed)."""
        for key, layer in self.packed_layers.items():
            kernel = layer.kernel.get_value()
            if kernel is not self.packed_from[key]:
                weight = jnp.transpose(kernel)
                self.packs[key] = {r: weight for r in self.packs[key]}
                self.packed_from[key] = kernel
        return self.packs

    def _settings(self, settings: SlotSettings, u: np.ndarray) -> tuple[np.ndarray, ...]:
        return (settings.temperature, settings.top_k.astype(np.int32), settings.top_p, settings.allowed,
                settings.allowed_first, settings.do_sample, u)

    def prefill(self, slots: np.ndarray, ids: np.ndarray, positions: np.ndarray, last: np.ndarray,
                settings: SlotSettings, u: np.ndarray) -> StepOutput:
        """Run the prompts `ids [R, L]` (right-padded) in one forward pass, row r into cache row
        `slots[r]`; each row's first token, read at its `last` position."""
        r = len(slots)
        # Shapes are static: pad the rows to a row bucket with copies of row 0, aimed at slot
        # `num_slots` (past the cache: their writes are dropped) and cut from the output.
        rows = min(b for b in self.row_buckets if b >= r)
        pad = lambda a: np.concatenate([a, np.repeat(a[:1], rows - r, axis=0)])  # noqa: E731
        index = np.concatenate([slots, np.full(rows - r, self.num_slots)]).astype(np.int32)
        self.cache, out = self.compiled[rows, ids.shape[1]](
            self.state, self._layer_stack(), self._linear_packs(), self.cache, pad(ids).astype(np.int32),
            pad(positions).astype(np.int32), pad(last).astype(np.int32), index, *map(pad, self._settings(settings, u)))
        return StepOutput(*(a[:r] for a in jax.device_get(out)))

    def decode(self, tokens: np.ndarray, lengths: np.ndarray, active: np.ndarray, key_length: int,
               settings: SlotSettings, u: np.ndarray) -> StepOutput:
        """One token for each of the first R slots (`tokens [R]`: each slot's last token, written
        at `lengths [R]`), attending over the first `key_length` cache positions; only `active`
        slots move on."""
        self.cache, out = self.compiled["decode", len(tokens), key_length](
            self.state, self._layer_stack(), self._linear_packs(), self.cache, tokens.astype(np.int32),
            lengths.astype(np.int32), active, *self._settings(settings, u))
        return StepOutput(*jax.device_get(out))
