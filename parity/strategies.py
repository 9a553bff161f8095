"""Hypothesis strategies for twinlm: configs, input batches and dtypes, as a public API.

A user's own CI can draw from these to test a model change:

    from hypothesis import given
    from parity import strategies as tst

    @given(tst.configs(), tst.data())
    def test_mine(config, data): batch = data.draw(tst.batches(config)); ...

Configs stay tiny (a forward pass in milliseconds) but cover every switch: MHA/GQA/MQA, head
dims decoupled from the width, every rope scaling, biases, tied embeddings, activations, and
position ids far from 0 (rotary bugs hide at short positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from hypothesis.strategies import data  # re-exported for `@given(..., tst.data())`

from weights.config import ACTIVATIONS, ModelConfig, RopeScaling

__all__ = ["Batch", "batches", "configs", "data", "dtypes", "rope_scalings"]


@st.composite
def rope_scalings(draw, max_position_embeddings: int) -> RopeScaling | None:
    """None or one of the rotary scalings with valid parameters."""
    kind = draw(st.sampled_from(["none", "default", "linear", "dynamic", "llama3"]))
    if kind == "none":
        return None
    if kind == "default":
        return RopeScaling("default")
    factor = draw(st.sampled_from([1.0, 2.0, 4.0, 8.0]))
    if kind in ("linear", "dynamic"):
        return RopeScaling(kind, factor=factor)
    low = draw(st.sampled_from([0.5, 1.0, 2.0]))
    high = low * draw(st.sampled_from([2.0, 4.0]))
    orig = draw(st.sampled_from([max(4, max_position_embeddings // 4), max_position_embeddings]))
    return RopeScaling("llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                       original_max_position_embeddings=orig)


@st.composite
def configs(draw, max_layers: int = 2, families: bool = True) -> ModelConfig:
    """A tiny valid `ModelConfig` drawn across every switch the twins support."""
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0]))
    head_dim = draw(st.sampled_from([2, 4, 8, 16]))
    decoupled = draw(st.booleans())  # head_dim independent of hidden_size / heads
    hidden = draw(st.sampled_from([8, 16, 24])) if decoupled else heads * head_dim
    max_pos = draw(st.sampled_from([32, 256, 2048, 4096]))
    vocab = draw(st.integers(8, 64))
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=draw(st.sampled_from([8, 20, 32])),
        num_hidden_layers=draw(st.integers(1, max_layers)),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim if decoupled else draw(st.sampled_from([None, head_dim])),
        hidden_act=draw(st.sampled_from(ACTIVATIONS)),
        max_position_embeddings=max_pos,
        rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])),
        rope_theta=draw(st.sampled_from([10000.0, 500000.0])),
        rope_scaling=draw(rope_scalings(max_pos)),
        attention_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
        initializer_range=draw(st.sampled_from([0.02, 0.2])),
        pad_token_id=draw(st.one_of(st.none(), st.integers(0, vocab - 1))),
        num_labels=draw(st.integers(1, 4)),
    )


@dataclass(frozen=True)
class Batch:
    """One batch of inputs as numpy arrays (framework-neutral); padding rows carry `pad_id`."""

    input_ids: np.ndarray  # [B, T] int64
    attention_mask: np.ndarray  # [B, T] int64, 1 = real token
    position_ids: np.ndarray | None  # [B, T] int64 or None for the default arange
    labels: np.ndarray  # [B, T] int64 causal-LM labels (-100 where padded)


@st.composite
def batches(draw, config: ModelConfig, max_batch: int = 3, max_len: int = 10,
            far_positions: bool = True) -> Batch:
    """Token ids with left, right or no padding per row, and position ids that may start far
    from 0 (up to `max_position_embeddings`, past it for dynamic rope)."""
    b = draw(st.integers(1, max_batch))
    t = draw(st.integers(1, max_len))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    # Real tokens avoid the pad id, so pooling by pad id finds exactly the padding.
    real = [v for v in range(config.vocab_size) if v != pad_id] or [0]
    ids = rng.choice(real, size=(b, t)).astype(np.int64)
    mask = np.ones((b, t), np.int64)
    for row in range(b):
        side = draw(st.sampled_from(["none", "left", "right"])) if config.pad_token_id is not None else "none"
        n_pad = draw(st.integers(0, t - 1)) if side != "none" else 0
        if side == "left":
            mask[row, :n_pad] = 0
        elif side == "right" and n_pad:
            mask[row, t - n_pad:] = 0
    ids = np.where(mask == 1, ids, pad_id)
    position_ids = None
    if far_positions and draw(st.booleans()):
        limit = config.max_position_embeddings + (64 if config.rope.rope_type == "dynamic" else 0)
        start = draw(st.integers(0, max(0, limit - t)))
        position_ids = np.broadcast_to(start + np.arange(t, dtype=np.int64), (b, t)).copy()
    labels = np.where(mask == 1, ids, -100)
    return Batch(ids, mask, position_ids, labels)


def dtypes(include_half: bool = True) -> st.SearchStrategy[str]:
    """dtype names: float64 and float32, and bfloat16 / float16 when `include_half`."""
    names = ["float64", "float32"] + (["bfloat16", "float16"] if include_half else [])
    return st.sampled_from(names)
