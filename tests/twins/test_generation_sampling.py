"""The sampler of both twins: a filtered-out token is never chosen, the kept set is what an
independent numpy reading of each filter's definition keeps, the twins pick the same token for
the same noise, and unfiltered sampling follows the model's distribution with fresh noise at
every step (chi-square).

The filter functions run eagerly on fixed shapes `[B, V]`, so the Flax side compiles each
primitive once for the whole test; hypothesis varies the values, the ties and the settings.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

import flax_impl.generation as fg
import torch_impl.generation as tg
from tests.helpers.generation import run_both, twin_pair, uncached_logits
from tests.helpers.numpy_reference import softmax
from tests.helpers.stats import chi2_sf, chi_square, chi_square_uniform
from weights.config import ModelConfig

B, V = 6, 24


def reference_keep(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None,
                   allowed: np.ndarray | None) -> np.ndarray:
    """The filters read off their definitions, token by token (not by sorting, as the twins do):
    top-k keeps a token when fewer than k tokens score strictly higher; top-p keeps a token when
    the tokens strictly more probable than it (after top-k, renormalised) hold less than p; the
    allowed mask is applied last, and a row it would empty keeps its best allowed token(s)."""
    s = logits / temperature
    keep = np.ones_like(s, dtype=bool)
    if top_k is not None:
        keep &= (s[:, None, :] > s[:, :, None]).sum(-1) < top_k
    if top_p is not None:
        q = np.where(keep, np.exp(s - s.max(-1, keepdims=True)), 0.0)
        q = q / q.sum(-1, keepdims=True)
        more_probable_mass = np.where(q[:, None, :] > q[:, :, None], q[:, None, :], 0.0).sum(-1)
        keep &= more_probable_mass < top_p
    if allowed is not None:
        best = np.where(allowed, s, -np.inf).max(-1, keepdims=True)
        fallback = allowed & (s == best)
        keep &= allowed
        keep = np.where(keep.any(-1, keepdims=True), keep, fallback)
    return keep


@st.composite
def sampler_cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        logits = rng.normal(0.0, draw(st.sampled_from([0.5, 2.0, 8.0])), (B, V))
    else:  # small integers: many exact ties at the top-k and top-p boundaries
        logits = rng.integers(-3, 3, (B, V)).astype(np.float64)
    allowed = None
    if draw(st.booleans()):
        allowed = rng.random((B, V)) < draw(st.sampled_from([0.05, 0.3, 0.8]))
        allowed[np.arange(B), rng.integers(0, V, B)] = True
    return dict(logits=logits, temperature=draw(st.sampled_from([0.3, 1.0, 2.5])),
                top_k=draw(st.one_of(st.none(), st.integers(1, V - 1))),
                top_p=draw(st.one_of(st.none(), st.floats(0.01, 0.999))), allowed=allowed, u=rng.random(B))


@given(sampler_cases())
def test_filtered_token_is_never_chosen(case):
    keep = reference_keep(case["logits"], case["temperature"], case["top_k"], case["top_p"], case["allowed"])
    scaled = case["logits"] / case["temperature"]
    want = np.where(keep, softmax(np.where(keep, scaled, -np.inf)), 0.0)  # the filtered distribution
    allowed = case["allowed"]
    t_w = tg.sampling_weights(torch.from_numpy(case["logits"]), torch.tensor(case["temperature"], dtype=torch.float64),
                              case["top_k"], None if case["top_p"] is None else torch.tensor(case["top_p"], dtype=torch.float64),
                              None if allowed is None else torch.from_numpy(allowed))
    f_w = fg.sampling_weights(jnp.asarray(case["logits"]), jnp.asarray(case["temperature"]),
                              None if case["top_k"] is None else np.int32(case["top_k"]),
                              None if case["top_p"] is None else jnp.asarray(case["top_p"]),
                              None if allowed is None else jnp.asarray(allowed))
    t_tok = tg.sample_from_weights(t_w, torch.from_numpy(case["u"])).numpy()
    f_tok = np.asarray(fg.sample_from_weights(f_w, jnp.asarray(case["u"])))
    for w in (t_w.numpy(), np.asarray(f_w)):
        np.testing.assert_array_equal(w > 0, keep)  # exactly the kept tokens carry weight
        np.testing.assert_allclose(w / w.sum(-1, keepdims=True), want, rtol=0, atol=1e-12)
    assert keep[np.arange(B), t_tok].all()  # a filtered-out token is never chosen
    np.testing.assert_array_equal(t_tok, f_tok)  # same noise, same token in both twins
    # Inverse CDF by its definition: the first token whose cumulative mass exceeds u.
    cdf = np.cumsum(want, -1)
    np.testing.assert_array_equal(t_tok, (cdf <= case["u"][:, None] * cdf[:, -1:]).sum(-1))
    if allowed is not None:  # greedy honours the mask too
        best = np.where(allowed, case["logits"], -np.inf).argmax(-1)
        np.testing.assert_array_equal(tg.greedy(torch.from_numpy(case["logits"]), torch.from_numpy(allowed)).numpy(), best)
        np.testing.assert_array_equal(np.asarray(fg.greedy(jnp.asarray(case["logits"]), jnp.asarray(allowed))), best)


def test_top_p_drops_the_token_whose_mass_before_equals_p():
    """The boundary of top-p, which random p never hits: a token is kept while the mass of the
    tokens before it is strictly below p (HF keeps the smallest set whose mass reaches p). p is set
    to the mass before the second token as each twin computes it (softmax, sort, cumsum), so the
    comparison meets equality exactly; only the most probable token may stay."""
    logits = np.random.default_rng(0).normal(0.0, 2.0, (B, V))  # distinct values: no ties at the top
    t_probs = torch.sort(torch.softmax(torch.from_numpy(logits), -1), -1, descending=True).values
    t_p = (torch.cumsum(t_probs, -1) - t_probs)[:, 1]
    f_probs = jnp.sort(jax.nn.softmax(jnp.asarray(logits), axis=-1), axis=-1, descending=True)
    f_p = (jnp.cumsum(f_probs, axis=-1) - f_probs)[:, 1]
    t_keep = tg.filter_mask(torch.from_numpy(logits), None, t_p, None).numpy()
    f_keep = np.asarray(fg.filter_mask(jnp.asarray(logits), None, f_p, None))
    best = np.eye(V, dtype=bool)[logits.argmax(-1)]
    np.testing.assert_array_equal(t_keep, best)
    np.testing.assert_array_equal(f_keep, best)


def test_chi2_sf_known_values():
    # Critical values of the chi-square table: P(X >= 3.841 | df 1) = 0.05, P(X >= 18.307 | df 10) = 0.05,
    # P(X >= 29.588 | df 10) = 0.001; and df 2 is exponential: P(X >= s) = exp(-s / 2).
    assert abs(chi2_sf(3.841459, 1) - 0.05) < 1e-6
    assert abs(chi2_sf(18.307038, 10) - 0.05) < 1e-6
    assert abs(chi2_sf(29.588298, 10) - 0.001) < 1e-7
    assert abs(chi2_sf(7.0, 2) - math.exp(-3.5)) < 1e-12


def test_unfiltered_sampling_follows_the_model_distribution():
    """top_p=1, top_k=None, temperature=1: 4000 rows with one prompt each draw 3 tokens.

    Step 0's counts must fit the model's softmax (chi-square, p > 0.001), and must not fit the
    same model at temperature 2 (the test can tell distributions apart). Every step must draw
    fresh noise: mapping each token to a uniform inside its slice of the inverse CDF it was drawn
    from (the probability integral transform, with its own fixed random offset) must give
    numbers uniform and independent from one step to the next (6 x 6 grid, p > 0.001), which
    noise reused across steps (each row's tokens then share one uniform) cannot."""
    config = ModelConfig(vocab_size=12, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, initializer_range=0.5)
    pair = twin_pair(config, dtype="float64")
    n, steps = 4000, 3
    ids = np.tile(np.array([[3, 1, 4]]), (n, 1))
    p = ids.shape[1]
    t, f = run_both(pair, ids, np.ones_like(ids), max_new_tokens=steps, do_sample=True, seed=1234,
                    temperature=1.0, top_k=None, top_p=1.0)
    np.testing.assert_array_equal(t, f)
    counts = np.bincount(t[:, p], minlength=config.vocab_size)
    logits = uncached_logits(pair[0], t, np.ones_like(ids))
    stat, df = chi_square(counts, softmax(logits[0, p - 1]))
    p_value = chi2_sf(stat, df)
    print(f"chi-square {stat:.1f} on {df} df, p = {p_value:.3f}")
    assert p_value > 1e-3
    wrong_stat, wrong_df = chi_square(counts, softmax(logits[0, p - 1] / 2.0))
    assert chi2_sf(wrong_stat, wrong_df) < 1e-6
    # Inverse CDF in vocabulary order: token k was drawn by a u in [F(k - 1), F(k)).
    probs = softmax(logits[:, p - 1:-1])  # [n, steps, V]: the distribution of each new token
    tokens = t[:, p:, None]
    upper = np.take_along_axis(np.cumsum(probs, -1), tokens, -1)[..., 0]
    lower = upper - np.take_along_axis(probs, tokens, -1)[..., 0]
    v = lower + np.random.default_rng(0).random(lower.shape) * (upper - lower)
    for i in range(steps - 1):
        stat, df = chi_square_uniform(v[:, i:i + 2], 6)
        assert chi2_sf(stat, df) > 1e-3, f"steps {i} and {i + 1}: chi-square {stat:.1f} on {df} df"
