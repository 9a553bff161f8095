"""Dropout that agrees across frameworks: both twins' on-device hash gives the numpy
specification's masks bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flax_impl.layers import dropout as flax_dropout
from torch_impl.layers import dropout as torch_dropout
from weights.shared import dropout as spec

_FLAX_MASKS: dict = {}


def _flax_mask(key, shape, p, layer, site):
    # One compilation per (shape, p, layer, site): the key is traced, as under train_step.
    fn = _FLAX_MASKS.setdefault((shape, p, layer, site),
                                jax.jit(lambda k: flax_dropout.keep_mask(k, shape, p, layer, site)))
    return np.asarray(fn(jnp.asarray(key)))


@settings(max_examples=10)
@given(st.lists(st.integers(1, 5), min_size=2, max_size=4).map(tuple), st.sampled_from([0.0, 0.1, 0.5, 0.97]),
       st.integers(-2 ** 40, 2 ** 40), st.integers(0, 2 ** 33), st.integers(-1, 40), st.sampled_from(sorted(spec.SITES)),
       st.integers(0, 2 ** 32))
def test_twins_draw_the_specifications_masks(shape, p, seed, step, layer, site, row_offset):
    key = spec.dropout_key(seed, step, row_offset)
    expected = spec.keep_mask(seed, step, layer, site, shape, p, row_offset)
    got_torch = torch_dropout.keep_mask(torch.from_numpy(key), shape, p, layer, site).numpy()
    assert np.array_equal(got_torch, expected)
    assert np.array_equal(_flax_mask(key, shape, p, layer, site), expected)
