"""The HTML parity report (`check --html`, `compare --html`, `demo`): one self-contained file,
a summary with failing checks first, failing rows linked to their explain pages, a per-layer
plot, chained and isolated figures when the check measured both, inputs and environment."""

from __future__ import annotations

from parity.compare import Comparison
from parity.explain.site import write_site
from parity.explain.report_html import write_html
from tests.helpers.html import assert_self_contained
from tests.helpers.reports import tiny_report


def test_failing_report_lists_failures_first_linked_to_explain_pages(tmp_path):
    site = tmp_path / "explain"
    write_site(site)
    good, bad = tiny_report(title="fine (float32)"), tiny_report(broken_layer=1, title="broken (float32)")
    path = write_html([good, bad], tmp_path / "sub" / "r.html", explain=site)
    page = path.read_text()
    assert_self_contained(path)
    assert "<link" not in page and "<style>" in page  # one file: the stylesheet inlined
    summary = page[page.index("id='summary'"):page.index("id='failures'")]
    assert summary.index("broken") < summary.index("fine")  # failing checks first
    failures = page[page.index("id='failures'"):page.index("id='m-")]
    assert "model.layers.1.self_attn (attention weights)" in failures and "model.layers.0" not in failures
    assert "href='../explain/attention.html#measured'" in failures  # the first divergence -> its page
    assert "position:sticky" in page and "<svg" in page  # sticky navigation, the per-layer plot
    assert "batch 3 x 16 tokens" in page and "id='environment'" in page and ">seed<" in page


def test_without_a_site_the_report_names_components_without_links(tmp_path):
    path = write_html([tiny_report(broken_layer=0)], tmp_path / "r.html")
    assert_self_contained(path)
    page = path.read_text()
    assert "explain/" not in page and ">Attention<" in page


def test_isolated_figures_are_drawn_when_rows_carry_them(tmp_path):
    rep = tiny_report()
    for r in rep.rows:
        if r.section == "forward" and r.layer is not None:
            r.isolated = Comparison(r.name, 1.5e-7, 1.5e-7, (0,), r.comparison.tolerance, True, (2, 3))
    page = write_html([rep], tmp_path / "r.html").read_text()
    assert "float32 isolated" in page and "1.5e-07" in page


def test_skipped_sections_and_full_notes_are_shown_when_the_report_has_them(tmp_path):
    rep = tiny_report()
    rep.skipped = {"generation": "streamed: generate() needs every layer per token"}
    rep.rows[1].comparison.nonfinite = "both"  # Row.full_note then leads with the non-finite note
    page = write_html([rep], tmp_path / "r.html").read_text()
    assert "incomplete: not checked: generation (streamed: generate() needs every layer per token)" in page
    assert rep.rows[1].full_note.startswith("both twins produced non-finite values")
    assert "both twins produced non-finite values" in page and "(incomplete)" in page
