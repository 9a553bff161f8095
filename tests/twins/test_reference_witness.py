"""The third witness: the twins equal a plain-numpy forward pass written from HF's modeling files
(tests/helpers/numpy_reference.py) for every family switch, every head and every loss, so a
mistake made identically in both twins, or in the numpy code they share (`weights/`), cannot
pass twin parity unnoticed.

The torch twin is compared on every example: a bug made in both twins shows there, and the
Flax twin is held to the torch twin at the float64 bound by the parity tests on the same kinds
of configs (test_heads, test_families, test_layers). Comparing it here too would cost one XLA
compilation per example for no bug class the parity tests miss. Running the torch twin and the
numpy witness takes milliseconds, so this property runs 3x the profile's examples, plus the
pinned cases of `tests.helpers.examples` with every head.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import torch_impl
from parity import strategies as tst
from parity.inputs import HEADS, sequence_labels
from tests.helpers import numpy_reference as ref
from tests.helpers.examples import PINS
from tests.helpers.twins import assert_close, randomize
from torch_impl.checkpoint import state_to_numpy

PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
OUTPUTS = {"causal_lm": ("logits",), "sequence_classification": ("logits",),
           "question_answering": ("start_logits", "end_logits")}


def run_case(config, batch, head: str, problem_type: str | None, seed: int) -> None:
    rng = np.random.default_rng(seed)
    b, t = batch.input_ids.shape
    if head != "causal_lm" and config.pad_token_id is None and b > 1:
        config = config.replace(pad_token_id=0)  # pooling a batch needs a pad id (HF raises without)
    if head == "sequence_classification":
        config = config.replace(problem_type=problem_type)
        labels = {"labels": sequence_labels(config, b, rng)}
    elif head == "question_answering" and seed % 2:  # out of range too: clamped, or ignored past T
        labels = {"start_positions": rng.integers(-2, t + 3, b), "end_positions": rng.integers(-2, t + 3, b)}
    else:
        labels = batch.head_labels(head)
    torch.manual_seed(seed)
    model = getattr(torch_impl, HEADS[head])(config, dtype=torch.float64)
    randomize(model, seed)  # gains and biases away from their init, so every term counts
    weights = state_to_numpy(model)
    assert set(weights) == ref.expected_names(config, head), "tensor names differ from HF's layout"
    pos = batch.position_ids
    expected = ref.forward(config, head, weights, batch.input_ids, batch.attention_mask, pos, **labels)
    with torch.no_grad():
        got = model(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask),
                    None if pos is None else torch.from_numpy(pos), **{k: torch.from_numpy(np.asarray(v))
                                                                       for k, v in labels.items()})
    for field in OUTPUTS[head]:
        assert_close(f"{head} {field} vs numpy witness", expected[field], getattr(got, field), "float64", "logits")
    assert_close(f"{head} loss vs numpy witness", expected["loss"], got.loss, "float64", "loss")
    if "aux_loss" in expected:
        assert_close("aux_loss vs numpy witness", expected["aux_loss"], got.aux_loss, "float64", "loss")
        for i, (e, g) in enumerate(zip(expected["router_logits"], got.router_logits, strict=True)):
            assert_close(f"router_logits[{i}] vs numpy witness", e, g, "float64", "logits")


def pinned(name: str, head: str, problem_type: str | None = None, seed: int = 1):
    return example(case=PINS[name], head=head, problem_type=problem_type, seed=seed)


@pinned("dynamic_past_max", "causal_lm")
@pinned("llama3_gqa_both_sides", "sequence_classification", "single_label_classification")
@pinned("llama3_gqa_both_sides", "sequence_classification", "regression")
@pinned("llama3_gqa_both_sides", "question_answering")
@pinned("gemma2", "causal_lm")
@pinned("gemma2", "sequence_classification", "multi_label_classification", seed=2)
@pinned("mixtral", "causal_lm")
@pinned("qwen2", "question_answering", seed=2)
@pinned("gemma", "causal_lm")
@settings(max_examples=3 * settings.default.max_examples)
@given(case=tst.cases(tst.configs(families=True, sparse_routing=True), min_len=2), head=tst.heads(),
       problem_type=st.sampled_from(PROBLEM_TYPES), seed=st.integers(0, 2**16))
def test_torch_twin_equals_the_numpy_witness(case, head, problem_type, seed):
    config, batch = case
    run_case(config, batch, head, problem_type, seed)
