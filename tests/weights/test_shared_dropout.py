"""The dropout masks' specification (`weights.shared.dropout`): the kept fraction is within a
binomial bound of 1 - p, masks of different keys are independent, and a micro-batch (a row
offset) draws exactly the rows of the whole batch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from weights.shared import dropout as d


def _binomial_ok(kept: int, n: int, q: float, sigmas: float = 5.0) -> bool:
    return abs(kept - n * q) <= sigmas * math.sqrt(n * q * (1 - q))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_kept_fraction_is_within_a_binomial_bound(p):
    shape = (4, 4, 64, 64)
    n = math.prod(shape)
    q = d.keep_probability(p)
    assert abs(q - (1 - p)) < 2 ** -24
    for site in d.SITES:
        kept = int(d.keep_mask(7, 3, 1, site, shape, p).sum())
        assert _binomial_ok(kept, n, q), f"{site}: kept {kept} of {n}, expected {n * q:.0f}"
    # Per column and per row too: no stripes (each column of 4096 rows, each row of 64 columns in bulk).
    mask = d.keep_mask(7, 3, 1, "attention", shape, p).reshape(-1, shape[-1])
    assert all(_binomial_ok(int(c), mask.shape[0], q) for c in mask.sum(0))


def test_different_keys_give_independent_masks():
    shape, p = (2, 8, 32, 32), 0.5
    base = d.keep_mask(0, 0, 0, "attention", shape, p)
    n = base.size
    for other in [(1, 0, 0, "attention"), (0, 1, 0, "attention"), (0, 0, 1, "attention"), (0, 0, -1, "attention"),
                  (0, 0, 0, "attention_output")]:
        agree = int((d.keep_mask(*other, shape, p) == base).sum())
        assert _binomial_ok(agree, n, 0.5), f"{other}: {agree} of {n} agree"


def test_micro_batches_draw_the_whole_batchs_rows():
    whole = d.keep_mask(3, 5, 2, "mlp_output", (8, 6, 10), 0.3)
    for m in range(4):
        micro = d.keep_mask(3, 5, 2, "mlp_output", (2, 6, 10), 0.3, row_offset=2 * m)
        assert np.array_equal(micro, whole[2 * m:2 * m + 2])


def test_rate_zero_keeps_everything_and_bad_rates_are_refused():
    assert d.keep_mask(0, 0, 0, "embeddings", (3, 5), 0.0).all()
    x = np.arange(15, dtype=np.float64).reshape(3, 5)
    assert np.array_equal(d.dropout(x, 0.0, 0, 0, 0, "embeddings"), x)
    for p in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="dropout probability"):
            d.keep_threshold(p)


def test_dropout_scales_the_kept_values_in_the_dtype():
    x = np.ones((4, 256), np.float32)
    y = d.dropout(x, 0.1, 0, 0, 0, "embeddings")
    assert y.dtype == np.float32
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.9)}


def test_dropout_key_reduces_any_int_mod_2_32():
    assert d.dropout_key(-1, 2 ** 32 + 5, 3).tolist() == [-1, 5, 3]
    assert d.dropout_key(2 ** 40 + 7, 0).dtype == np.int32
    assert np.array_equal(d.keep_mask(2 ** 32 + 9, 0, 0, "attention", (2, 3), 0.5),
                          d.keep_mask(9, 0, 0, "attention", (2, 3), 0.5))
