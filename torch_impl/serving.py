"""A serving `Runner` (the Grok-1 runner): slots, continuous batching, per-request sampling.

Mirrors `flax_impl/serving.py`. The runner owns one KV cache of `num_slots` rows, each with its
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
    if use_filters:
        weights = sampling_weights(x, temperature, top_k_value, top_p_value, allowed, allowed_first)
    else:
        weights = sampling_weights(x, temperature, None, None, allowed, allowed_first)
    token = torch.where(do_sample, sample_from_weights(weights, u), greedy(x, allowed))
    chosen, top_ids, top_probs = token_scores(torch.log_softmax(x, dim=-1), token)
    filtered, filtered_ids = top_k(weights / weights.sum(-1, keepdim=True), top_ids.shape[-1])
    return token, chosen, top_ids, top_probs, filtered_ids, filtered


class Runner(ServingLoop):
    """Continuous batching over `num_slots` slots of `max_len` positions with a `ForCausalLM`.

    `submit(Request(...)) -> id`, `step() -> [TokenEvent]`, `run(requests) -> iterator of
    TokenEvent (request id, token, log-prob, top-8)`. A prompt is padded to the smallest of
    `pad_buckets` that holds it; `tokenizer` (`weights.tokenizer.load_tokenizer`) lets prompts be
    text. `progress` is accepted for the Flax twin's signature (nothing is compiled here)."""

    def __init__(self, model, num_slots: int, max_len: int, pad_buckets: Sequence[int] = DEFAULT_BUCKETS, *,
                 tokenizer=None, progress: bool = False):
        config: ModelConfig = model.config
        check_runner_config(config, max_len)
        self.model = model
        self.dtype = model.model.dtype
        self.device = next(model.parameters()).device
        cdtype = np.float64 if compute_dtype(self.dtype) == torch.float64 else np.float32
        super().__init__(num_slots, max_len, pad_buckets, config.vocab_size, cdtype, tokenizer)
        self.cache = KVCache.init(config, self.num_slots, self.max_len, dtype=self.dtype, device=self.device)

    def _settings(self, settings: SlotSettings, u: np.ndarray) -> tuple[torch.Tensor, ...]:
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        return (as_t(settings.temperature), as_t(settings.top_k.astype(np.int64)), as_t(settings.top_p),
                as_t(settings.allowed), as_t(settings.allowed_first), as_t(settings.do_sample), as_t(u))

    def prefill(self, slot: int, prompt: np.ndarray, bucket: int, settings: SlotSettings, u: np.ndarray
                ) -> StepOutput:
        """Run `prompt` (right-padded to `bucket`) into `slot`'s cache row; its first token."""
        p = prompt.size
        ids = np.zeros((1, bucket), np.int64)
        ids[0, :p] = prompt
        # Padded positions repeat the last real one: dynamic NTK rope reads max(position) + 1.
        positions = np.minimum(np.arange(bucket), p - 1)[None]
        with torch.inference_mode():
            row = KVCache.init(self.model.config, 1, self.max_len, dtype=self.dtype, device=self.device)
            out = self.model.model(torch.from_numpy(ids).to(self.device), None,
                                   torch.from_numpy(positions).to(self.device), row, use_cache=True)
            logits = self.model.logits(out.last_hidden_state[:, p - 1:p])[:, 0]
            for layer in range(len(self.cache.keys)):
                self.cache.keys[layer][slot] = row.keys[layer][0]
                self.cache.values[layer][slot] = row.values[layer][0]
            self.cache.length[slot] = p
            return StepOutput(*(t.cpu().numpy() for t in sample_rows(logits, *self._settings(settings, u))))

    def decode(self, tokens: np.ndarray, active: np.ndarray, settings: SlotSettings, u: np.ndarray) -> StepOutput:
        """One token for every slot (`tokens [S]`: each slot's last token); only `active` slots
        move their position."""
        with torch.inference_mode():
            length = self.cache.length.clone()
            out = self.model.model(torch.from_numpy(tokens[:, None]).to(self.device), None, length[:, None],
                                   self.cache, use_cache=True)
            self.cache.length = torch.where(torch.from_numpy(active).to(self.device), length + 1, length)
            logits = self.model.logits(out.last_hidden_state)[:, 0]
            return StepOutput(*(t.cpu().numpy() for t in sample_rows(logits, *self._settings(settings, u))))
