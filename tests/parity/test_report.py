"""The report and the comparison arithmetic, without any model: grouping, ordering, renderings,
and `compare_allclose` against numpy's own `allclose`."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import weights.blockcopy
from parity.compare import Comparison, compare, compare_allclose
from parity.explain.report_html import write_html
from parity.report import Report, Row, parameter_group
from parity.tolerances import TOLERANCES, tolerance


def _row(section, name, rel, tol=1e-5, layer=None, quantity="activations"):
    return Row(section, quantity, Comparison(name, rel, rel, (0,), tol, rel <= tol, (2,)), layer=layer)


@pytest.mark.parametrize("name, group", [
    ("model.layers.3.mlp.up_proj.weight", "model.layers.3"),
    ("model.layers.12.self_attn.q_proj.bias", "model.layers.12"),
    ("model.embed_tokens.weight", "model.embed_tokens"),
    ("lm_head.weight", "lm_head"),
    ("qa_outputs.bias", "qa_outputs"),
])
def test_parameter_group(name, group):
    assert parameter_group(name) == group


def test_gradients_fold_into_groups_keeping_the_worst_member():
    rep = Report("t", "float32", "causal_lm", [
        _row("forward", "model.layers.0 (output)", 1e-7, layer=0),
        _row("gradients", "model.layers.0.mlp.up_proj.weight", 1e-6, 1e-4, 0, "gradients"),
        _row("gradients", "model.layers.0.self_attn.o_proj.weight", 2e-4, 1e-4, 0, "gradients"),
        _row("gradients", "model.layers.0.mlp.down_proj.weight", 3e-6, 1e-4, 0, "gradients"),
        _row("gradients", "lm_head.weight", 1e-6, 1e-4, None, "gradients"),
    ])
    rows = rep.summary_rows()
    assert [r.name for r in rows] == ["model.layers.0 (output)", "model.layers.0", "lm_head"]
    group = rows[1]
    assert group.status == "fail" and group.comparison.rel == 2e-4
    assert group.note == "3 tensors, worst self_attn.o_proj.weight"
    assert rows[2].status == "pass"


def test_first_failure_is_in_reading_order_and_na_rows_do_not_fail():
    na = Row("generation", "tokens", Comparison("greedy tokens", math.nan, math.nan, (), 0.0, False),
             note="generate() not available", status="n/a")
    rep = Report("t", "float64", "causal_lm", [
        _row("forward", "model.layers.0 (output)", 1e-12, 1e-10, 0),
        _row("forward", "model.layers.1 (output)", 1e-3, 1e-10, 1),
        _row("head", "logits", 5e-3, 1e-10, quantity="logits"),
        na,
    ])
    assert not rep.passed and rep.first_failure().name == "model.layers.1 (output)"
    assert rep.worst().name == "logits"
    table = rep.format_table()
    assert "FAIL: 2 of 4 tensors out of tolerance; first divergence: model.layers.1 (output)" in table
    assert "(1 check(s) not available)" in table and "n/a" in table
    rep.rows = [rep.rows[0], na]
    assert rep.passed and rep.format_table().splitlines()[-1].startswith("PASS")


def test_json_has_every_row_and_only_standard_json(tmp_path):
    inf = Row("head", "logits", Comparison("logits", math.inf, math.inf, (), 1e-5, False, (2, 3)))
    rep = Report("t", "float32", "causal_lm", [_row("forward", "a (output)", 1e-7, layer=0), inf])
    path = rep.write_json(tmp_path / "sub" / "r.json")
    text = path.read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["passed"] is False and data["first_failure"] == "logits"
    assert [r["name"] for r in data["rows"]] == ["a (output)", "logits"]
    assert data["rows"][1]["max_abs"] == "inf" and data["rows"][1]["shape"] == [2, 3]


def test_html_is_self_contained_with_table_and_plot(tmp_path):
    rep = Report("tiny (float32)", "float32", "causal_lm",
                 [_row("forward", "model.embed_tokens (embeddings)", 0.0)]
                 + [_row("forward", f"model.layers.{i} (output)", 10.0 ** (-8 + i), layer=i) for i in range(3)])
    page = write_html([rep], tmp_path / "r.html").read_text()
    assert "<table class='data rows'>" in page and "model.layers.2 (output)" in page
    assert re.search(r"<svg [^>]*>.*<path d='M[^']+'", page, re.S)  # the per-layer plot, inline
    # Nothing is fetched from elsewhere: no external src or href.
    assert not re.search(r"(src|href)=['\"](?!data:|#)", page)


@given(hnp.arrays(np.float64, st.integers(1, 12), elements=st.floats(-1e3, 1e3)),
       hnp.arrays(np.float64, st.integers(1, 12), elements=st.floats(-1e-2, 1e-2)),
       st.sampled_from([0.0, 1e-6, 1e-3]), st.sampled_from([0.0, 1e-8, 1e-4]))
def test_compare_allclose_agrees_with_numpy(ref, noise, rtol, atol):
    got = ref + np.resize(noise, ref.shape)
    c = compare_allclose("x", ref, got, rtol, atol)
    assert c.passed == bool(np.allclose(got, ref, rtol=rtol, atol=atol))
    assert c.max_abs == pytest.approx(float(np.abs(got - ref).max()))


def test_compare_bounds_relative_to_the_reference_scale():
    big, small = np.array([100.0, 1.0]), np.array([0.5, 0.1])
    assert compare("x", big, big + [0.0, 5e-4], 1e-5).passed  # 5e-4 / max(1, 100) = 5e-6
    c = compare("x", small, small + [0.0, 5e-4], 1e-5)  # scale max(1, 0.5) = 1
    assert not c.passed and c.rel == pytest.approx(5e-4) and c.worst_index == (1,)
    assert not compare("x", small, np.array([0.5, np.nan]), 1.0).passed
    assert not compare("x", small, np.zeros(3), 1.0).passed


@given(hnp.arrays(st.sampled_from([np.float32, np.float64]), hnp.array_shapes(min_dims=0, max_dims=3, max_side=7),
                  elements=st.floats(-4, 4, width=32) | st.sampled_from([np.nan, np.inf, -np.inf])),
       st.integers(0, 2**31 - 1), st.booleans())
@example(np.array([[-1.0, 2.0, -3.0]] * 3), 0, False)  # float64 blocks are views of the input
def test_compare_in_blocks_gives_the_figures_of_one_float64_pass(ref, seed, transposed):
    """`compare` reads big tensors a block at a time (no float64 copy of a whole gradient): its
    figures equal those of a single float64 pass, NaN / inf rules and first worst index included,
    on strided (transposed) views and torch / jax inputs alike."""
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(seed)
    got = np.where(rng.random(ref.shape) < 0.1, 0, ref + rng.normal(0, 1e-3, ref.shape).astype(np.float32))
    got = np.where(rng.random(ref.shape) < 0.05, np.nan, got).astype(ref.dtype)
    if transposed:
        ref, got = ref.T, got.T
    before = ref.copy(), got.copy()
    whole = compare("x", ref, got, 1e-3)
    np.testing.assert_array_equal(ref, before[0])  # the inputs are read, never written
    np.testing.assert_array_equal(got, before[1])
    block, weights.blockcopy.BLOCK_BYTES = weights.blockcopy.BLOCK_BYTES, 24  # three float64 per block
    try:
        for r, g in ((ref, got), (torch.from_numpy(np.array(ref, order="C")), jnp.asarray(got))):
            assert compare("x", r, g, 1e-3) == whole
    finally:
        weights.blockcopy.BLOCK_BYTES = block


def test_table_bounds_are_relative_down_to_the_dtype_floor():
    """A bound from the table is relative to the tensor's own scale down to its dtype's floor:
    a 3% error on a float32 gradient of order 1e-3 fails (the old `max(1, scale)` rule let it
    pass as an absolute 3e-5 < 1e-4), one float32 ulp of rounding passes, and below the floor
    (a gradient that is zero up to rounding noise) the bound is absolute again."""
    bound = tolerance("float32", "gradients")
    assert bound.floor == TOLERANCES["float32"].floor and float(bound) == TOLERANCES["float32"].gradients
    grad = np.random.default_rng(0).uniform(-1e-3, 1e-3, 1000)
    assert not compare("3% off", grad, grad * 1.03, bound).passed
    assert compare("3% off, plain number: old rule", grad, grad * 1.03, float(bound)).passed
    assert compare("one ulp", grad, (grad.astype(np.float32) * (1 + 2 ** -23)).astype(np.float64), bound).passed
    noise = 1e-8 * np.array([1.0, -2.0])  # exact zero, computed: rounding noise of O(1) terms
    c = compare("noise", noise, -noise, bound)
    assert c.passed and c.rel == pytest.approx(4e-8 / bound.floor)
    assert tolerance("float32", "gradients", 1e-3).floor == bound.floor  # an override keeps the floor


def test_report_round_trips_through_json(tmp_path):
    rep = Report("t", "bfloat16", "question_answering",
                 [_row("forward", "a (output)", 1e-3, 6e-2, 0),
                  Row("head", "logits",
                      Comparison("start_logits", math.inf, math.inf, (), 6e-2, False, (3, 16), floor=1e-2))],
                 {"describe": {"inputs": "batch 3 x 16"}})
    back = Report.from_dict(json.loads(rep.write_json(tmp_path / "r.json").read_text()))
    assert back.format_table() == rep.format_table() and back.rows[1].comparison.floor == 1e-2
    assert back.first_failure().name == "start_logits" and back.rows[1].comparison.max_abs == math.inf


def test_isolated_figures_and_phase_times_in_every_rendering(tmp_path):
    """Streamed reports carry a second figure per row (the Flax layer fed the torch twin's input)
    and every report the wall time of each phase: the table, JSON and HTML show them; the isolated figure
    never changes a row's status, and gradient groups keep their worst isolated member."""
    def iso(name, rel):
        return Comparison(name, rel, rel, (0,), 1e-5, rel <= 1e-5, (2,))

    rows = [Row("forward", "activations", Comparison("model.layers.0 (output)", 1e-6, 1e-6, (0,), 1e-5, True, (2,)),
                layer=0, isolated=iso("model.layers.0 (output)", 1e-6)),
            Row("forward", "activations", Comparison("model.layers.1 (output)", 2e-5, 2e-5, (0,), 1e-5, False, (2,)),
                layer=1, isolated=iso("model.layers.1 (output)", 3e-5)),
            Row("gradients", "gradients", Comparison("model.layers.1.mlp.up_proj.weight", 1e-6, 1e-6, (0,), 1e-4,
                                                     True, (2,)), 1, isolated=iso("x", 2e-7)),
            Row("gradients", "gradients", Comparison("model.layers.1.mlp.down_proj.weight", 1e-6, 1e-6, (0,), 1e-4,
                                                     True, (2,)), 1, isolated=iso("y", 4e-7)),
            Row("kv cache", "activations", Comparison("torch cached vs torch full (logits)", 0.0, 0.0, (0,), 1e-5, True))]
    rep = Report("streamed", "float32", "causal_lm", rows, {"timings": {"load": 1.25, "forward": 3.0, "total": 4.25}})
    text = rep.format_table()
    assert "isolated" in text.splitlines()[2] and "3.0e-05 FAIL" in text
    assert "first divergence: model.layers.1 (output)" in text
    assert "first isolated failure (the error this tensor adds on its own): model.layers.1 (output)" in text
    assert text.splitlines()[-1] == "wall time: load 1.2 s, forward 3.0 s, total 4.2 s"
    group = next(r for r in rep.summary_rows() if r.section == "gradients")
    assert group.isolated.rel == 4e-7 and group.status == "pass"
    back = Report.from_dict(json.loads(rep.write_json(tmp_path / "r.json").read_text()))
    assert [r.isolated for r in back.rows] == [r.isolated for r in rows]
    assert back.meta["timings"] == rep.meta["timings"]
    page = write_html([rep], tmp_path / "r.html").read_text()
    assert "3.0e-05" in page and "wall time: load 1.2 s, forward 3.0 s, total 4.2 s" in page


# ---- non-finite values are failures (issue 14, item 1) -------------------------------------
@pytest.mark.parametrize("fn", [lambda r, g: compare("t", r, g, 1e-5),
                                lambda r, g: compare_allclose("t", r, g, 1e-5, 1e-8)])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_in_one_array_fails_with_an_infinite_error(fn, bad):
    ref = np.array([[1.0, 2.0], [3.0, 4.0]])
    got = ref.copy()
    got[1, 0] = bad
    for r, g in ((ref, got), (got, ref)):  # either twin
        c = fn(r, g)
        assert not c.passed and c.nonfinite == "one" and c.max_abs == math.inf and c.worst_index == (1, 0)


@pytest.mark.parametrize("fn", [lambda r, g: compare("t", r, g, 1e-5),
                                lambda r, g: compare_allclose("t", r, g, 1e-5, 1e-8)])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_in_both_arrays_fails_with_its_own_verdict(fn, bad):
    ref = np.full((3, 4), bad)  # an all-NaN (or all-inf) output in both twins: the old "pass"
    c = fn(ref, ref.copy())
    assert not c.passed and c.nonfinite == "both" and c.worst_index == (0, 0)
    rep = Report("t", "float32", "causal_lm", [Row("forward", "activations", c)])
    verdict = rep.format_table().splitlines()[-1]
    assert verdict.startswith("FAIL") and "both twins produced non-finite values at t [0,0]" in verdict
    assert "both twins produced non-finite values" in rep.format_table().splitlines()[-3]  # the row's note
    data = json.loads(json.dumps(rep.as_dict()))
    assert data["nonfinite"] == ["t"] and data["rows"][0]["nonfinite"] == "both"
    assert Report.from_dict(data).rows[0].comparison.nonfinite == "both"


def test_finite_figures_are_unchanged_by_the_nonfinite_rule():
    ref = np.array([1.0, -2.0, 3.0])
    c = compare("t", ref, ref + np.array([0.0, 1e-7, 0.0]), 1e-5)
    assert c.passed and c.nonfinite == "" and c.worst_index == (1,) and math.isclose(c.max_abs, 1e-7)
