"""Explicit examples that every run of the property tests includes (`@example(case=...)`).

Hypothesis under the CI profile draws 10 derandomised examples per test, seeded by the test's
source, and its first ones are the simplest values (one token, one head, no padding), where
rotary, the causal mask, softmax and the next-token loss are vacuous. These pins keep the cases
that matter in every run, whatever the draws: dynamic rope past `max_position_embeddings`,
grouped kv heads with several tokens, left and right padding in one batch, the family switches
that bite (windows shorter than the sequence, caps, experts), and every head.
"""

from __future__ import annotations

import numpy as np

from parity.inputs import Batch, head_labels
from parity.strategies import family_examples
from weights.config import ModelConfig, RopeScaling

__all__ = ["PINS", "pinned_batch"]


def pinned_batch(config: ModelConfig, paddings: tuple[tuple[str, int], ...], seq_len: int,
                 start: int | None = None, seed: int = 0) -> Batch:
    """A batch with one row per `(side, pad slots)` of `paddings` ("left", "right" or "none"),
    position ids `start, start + 1, ...` when `start` is given, and labels for every head."""
    rng = np.random.default_rng(seed)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    real = [v for v in range(config.vocab_size) if v != pad]
    b = len(paddings)
    mask = np.ones((b, seq_len), np.int64)
    for row, (side, n) in enumerate(paddings):
        if side == "left":
            mask[row, :n] = 0
        elif side == "right":
            mask[row, seq_len - n:] = 0
    ids = np.where(mask == 1, rng.choice(real, (b, seq_len)), pad).astype(np.int64)
    pos = None if start is None else np.broadcast_to(start + np.arange(seq_len), (b, seq_len)).copy()
    return Batch(ids, mask, pos, padding=tuple(side for side, _ in paddings), **head_labels(config, mask, ids, rng))


_TINY = dict(vocab_size=40, hidden_size=32, intermediate_size=20, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, num_labels=3, initializer_range=0.2)
_BOTH_SIDES = (("left", 2), ("right", 3), ("none", 0))
_FAMILY = family_examples()

# Positions 12..18 with max_position_embeddings 16: the NTK base is recomputed for length 19.
_DYNAMIC = ModelConfig(**_TINY, max_position_embeddings=16, rope_scaling=RopeScaling("dynamic", factor=2.0))
# Llama 3 rope (every frequency band), q/k/v/o and MLP biases, 4 query heads on 2 kv heads.
_LLAMA3 = ModelConfig(**_TINY, max_position_embeddings=64, rope_theta=500000.0, attention_bias=True, mlp_bias=True,
                      rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=16))

PINS: dict[str, tuple[ModelConfig, Batch]] = {
    "dynamic_past_max": (_DYNAMIC, pinned_batch(_DYNAMIC, (("left", 2), ("right", 1)), 7, start=12)),
    # One row left-padded, one right-padded, one full.
    "llama3_gqa_both_sides": (_LLAMA3, pinned_batch(_LLAMA3, _BOTH_SIDES, 9, start=30, seed=1)),
    # Gemma 2: window 3 of 9 slots on layer 0, caps that bite, query scalar, sandwich norms, 1 + w.
    "gemma2": (_FAMILY["gemma2"], pinned_batch(_FAMILY["gemma2"], _BOTH_SIDES, 9, seed=2)),
    # Mixtral: 4 experts, top-2, window 5, router logits and the load-balancing loss.
    "mixtral": (_FAMILY["mixtral"], pinned_batch(_FAMILY["mixtral"], _BOTH_SIDES, 9, seed=3)),
    # Qwen2: window 4 from layer 1 on (max_window_layers 1), q/k/v bias without o bias, tied head.
    "qwen2": (_FAMILY["qwen2"], pinned_batch(_FAMILY["qwen2"], _BOTH_SIDES, 9, seed=4)),
    # Gemma: exact GELU, sqrt(E) embeddings, 1 + w norms.
    "gemma": (_FAMILY["gemma"], pinned_batch(_FAMILY["gemma"], (("left", 3), ("right", 2)), 8, seed=5)),
}
