"""Hypothesis strategies for Transformer-VQ configs and inputs (public, for users' own CI).

They respect the model's constraints: the block length divides the sequence, mem_len >= 1, the
width is even, and codebooks are continuous random draws (distinct rows, so no argmin near-tie flips a code between the twins)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from weights.vq.config import TransformerVQConfig

__all__ = ["fixture_config", "divisors", "vq_configs"]


def fixture_config(**changes: Any) -> TransformerVQConfig:
    """The official test fixture's shape (tests/common.py there) at w = 2, in float64:
    E = d_k = 8, d_v = 16, H = 2, C = 8, two layers, V = 10, abs PE, lambda = 1e4, no dropout,
    beta = 0.02, gamma = 0.99, tied, pre-LN logits, gradients through the cache."""
    base: dict[str, Any] = dict(
        param_dtype="float64", dtype="float64", d_model=8, d_k=8, d_v=16, n_head=2, n_code=8,
        n_layer=2, n_vocab=10, pe_abs=True, pe_lam=1e4, c_beta=0.02, c_gamma=0.99, e_tie=True,
        e_preln=True, grad_thru_cache=True, agg_cache=True, sequence_len=12, update_len=12,
        block_len=4, mem_len=3, global_batch_size=2)
    base.update(changes)
    return TransformerVQConfig(**base)


def divisors(n: int) -> list[int]:
    """Every block length that divides a sequence of n tokens."""
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def vq_configs(draw, max_len: int = 12, max_layers: int = 2) -> TransformerVQConfig:
    """A small float64 config with sequence_len = update_len = P and a block length dividing it."""
    seq = draw(st.integers(1, max_len))
    return fixture_config(
        d_model=2 * draw(st.integers(1, 4)),
        d_k=draw(st.integers(1, 6)),
        d_v=draw(st.integers(1, 6)),
        n_head=draw(st.integers(1, 2)),
        n_code=draw(st.integers(2, 8)),
        n_layer=draw(st.integers(1, max_layers)),
        n_vocab=draw(st.integers(2, 12)),
        mem_len=draw(st.integers(1, 6)),
        sequence_len=seq, update_len=seq, block_len=draw(st.sampled_from(divisors(seq))),
        agg_cache=draw(st.booleans()), pe_abs=draw(st.booleans()), e_tie=draw(st.booleans()),
        e_preln=draw(st.booleans()), e_scale=draw(st.sampled_from([1.0, 0.5])),
    )
