"""The parity check itself: it covers every tensor, its figures are the real differences, and
a twin broken in one layer is caught and localised to that layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity.check import check_checkpoint, check_pair, flax_forward, to_jax, to_torch
from parity.demo import DemoModel, build_checkpoint
from parity.inputs import seeded_batch
from parity.loading import load_twins
from parity.testing import break_layer
from tests.helpers.configs import TINY_DEMO

# One small config for every parity test file: equal configs share the compiled Flax functions.
SEQ = 16  # the default of `twinlm check` and the demo: shapes shared with the CLI tests


@pytest.fixture(scope="module")
def report(checkpoint):
    return check_checkpoint(checkpoint, "float64", seq_len=SEQ)


def test_float64_check_passes_and_covers_every_tensor(report, checkpoint):
    assert report.passed, report.format_table()
    by_section = {s: [r.name for r in report.rows if r.section == s]
                  for s in ("forward", "head", "gradients", "kv cache", "generation")}
    n = TINY_DEMO.num_hidden_layers
    assert by_section["forward"] == (
        ["model.embed_tokens (embeddings)"]
        + [name for i in range(n - 1) for name in (f"model.layers.{i}.self_attn (attention weights)",
                                                    f"model.layers.{i} (output)")]
        + [f"model.layers.{n - 1}.self_attn (attention weights)", f"model.layers.{n - 1} + model.norm (output)"])
    assert by_section["head"] == ["logits", "loss"]
    twins = load_twins(checkpoint, "float64")
    assert sorted(by_section["gradients"]) == sorted(n for n, _ in twins.torch_model.named_parameters())
    assert len(by_section["kv cache"]) == 3
    assert by_section["generation"] == ["greedy tokens"]
    # The semantic check: float64 twins agree to rounding, far inside the table's float64 bound (1e-12).
    assert report.worst("forward").comparison.rel < 1e-13
    assert report.worst("gradients").comparison.rel < 1e-13
    # The batch holds a left- and a right-padded row.
    assert {"left", "right"} <= set(report.meta["describe"]["inputs"].replace(",", " ").split())


def test_figures_are_the_measured_differences(checkpoint, report):
    """Third witness for the arithmetic of the report: max |diff| and its index recomputed
    with numpy from the twins' own outputs."""
    twins = load_twins(checkpoint, "float64")
    batch = seeded_batch(twins.config, 3, SEQ, 0)
    with torch.no_grad():
        t_logits = twins.torch_model(to_torch(batch.input_ids), to_torch(batch.attention_mask),
                                     to_torch(batch.position_ids)).logits.numpy()
    f_out = flax_forward(twins.flax_model, (to_jax(batch.input_ids), to_jax(batch.attention_mask),
                                            to_jax(batch.position_ids)), {})
    diff = np.abs(np.asarray(f_out.logits) - t_logits)
    row = next(r for r in report.rows if r.name == "logits")
    assert row.comparison.max_abs == pytest.approx(diff.max(), abs=1e-15)
    floor = row.comparison.floor  # the dtype's scale floor (parity.tolerances)
    assert row.comparison.rel == pytest.approx(diff.max() / max(floor, np.abs(t_logits).max()), abs=1e-15)
    assert row.comparison.shape == t_logits.shape


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_broken_twin_is_caught_and_localised(checkpoint, layer):
    twins = load_twins(checkpoint, "float64")
    break_layer(twins.flax_model, layer)  # o_proj of one layer scaled by 1.01, Flax copy only
    report = check_pair(twins.torch_model, twins.flax_model, seeded_batch(twins.config, 3, SEQ, 0),
                        sections=("forward", "head", "gradients"))
    assert not report.passed
    first = report.first_failure()
    assert first.layer == layer and first.name.startswith(f"model.layers.{layer} ") and first.name.endswith("(output)")
    forward = [r for r in report.rows if r.section == "forward"]
    before = forward[:forward.index(first)]
    assert before and all(r.status == "pass" for r in before)
    # o_proj acts after the attention weights: the broken layer's own weights still agree.
    assert before[-1].name == f"model.layers.{layer}.self_attn (attention weights)"
    assert f"first divergence: {first.name}" in report.format_table()
    assert any(r.status == "fail" and r.name == f"model.layers.{layer}.self_attn.o_proj.weight"
               for r in report.rows if r.section == "gradients")


@pytest.mark.parametrize("head", ["sequence_classification", "question_answering"])
def test_other_heads_pass_in_float64(tmp_path, head):
    ckpt = build_checkpoint(DemoModel(head, head, TINY_DEMO), tmp_path / head)
    report = check_checkpoint(ckpt, "float64", seq_len=SEQ)
    assert report.passed, report.format_table()
    assert report.head == head
    head_rows = [r.name for r in report.rows if r.section == "head"]
    assert head_rows == (["start_logits", "end_logits", "loss"] if head == "question_answering" else ["logits", "loss"])
    assert not [r for r in report.rows if r.section == "generation"]  # greedy tokens: causal LM only
    assert {r.name for r in report.rows if r.section == "gradients"} >= \
        ({"qa_outputs.weight", "qa_outputs.bias"} if head == "question_answering" else {"score.weight"})


def test_classifier_without_pad_id_checks_one_unpadded_row(tmp_path):
    config = TINY_DEMO.replace(pad_token_id=None)
    ckpt = build_checkpoint(DemoModel("nopad", "sequence_classification", config), tmp_path / "nopad")
    report = check_checkpoint(ckpt, "float64", seq_len=SEQ, sections=("forward", "head"))
    assert report.passed, report.format_table()
    assert "no pad_token_id" in report.meta["describe"]["note"]
    assert next(r for r in report.rows if r.name == "logits").comparison.shape == (1, TINY_DEMO.num_labels)


def test_unknown_section_and_mismatched_heads_are_refused(checkpoint, tmp_path):
    twins = load_twins(checkpoint, "float64")
    batch = seeded_batch(twins.config, 3, SEQ, 0)
    with pytest.raises(ValueError, match="unknown sections"):
        check_pair(twins.torch_model, twins.flax_model, batch, sections=("forwards",))
    other = load_twins(build_checkpoint(DemoModel("qa", "question_answering", TINY_DEMO), tmp_path / "qa"), "float64")
    with pytest.raises(TypeError, match="differ in head"):
        check_pair(twins.torch_model, other.flax_model, batch)


def test_soft_capped_logits_are_measured_against_the_pre_cap_scale():
    """Gemma 2 caps logits with cap * tanh(x / cap): values shrink below the cap, errors near 0
    pass at slope 1. The logits row is relative to the scale of the logits before the cap,
    recomputed here from the reference's final hidden state and the tied embedding."""
    from parity.loading import twins_from_config
    from parity.strategies import family_examples

    config = family_examples()["gemma2"]
    twins = twins_from_config(config, "causal_lm", "bfloat16")
    report = check_pair(twins.torch_model, twins.flax_model, seeded_batch(config, 3, SEQ, 0),
                        sections=("forward", "head"))
    assert report.passed, report.format_table()
    row = next(r for r in report.rows if r.name == "logits")
    batch = seeded_batch(config, 3, SEQ, 0)
    with torch.no_grad():
        out = twins.torch_model(to_torch(batch.input_ids), to_torch(batch.attention_mask),
                                to_torch(batch.position_ids), output_hidden_states=True)
        raw = out.hidden_states[-1].double() @ twins.torch_model.model.embed_tokens.weight.double().T
    cap = config.final_logit_softcapping
    assert float(out.logits.abs().max()) <= cap < float(raw.abs().max())
    assert row.comparison.rel == pytest.approx(row.comparison.max_abs / float(raw.abs().max()))
    assert f"soft-capped at {cap:g}" in row.note
