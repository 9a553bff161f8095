"""Independent witnesses for the numpy code both twins share (`weights/shared/`).

A bug there is made identically in both twins, so twin parity cannot see it; each function is
held here to its definition, written out again without its code:

- rotary frequencies (default, linear, dynamic NTK past `max_position_embeddings`, llama3's
  three bands) against `tests/helpers/numpy_reference.inv_freq` (HF `modeling_rope_utils` and
  Meta's `apply_scaling`, one frequency at a time), and against transformers' own functions;
- `position_ids_from_mask` re-derived by counting real tokens;
- the pad-token fallback of `prepare_generation` (HF: the first eos token);
- the sampling noise: uniform, and independent across steps, rows and seeds (chi-square).

These are numpy-only and take milliseconds, so the properties run 10x the profile's examples.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.helpers import numpy_reference as ref
from tests.helpers.stats import chi2_sf, chi_square_uniform
from tests.helpers.transformers import require_transformers
from weights.config import ModelConfig, RopeScaling
from weights.shared.generation import position_ids_from_mask, prepare_generation, sampling_noise
from weights.shared.rope import rope_frequencies

CHEAP = settings(max_examples=10 * settings.default.max_examples)


# ---- rotary frequencies ------------------------------------------------------------------------

def rope_config(head_dim: int, theta: float, max_pos: int, scaling: RopeScaling | None) -> ModelConfig:
    return ModelConfig(vocab_size=8, hidden_size=2 * head_dim, intermediate_size=8, num_hidden_layers=1,
                       num_attention_heads=2, head_dim=head_dim, max_position_embeddings=max_pos, rope_theta=theta,
                       rope_scaling=scaling)


@st.composite
def rope_cases(draw) -> tuple[ModelConfig, int | None]:
    head_dim = draw(st.sampled_from([8, 4, 16, 64, 128]))
    max_pos = draw(st.sampled_from([16, 256, 2048, 8192]))
    kind = draw(st.sampled_from(["dynamic", "llama3", "linear", "default", None]))
    factor = draw(st.sampled_from([2.0, 4.0, 8.0, 1.0]))
    if kind in ("dynamic", "linear"):
        scaling = RopeScaling(kind, factor=factor)
    elif kind == "llama3":
        low = draw(st.sampled_from([1.0, 0.5, 2.0]))
        scaling = RopeScaling("llama3", factor=factor, low_freq_factor=low, high_freq_factor=low * draw(st.sampled_from([4.0, 2.0])),
                              original_max_position_embeddings=draw(st.sampled_from([max_pos, max(4, max_pos // 4)])))
    else:
        scaling = None if kind is None else RopeScaling("default")
    theta = draw(st.sampled_from([10000.0, 500000.0, 1e6]))
    # Lengths past max_position_embeddings first (where dynamic NTK changes the base), then any.
    seq_len = draw(st.one_of(st.integers(max_pos + 1, 4 * max_pos), st.none(), st.integers(1, max_pos)))
    return rope_config(head_dim, theta, max_pos, scaling), seq_len


LLAMA31 = rope_config(128, 500000.0, 131072, RopeScaling("llama3", factor=8.0, low_freq_factor=1.0,
                                                         high_freq_factor=4.0, original_max_position_embeddings=8192))
DYNAMIC = rope_config(8, 10000.0, 16, RopeScaling("dynamic", factor=2.0))


@example(case=(DYNAMIC, 3 * 16))
@example(case=(LLAMA31, None))
@CHEAP
@given(case=rope_cases())
def test_rope_frequencies_equal_their_definitions(case):
    config, seq_len = case
    inv_freq, scaling = rope_frequencies(config, seq_len)
    expected = ref.inv_freq(config, seq_len or 0)
    assert scaling == 1.0 and inv_freq.dtype == np.float64
    np.testing.assert_allclose(inv_freq, expected, rtol=1e-13, atol=0)


def test_llama3_example_spans_all_three_bands():
    """Llama 3.1's own parameters put frequencies in each of llama3's three bands (kept, slowed,
    interpolated), so the pinned example above exercises every branch."""
    r = LLAMA31.rope_scaling
    wavelength = 2 * math.pi * 500000.0 ** (np.arange(0, 128, 2) / 128)
    kept = wavelength < r.original_max_position_embeddings / r.high_freq_factor
    slowed = wavelength > r.original_max_position_embeddings / r.low_freq_factor
    assert kept.any() and slowed.any() and (~kept & ~slowed).any()


@pytest.mark.parametrize("config, seq_len", [
    (DYNAMIC, 48), (DYNAMIC, 16), (LLAMA31, None),
    (rope_config(16, 10000.0, 64, RopeScaling("linear", factor=4.0)), None),
    (rope_config(64, 1e6, 256, RopeScaling("dynamic", factor=8.0)), 1000),
], ids=["dynamic-past-max", "dynamic-at-max", "llama3.1", "linear", "dynamic-d64"])
def test_rope_frequencies_equal_transformers(config, seq_len):
    """transformers' own `ROPE_INIT_FUNCTIONS` agree to float32 rounding: they compute in float32,
    where llama3's interpolated band compounds a few roundings (measured 3.2e-7 relative at
    Llama 3.1's band edge, 2.7 float32 ulp); the bound 1e-6 is 8 ulp."""
    transformers = require_transformers()
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    r = config.rope_scaling
    params = {"rope_type": r.rope_type, "rope_theta": config.rope_theta,
              **{k: v for k, v in r.to_hf_dict().items() if k not in ("rope_type", "type")}}
    hf_config = transformers.LlamaConfig(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                                         head_dim=config.resolved_head_dim, rope_parameters=params,
                                         max_position_embeddings=config.max_position_embeddings)
    theirs, _ = ROPE_INIT_FUNCTIONS[r.rope_type](hf_config, None, seq_len=seq_len)
    ours, _ = rope_frequencies(config, seq_len)
    np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=1e-6, atol=0)


# ---- position ids from a padding mask ----------------------------------------------------------

@example(mask=np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
@CHEAP
@given(mask=st.lists(st.lists(st.integers(0, 1), min_size=6, max_size=6), min_size=1, max_size=4).map(np.array))
def test_position_ids_count_real_tokens(mask):
    """`position_ids_from_mask` (both twins' generate and the parity inputs): a real token's
    position is the count of real tokens before it; left pads get 0, right pads repeat the last
    position (documented: any value works there, the slots are masked)."""
    pos = position_ids_from_mask(mask)
    assert pos.dtype == np.int64
    np.testing.assert_array_equal(pos, ref.counted_positions(mask))


# ---- the pad-token fallback ----------------------------------------------------------------------

@pytest.mark.parametrize("eos, pad, expected", [
    ([7, 3], None, 7),  # HF: the first eos token, in the order given
    (5, None, 5),
    (None, None, 0),  # no eos: no row ever finishes; pad is never written
    ([7, 3], 4, 4),  # an explicit pad token wins
])
def test_pad_token_falls_back_to_the_first_eos(eos, pad, expected):
    config = rope_config(2, 10000.0, 16, None)  # vocabulary 8: every id above fits
    options = prepare_generation(
        np.array([[1, 2]]), None, config, max_new_tokens=2, do_sample=False, temperature=1.0, top_k=None, top_p=None,
        allowed_tokens=None, num_beams=1, early_stopping=False, eos_token_id=eos, pad_token_id=pad,
        return_scores=False).options
    assert options.pad_token_id == expected
    assert options.eos_token_ids == (() if eos is None else tuple(np.atleast_1d(eos).tolist()))


# ---- sampling noise --------------------------------------------------------------------------------

def test_sampling_noise_is_uniform_and_independent_across_steps_rows_and_seeds():
    """The only randomness of sampling. For 4 seeds x 8 steps x 500 rows: the values are uniform
    (20 bins), and the pairs (step i, step i + 1), (row b, row b + 1) and (seed s, seed s + 1)
    at the same place are uniform on a 6 x 6 grid, i.e. independent (chi-square, p > 1e-3 each;
    the seeds are fixed, so the verdict is too). Noise reused across steps, rows or seeds puts
    every pair on the diagonal: p ~ 0."""
    noise = np.stack([sampling_noise(seed, 8, 500) for seed in range(4)])  # [seed, step, row]
    assert noise.shape == (4, 8, 500) and noise.dtype == np.float64
    assert noise.min() >= 0.0 and noise.max() < 1.0
    np.testing.assert_array_equal(sampling_noise(2, 8, 500), noise[2])  # a seed is a seed
    pairs = {
        "values": (noise.reshape(-1, 1), 20),
        "steps": (np.stack([noise[:, :-1], noise[:, 1:]], -1).reshape(-1, 2), 6),
        "rows": (np.stack([noise[:, :, :-1], noise[:, :, 1:]], -1).reshape(-1, 2), 6),
        "seeds": (np.stack([noise[:-1], noise[1:]], -1).reshape(-1, 2), 6),
    }
    for what, (samples, bins) in pairs.items():
        stat, df = chi_square_uniform(samples, bins)
        p = chi2_sf(stat, df)
        assert p > 1e-3, f"sampling noise {what}: chi-square {stat:.1f} on {df} df, p = {p:.2e}"
