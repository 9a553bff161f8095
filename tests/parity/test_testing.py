"""`parity.testing.assert_parity`: one line in a user's test suite, from a config, a directory
or a model pair; a broken twin fails with the table."""

from __future__ import annotations

import pytest


from parity.loading import load_twins, read_config
from parity.testing import assert_parity, break_layer
from tests.helpers.configs import TINY_DEMO


def test_assert_parity_from_a_directory_and_from_a_config(checkpoint):
    report = assert_parity(checkpoint, sections=("forward", "head", "gradients"))
    assert report.passed and report.dtype == "float64"
    report = assert_parity(read_config(checkpoint), sections=("forward", "head", "gradients"))
    assert report.passed and len(report.rows) > 10


def test_assert_parity_fails_on_a_broken_pair_with_the_table(checkpoint):
    twins = load_twins(checkpoint, "float64")
    break_layer(twins.flax_model, 2)
    with pytest.raises(AssertionError, match=r"first divergence: model\.layers\.2 \+ model\.norm \(output\)"):
        assert_parity((twins.torch_model, twins.flax_model), sections=("forward", "head", "gradients"))


def test_a_custom_batch_needs_a_model(checkpoint):
    from parity.inputs import seeded_batch

    with pytest.raises(ValueError, match="custom batch"):
        assert_parity(checkpoint, batch=seeded_batch(TINY_DEMO, 2, 4))
