"""The layer-streamed check: the same figures as the whole-model check on every row they share,
an isolated figure that points at the one broken layer, and the memory-budget decision."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings

from parity import strategies as tst
from parity.check import check_checkpoint, check_pair
from parity.check.memory import choose_mode, model_sizes, streamed_bytes, whole_model_bytes
from parity.check.streamed import GENERATION_SKIPPED, check_streamed
from parity.cli import main
from parity.loading import load_twins, twins_from_config
from parity.testing import break_layer
from tests.helpers.configs import TINY_DEMO

SECTIONS = ("forward", "head", "gradients", "kv cache")
GB = 10**9


# Each example runs both checks (a few compilations each): two on CI, more elsewhere.
@settings(max_examples=2 if os.environ.get("CI") else 8)
@given(tst.configs(), tst.heads(), tst.data())
def test_streamed_rows_equal_whole_model_rows(tmp_path_factory, config, head, data):
    """Every row both checks produce has the same figures (float64: to 1e-12) and the same status,
    for configs of every family, every head, and batches padded left and right."""
    if head == "sequence_classification" and config.pad_token_id is None:
        config = config.replace(pad_token_id=0)  # pooling needs it beyond one row
    batch = data.draw(tst.batches(config, max_len=6))
    directory = tmp_path_factory.mktemp("streamed") / "ckpt"
    twins = twins_from_config(config, head, "float64")
    twins.torch_model.save_pretrained(directory)
    whole = check_pair(twins.torch_model, twins.flax_model, batch, sections=SECTIONS)
    streamed = check_streamed(directory, "float64", batch, config=config, head=head, sections=SECTIONS)
    assert [(r.section, r.name) for r in streamed.rows] == [(r.section, r.name) for r in whole.rows]
    for w, s in zip(whole.rows, streamed.rows):
        assert abs(s.comparison.max_abs - w.comparison.max_abs) <= 1e-12, (w.name, w.comparison, s.comparison)
        assert abs(s.comparison.rel - w.comparison.rel) <= 1e-12, w.name
        assert s.status == w.status, w.name
    assert streamed.passed, streamed.format_table()
    # The isolated figures are float64 rounding too; rows with no layer input have none.
    assert all(r.isolated.rel < 1e-10 for r in streamed.rows if r.isolated is not None)
    assert all(r.isolated is None for r in streamed.rows if r.section == "kv cache")


@pytest.fixture(scope="module")
def broken(checkpoint, tmp_path_factory):
    """The session checkpoint with layer 1 of its Flax copy broken (o_proj scaled by 1.01)."""
    twins = load_twins(checkpoint, "float64")
    break_layer(twins.flax_model, 1)
    directory = tmp_path_factory.mktemp("broken") / "flax"
    twins.flax_model.save_pretrained(directory)
    return directory


def test_isolated_figures_localise_a_broken_layer(checkpoint, broken):
    """Layer 1 broken: its isolated row alone fails, while every chained row from it on fails; the
    isolated gradient failures are all layer 1's."""
    report = check_checkpoint(checkpoint, "float64", flax_directory=broken, stream=True,
                              sections=("forward", "head", "gradients"))
    outputs = [r for r in report.rows if r.section == "forward" and r.name.endswith("(output)")]
    assert [r.layer for r in outputs if not r.isolated.passed] == [1]
    assert [r.layer for r in outputs if r.status == "fail"] == [1, 2]
    assert report.first_failure().name == "model.layers.1 (output)"
    assert all(r.status == "fail" for r in report.rows if r.section == "head")
    failing = [r for r in report.rows if r.section == "gradients" and not r.isolated.passed]
    assert failing and {r.layer for r in failing} == {1}
    assert "first isolated failure (the error this tensor adds on its own): model.layers.1 (output)" \
        in report.format_table()


def test_cli_streams_on_request_and_says_why(checkpoint, tmp_path, capsys):
    """`--memory-budget` below the estimate streams, says so before loading, and the JSON carries
    the mode, the isolated figures, the generation row marked skipped (and listed in `skipped`) and
    the phase times."""
    out = tmp_path / "r.json"
    assert main(["check", str(checkpoint), "--dtype", "float64", "--memory-budget", "1MB", "--json", str(out),
                 "--skip", "gradients"]) == 0
    err = capsys.readouterr().err
    assert "twinlm check: streamed, layer by layer: whole-model estimate" in err and "> budget 1 MB" in err
    report = json.loads(out.read_text())
    assert report["meta"]["mode"]["streamed"] is True
    assert report["meta"]["mode"]["budget"] == 10**6
    assert {"load", "forward + kv cache", "total"} <= set(report["meta"]["timings"])
    generation = [r for r in report["rows"] if r["section"] == "generation"]
    assert generation == [dict(generation[0], status="n/a", note=GENERATION_SKIPPED)]
    # Not checked is said where a CI gate reads it: the PASS is marked incomplete.
    assert report["complete"] is False and set(report["skipped"]) == {"generation", "gradients"}
    assert report["skipped"]["gradients"] == "--skip gradients"
    assert all(r["isolated"] is not None for r in report["rows"] if r["section"] == "forward" and r["layer"] is not None)


@pytest.mark.parametrize("estimate, budget, force, streamed", [
    (10 * GB, 8 * GB, None, True), (8 * GB, 8 * GB, None, False), (1, None, None, False),
    (1, 8 * GB, True, True), (10 * GB, 8 * GB, False, False)])
def test_mode_is_chosen_by_the_budget_unless_forced(estimate, budget, force, streamed):
    mode = choose_mode(estimate, budget, force, "injected")
    assert mode.streamed is streamed and mode.estimate == estimate and mode.budget == budget
    assert mode.describe().startswith("streamed, layer by layer: " if streamed else "whole model: ")
    if budget is not None:
        assert "injected" in mode.reason and mode.reason.startswith(("--stream", "--no-stream")) == (force is not None)


@pytest.mark.parametrize("dtype, gradients", [("float32", True), ("bfloat16", False)])
def test_streamed_estimate_does_not_grow_with_depth(dtype, gradients):
    """What the decision rests on: the whole-model estimate grows with depth and the streamed one
    does not (it holds one layer), for the same width."""
    shallow, deep = TINY_DEMO.replace(num_hidden_layers=2), TINY_DEMO.replace(num_hidden_layers=7)
    sizes = {c.num_hidden_layers: model_sizes(c, "causal_lm") for c in (shallow, deep)}
    assert sizes[7].total - sizes[2].total == 5 * sizes[2].layer and sizes[7].shell == sizes[2].shell
    assert sizes[2].embedding == TINY_DEMO.vocab_size * TINY_DEMO.hidden_size
    kw = dict(gradients=gradients, batch=3, seq_len=16)
    whole = [whole_model_bytes(c, "causal_lm", dtype, sizes=sizes[c.num_hidden_layers], **kw) for c in (shallow, deep)]
    streamed = [streamed_bytes(c, "causal_lm", dtype, sizes=sizes[c.num_hidden_layers], **kw) for c in (shallow, deep)]
    assert whole[1] > whole[0] and streamed[1] == streamed[0]
