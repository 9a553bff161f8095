"""A serving `Runner` (the Grok-1 runner): slots, continuous batching, per-request sampling.

Mirrors `flax_impl/serving.py`. The runner owns one KV cache of `num_slots` rows, each with its
own write position (`KVCache.length[slot]`). The requests admitted in one step are prefilled
together: their prompts, right-padded to the largest of their pad buckets, run through the
model in one forward pass on a cache of that many positions, and each row then replaces its
slot's row (every position: the rest is zeroed, so nothing of the slot's previous request
survives), with the slot's position set to its prompt length. One decode step then runs the
slots at once, each row at its own position with its own sampling settings: the first slots up
to the smallest row bucket holding every active one, attending only over the filled part of the
cache, the smallest key bucket holding every active row's next position (a view of the first
rows and positions of each buffer, written through in place). The bookkeeping
(queue, slots, settings, lengths, the loop) is `weights.shared.serving.ServingLoop`.

Why the padded prompt positions do no harm: they are written at cache indices at or after the
prompt length, where no real query looks (the causal mask is by cache index), and each decode
step overwrites the index it attends from before it attends. Keys past the key bucket lie past
every active row's position, so the causal mask hides them anyway.

Token choice is `generate()`'s own functions (`sampling_weights`, `sample_from_weights`,
`greedy`, `token_scores`) on per-row settings; a request's noise is its own (`request_noise`),
so its tokens equal `generate()` on that request alone.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from weights.config import ModelConfig
from weights.shared.serving import DEFAULT_BUCKETS, ServingLoop, SlotSettings, StepOutput, check_runner_config

from .generation import greedy, sample_from_weights, sampling_weights, token_scores, top_k
from .layers.attention import KVCache
from .layers.precision import compute_dtype

__all__ = ["Runner", "sample_rows"]


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k_value: torch.Tensor, top_p_value: torch.Tensor,
                allowed: torch.Tensor, allowed_first: torch.Tensor, do_sample: torch.Tensor, u: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
    """Each row's token from `logits [R, V]` with its own settings (`[R]`, `allowed [R, V]`):
    sampled rows by inverse CDF with `u [R]`, the others greedy. Returns (token, its log-prob,
    top-8 ids and probabilities of the model's distribution, top-8 of the filtered one)."""
    x = logits.to(compute_dtype(logits.dtype))
    # top-k and top-p sort the vocabulary: skipped when no row asks for them (k = V, p = 1 keep all).
    use_filters = bool((top_k_value < x.shape[-1]).any() | (top_p_value < 1.0).any())
    # Applying the allowed-token mask takes a dozen passes over [R, V], each an eager kernel (at
    # 8 x 32k, 12 ms of a ~95 ms decode step): skipped when every row allows every token.
    mask = allowed if bool((~allowed).any()) else None
    sampling = bool(do_sample.any())
    best = greedy(x, mask)

    def model_distribution() -> tuple[torch.Tensor, ...]:
        # Greedy rows allowing every token hold the neutral settings (temperature 1, no filter):
        # their filtered distribution is the model's own, so its top-8 is the one token_scores
        # reports, and the filtered weights (a softmax and a top-8 over [R, V], 3 ms of a 50 ms
        # packed decode step at 8 x 32k) are not needed.
        chosen, top_ids, top_probs = token_scores(torch.log_softmax(x, dim=-1), best)
        return best, chosen, top_ids, top_probs, top_ids, top_probs

    def filtered_distribution() -> tuple[torch.Tensor, ...]:
        if use_filters:
            weights = sampling_weights(x, temperature, top_k_value, top_p_value, mask, allowed_first)
        else:
            weights = sampling_weights(x, temperature, None, None, mask, allowed_first)
        # Inverse-CDF sampling scans the vocabulary (a cumulative sum): skipped when every row is greedy.
        sampled = sample_from_weights(weights, u) if sampling else best
        token = torch.where(do_sample, sampled, best)
        chosen, top_ids, top_probs = token_scores(torch.log_softmax(x, dim=-1), token)
        filtered, filtered_ids = top_k(weights / weights.sum(-1, keepdim=True), top_ids.shape[-1])
        return token, chosen, top_ids, top_probs, filtered_ids, filtered

    return model_distribution() if mask is None and not sampling else filtered_distribution()


class Runner(ServingLoop):
    """Continuous batching over `num_slots` slots of `max_len` positions with a `ForCausalLM`.

    `submit(Request(...)) -> id`, `step() -> [TokenEvent]`, `run(requests) -> iterator of
    TokenEvent (request id, token, log-prob, top-8)`. A prompt is padded to the smallest of
    `pad_buckets` that holds it; a decode step attends over the smallest of `key_buckets`
    (default: doubling from the smallest pad bucket to `max_len`) that holds every active row,
    and runs the first slots up to the smallest of `row_buckets` (default: powers of two and
    `num_slots`) holding every active one; `tokenizer` (`weights.tokenizer.load_tokenizer`) lets
    prompts be text. `progress` is accepted for the Flax twin's signature (nothing is compiled
    here: a prefill runs on exactly the admitted rows)."""

    def __init__(self, model, num_slots: int, max_len: int, pad_buckets: Sequence[int] = DEFAULT_BUCKETS, *,
                 key_buckets: Sequence[int] | None = None, row_buckets: Sequence[int] | None = None, tokenizer=None,
                 progress: bool = False):
        config: ModelConfig = model.config
        check_runner_config(config, max_len)
        self.model = model
        self.dtype = model.model.dtype
        self.device = next(model.parameters()).device
        cdtype = np.float64 if compute_dtype(self.dtype) == torch.float64 else np.float32
        super().__init__(num_slots, max_len, pad_buckets, config.vocab_size, cdtype, tokenizer, key_buckets,
                         row_buckets)
        self.cache = KVCache.init(config, self.num_slots, self.max_len, dtype=self.dtype, device=self.device)

    def _settings(self, settings: SlotSettings, u: np.ndarray) -> tuple[torch.Tensor, ...]:
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        return (as_t(settings.temperature), as_t(settings.top_k.astype(np.int64)), as_t(settings.top_p),
                as_t(settings.allowed), as_t(settings.allowed_first), as_t(settings.do_sample), as_t(u))

    def prefill(self, slots: np.ndarray, ids: np.ndarray, positions: np.ndarray, last: np.ndarray,
                settings: SlotSettings, u: np.ndarray) -> StepOutput:
        """Run the prompts `ids [R, L]` (right-padded) in one forward pass, row r into cache row
        `slots[r]`; each row's first token, read at its `last` position."""
        as_t = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        index = as_t(slots)
        with torch.inference_mode():
            rows = KVCache.init(self.model.config, ids.shape[0], ids.shape[1], dtype=self.dtype, device=self.device)
            out = self.model.model(as_t(ids), None, as_t(positions), rows, use_cache=True)
            hidden = out.last_hidden_state[torch.arange(ids.shape[0], device=self.device), as_t(last)]
            logits = self.model.logits(hidden[:, None])[:, 0]
            for layer in range(len(self.cache.keys)):
                for full, row in ((self.cache.keys[layer], rows.keys[layer]), (self.cache.values[layer], rows.values[layer])):
                    full[index, :, :ids.shape[1]] = row
                    full[index, :, ids.shape[1]:] = 0
            self.cache.length[index] = as_t(last) + 1
            return StepOutput(*(t.cpu().numpy() for t in sample_rows(logits, *self._settings(settings, u))))

    def decode(self, tokens: np.ndarray, lengths: np.ndarray, active: np.ndarray, key_length: int,
               settings: SlotSettings, u: np.ndarray) -> StepOutput:
        """One token for each of the first R slots (`tokens [R]`: each slot's last token, written
        at `lengths [R]`), attending over the first `key_length` cache positions; only `active`
        slots move on."""
        as_t = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        rows, length = len(tokens), as_t(lengths)
        with torch.inference_mode():
            # Views of the buffers' first rows and positions: the model's writes land in the cache itself.
            view = KVCache([k[:rows, :, :key_length] for k in self.cache.keys],
                           [v[:rows, :, :key_length] for v in self.cache.values], length)
            out = self.model.model(as_t(tokens[:, None]), None, length[:, None], view, use_cache=True)
            self.cache.length[:rows] = torch.where(as_t(active), length + 1, length)
            logits = self.model.logits(out.last_hidden_state)[:, 0]
            return StepOutput(*(t.cpu().numpy() for t in sample_rows(logits, *self._settings(settings, u))))
