"""Check inputs: the seeded batch of `twinlm check`, the hypothesis batches of
`parity.strategies`, and the left-aligned prompts of the generation check."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from parity import strategies as tst
from parity.check.generation import left_aligned
from parity.inputs import HEADS, seeded_batch
from tests.helpers.configs import TINY_DEMO
from tests.helpers.numpy_reference import counted_positions


def test_seeded_batch_rows_are_left_right_and_unpadded():
    b = seeded_batch(TINY_DEMO, 4, 12, seed=3)
    assert b.padding == ("left", "right", "none", "left")
    m = b.attention_mask
    assert m[0, 0] == 0 and m[0, -1] == 1  # left-padded
    assert m[1, 0] == 1 and m[1, -1] == 0  # right-padded
    assert m[2].all()
    for row in m:  # padding is one contiguous run at one end, never the whole row
        assert row.sum() >= 1 and np.all(np.diff(row) >= 0) | np.all(np.diff(row) <= 0)
    assert np.all((b.input_ids == TINY_DEMO.pad_token_id) == (m == 0))
    np.testing.assert_array_equal(b.position_ids, counted_positions(m))
    np.testing.assert_array_equal(b.labels, np.where(m == 1, b.input_ids, -100))
    assert b.class_labels.shape == (4,) and set(b.class_labels) <= set(range(TINY_DEMO.num_labels))
    for row, s, e in zip(m, b.start_positions, b.end_positions):
        assert row[s] == 1 and row[e] == 1 and s <= e
    again = seeded_batch(TINY_DEMO, 4, 12, seed=3)
    assert all(np.array_equal(getattr(b, f), getattr(again, f)) for f in ("input_ids", "class_labels"))


def test_seeded_batch_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="seq_len >= 2"):
        seeded_batch(TINY_DEMO, 2, 1)
    with pytest.raises(ValueError, match="paddings"):
        seeded_batch(TINY_DEMO, 2, 4, paddings=("left",))
    one = seeded_batch(TINY_DEMO, 1, 1, paddings=("none",))
    assert one.attention_mask.tolist() == [[1]]


@pytest.mark.parametrize("problem_type, num_labels, kind, shape", [
    (None, 1, "f", (3,)), (None, 3, "i", (3,)), ("regression", 2, "f", (3, 2)),
    ("multi_label_classification", 4, "f", (3, 4)),
])
def test_classification_labels_follow_the_problem_type(problem_type, num_labels, kind, shape):
    cfg = TINY_DEMO.replace(problem_type=problem_type, num_labels=num_labels)
    labels = seeded_batch(cfg, 3, 6).head_labels("sequence_classification")["labels"]
    assert labels.dtype.kind == kind and labels.shape == shape
    if problem_type == "multi_label_classification":
        assert set(np.unique(labels)) <= {0.0, 1.0}


@given(tst.configs(), tst.heads(), tst.data())
def test_strategy_batches_carry_valid_labels_for_every_head(config, head, data):
    batch = data.draw(tst.batches(config))
    kwargs = batch.head_labels(head)
    b, t = batch.input_ids.shape
    assert len(batch.padding) == b and head in HEADS
    for side, row in zip(batch.padding, batch.attention_mask):  # a padded side has a pad and a token
        assert row.any() and (side == "none") == row.all()
        assert side != "left" or row[0] == 0 and row[-1] == 1
    if head == "question_answering":
        assert np.all((0 <= kwargs["start_positions"]) & (kwargs["start_positions"] <= kwargs["end_positions"]))
        assert np.all(kwargs["end_positions"] < t)
    elif head == "causal_lm":
        assert np.all((kwargs["labels"] == -100) == (batch.attention_mask == 0))
    else:
        assert kwargs["labels"].shape[0] == b


def test_left_aligned_prompts_keep_token_order():
    b = seeded_batch(TINY_DEMO, 3, 8, seed=1)
    ids, mask = left_aligned(b)
    for r in range(3):
        np.testing.assert_array_equal(ids[r][mask[r] == 1], b.input_ids[r][b.attention_mask[r] == 1])
        assert mask[r, -1] == 1 and np.all(np.diff(mask[r]) >= 0)
