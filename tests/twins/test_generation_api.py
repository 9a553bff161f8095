"""The `generate()` arguments added with the serving runner: per-row temperature / top-k / top-p,
`num_return_sequences`, `bos_token_id`, `use_config_eos`, and the "grok" filter order. Each is
checked against an equivalent call without it, in both twins where the twins' code differs.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import flax_impl.generation as fg
import torch_impl.generation as tg
from tests.helpers.generation import run_both, twin_pair
from tests.helpers.numpy_reference import softmax
from weights.config import ModelConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = ModelConfig(vocab_size=29, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
IDS = np.array([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7], [0, 9, 8, 7, 6]])
MASK = (IDS != 0).astype(np.int64)
_PAIR = []


def pair():
    if not _PAIR:
        _PAIR.extend(twin_pair(CONFIG, dtype="float64"))
    return _PAIR


def torch_gen(ids, mask, **kw) -> np.ndarray:
    return tg.generate(pair()[0], None if ids is None else torch.from_numpy(ids),
                       None if mask is None else torch.from_numpy(mask), **kw).numpy()


def test_per_row_knobs_equal_each_rows_scalar_run():
    """Row b of a call with per-row (temperature, top-k, top-p) equals row b of the call with
    row b's values for every row (same seed, so the same noise), in both twins."""
    temps, ks, ps = [0.7, 1.0, 1.8], [None, 3, 10], [0.9, None, 0.5]
    kw = dict(max_new_tokens=8, do_sample=True, seed=4)
    t, f = run_both(pair(), IDS, MASK, temperature=temps, top_k=ks, top_p=ps, **kw)
    np.testing.assert_array_equal(t, f)
    for b in range(3):
        np.testing.assert_array_equal(t[b], torch_gen(IDS, MASK, temperature=temps[b], top_k=ks[b], top_p=ps[b], **kw)[b])
    with pytest.raises(ValueError, match="temperature: expected one value or 3"):
        torch_gen(IDS, MASK, temperature=[1.0, 2.0], **kw)


def test_num_return_sequences():
    """Sampling: n rows per prompt, adjacent, equal to repeating each prompt n times. Beam
    search: the n best finished hypotheses, the first of them the one `num_return_sequences=1`
    returns. Both twins agree."""
    kw = dict(max_new_tokens=6, do_sample=True, top_k=8, seed=11)
    t, f = run_both(pair(), IDS, MASK, num_return_sequences=2, **kw)
    np.testing.assert_array_equal(t, f)
    np.testing.assert_array_equal(t, torch_gen(np.repeat(IDS, 2, 0), np.repeat(MASK, 2, 0), **kw))
    beams = dict(max_new_tokens=5, num_beams=3, eos_token_id=2)
    t, f = run_both(pair(), IDS, MASK, num_return_sequences=2, **beams)
    np.testing.assert_array_equal(t, f)
    assert t.shape[0] == 6
    best = torch_gen(IDS, MASK, **beams)
    np.testing.assert_array_equal(t[::2, :best.shape[1]], best)
    assert not (t[::2] == t[1::2]).all(-1).any()  # two different hypotheses per prompt
    with pytest.raises(ValueError, match="greedy"):
        torch_gen(IDS, MASK, max_new_tokens=2, num_return_sequences=2)
    with pytest.raises(ValueError, match="more than num_beams"):
        torch_gen(IDS, MASK, max_new_tokens=2, num_beams=2, num_return_sequences=3)


def test_bos_and_config_eos():
    """No prompt: one row starting from the bos token (the config's, or the one given).
    `use_config_eos` stops at the config's eos exactly as passing it does; without it, None
    still means no row ever finishes."""
    kw = dict(max_new_tokens=12, do_sample=True, seed=2)
    np.testing.assert_array_equal(torch_gen(None, None, **kw), torch_gen(np.array([[1]]), None, **kw))
    np.testing.assert_array_equal(torch_gen(None, None, bos_token_id=5, **kw), torch_gen(np.array([[5]]), None, **kw))
    f = np.asarray(fg.generate(pair()[1], None, **kw))
    np.testing.assert_array_equal(f, torch_gen(None, None, **kw))
    with pytest.raises(ValueError, match="bos_token_id"):
        torch_gen(None, None, bos_token_id=99, **kw)
    eos = dict(max_new_tokens=30, do_sample=True, temperature=3.0, seed=1)
    np.testing.assert_array_equal(torch_gen(IDS, MASK, use_config_eos=True, **eos),
                                  torch_gen(IDS, MASK, eos_token_id=CONFIG.eos_token_id, **eos))
    assert torch_gen(IDS, MASK, **eos).shape[1] == IDS.shape[1] + 30


def grok_keep(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None,
              allowed: np.ndarray) -> np.ndarray:
    """The "grok" order read off its definition: the mask first, then top-k (fewer than k allowed
    tokens score strictly higher) and top-p (allowed tokens strictly more probable hold less than
    p of the allowed, top-k-kept mass) among the allowed tokens only."""
    s = logits / temperature
    keep = allowed.copy()
    if top_k is not None:
        higher = (s[:, None, :] > s[:, :, None]) & allowed[:, None, :]
        keep &= higher.sum(-1) < top_k
    if top_p is not None:
        q = np.where(keep, softmax(np.where(keep, s, -np.inf)), 0.0)
        more_probable_mass = np.where(q[:, None, :] > q[:, :, None], q[:, None, :], 0.0).sum(-1)
        keep &= more_probable_mass < top_p
    return keep


# Pinned: integer logits full of ties (odd seeds) with both filters, and normal logits with each
# filter alone; hypothesis then draws fewer examples of its own (each new top-k compiles jnp ops).
@example(1, 0.5, 3, 0.5)
@example(2, 2.0, None, 0.9)
@example(4, 1.0, 23, None)
@settings(max_examples=max(1, settings.default.max_examples // 2))
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.5, 1.0, 2.0]), st.one_of(st.none(), st.integers(1, 23)),
       st.one_of(st.none(), st.floats(0.05, 0.99)))
def test_grok_filter_order_keeps_what_its_definition_keeps(seed, temperature, top_k, top_p):
    rng = np.random.default_rng(seed)
    logits = rng.integers(-3, 3, (6, 24)).astype(np.float64) if seed % 2 else rng.normal(0, 2.0, (6, 24))
    allowed = rng.random((6, 24)) < 0.3
    allowed[np.arange(6), rng.integers(0, 24, 6)] = True
    want = grok_keep(logits, temperature, top_k, top_p, allowed)
    first = np.ones(6, bool)
    t_w = tg.sampling_weights(torch.from_numpy(logits), torch.tensor(temperature, dtype=torch.float64), top_k,
                              None if top_p is None else torch.tensor(top_p, dtype=torch.float64),
                              torch.from_numpy(allowed), torch.from_numpy(first))
    f_w = fg.sampling_weights(jnp.asarray(logits), jnp.asarray(temperature), None if top_k is None else np.int32(top_k),
                              None if top_p is None else jnp.asarray(top_p), jnp.asarray(allowed), jnp.asarray(first))
    np.testing.assert_array_equal(t_w.numpy() > 0, want)
    np.testing.assert_array_equal(np.asarray(f_w) > 0, want)


@example(1, 12, True)  # ties, beams-shaped input
@example(3, 1, False)  # ties, the best one only
@settings(max_examples=max(1, settings.default.max_examples // 2))
@given(st.integers(0, 2**32 - 1), st.integers(1, 12), st.booleans())
def test_torch_top_k_orders_ties_as_a_stable_sort(seed, k, beams):
    """The torch twin's `top_k` (`torch.topk` plus a tie fix) returns exactly what a stable
    descending sort does, ties to the lower index, as `jax.lax.top_k`; inputs full of ties."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.integers(-3, 3, (4, 30)).astype(np.float64) if seed % 2 else rng.normal(0, 1, (4, 30)))
    x[:, rng.random(30) < 0.2] = -torch.inf
    x = x.reshape(4, 3, 10) if beams else x
    k = min(k, x.shape[-1])
    values, indices = tg.top_k(x, k)
    want_v, want_i = torch.sort(x, dim=-1, descending=True, stable=True)
    assert torch.equal(values, want_v[..., :k]) and torch.equal(indices, want_i[..., :k])
    f_values, f_indices = fg.top_k(jnp.asarray(x.numpy()), k)
    np.testing.assert_array_equal(np.asarray(f_indices), indices.numpy())
