"""`twinlm explain` and the HTML parity report, structurally: every component page holds both
panes from the current source, every demo parameter sits in exactly one parameter table, the
measured figures reach their pages, and nothing is fetched from elsewhere or scripted."""

from __future__ import annotations

import html
import re

import pytest

from parity.cli import main
from parity.explain.align import mirrored_pairs
from parity.explain.components import COMPONENTS, component_of_parameter
from parity.explain.params import pattern_of
from parity.explain.site import anchor, page_pairs, write_site
from tests.helpers.html import assert_self_contained
from tests.helpers.reports import tiny_report as _report


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain")
    reports = [_report("float32"), _report("bfloat16", title="tiny (bfloat16)")]
    write_site(out, reports)
    return out


def test_every_component_page_holds_both_panes_from_the_current_source(site):
    for c in COMPONENTS:
        text = (site / f"{c.slug}.html").read_text()
        pairs = page_pairs(c)
        assert pairs, f"{c.slug}: no mirrored pair on the page"
        panes = re.findall(r"<td class='pane'><pre>(.*?)</pre></td>", text, re.S)
        assert sum(bool(re.sub(r"<[^>]+>", "", p).strip()) for p in panes) >= 2, c.slug
        # every statement of every pair is on the page, as the installed module has it
        plain = html.unescape(re.sub(r"<[^>]+>", "", text))
        for p in pairs:
            for stmt in p.torch_stmts + p.flax_stmts:
                assert stmt.text in plain, f"{c.slug}: {p.id} line {stmt.first} is not on the page"


def test_every_pair_is_on_some_page(site):
    text = "".join(p.read_text() for p in site.glob("*.html"))
    for p in mirrored_pairs():
        assert f"id='{anchor(p)}'" in text, f"{p.id} is on no page"


def test_every_demo_parameter_is_in_exactly_one_parameter_table(site):
    import torch_impl
    from parity.demo import DEMO_MODELS
    from parity.inputs import HEADS

    tables = {}
    for page in site.glob("*.html"):
        for pattern in re.findall(r"<tr data-pattern='([^']+)'>", page.read_text()):
            tables.setdefault(html.unescape(pattern), []).append(page.stem)
    for model in DEMO_MODELS:
        names = getattr(torch_impl, HEADS[model.head])(model.config).state_dict()
        for name in names:
            found = tables.get(pattern_of(name), [])
            assert len(found) == 1, f"{model.name}: {name} in {len(found)} parameter tables {found}"
            assert found[0] == component_of_parameter(name)


def test_measured_figures_reach_their_pages(site):
    attention = (site / "attention.html").read_text()
    assert "id='measured'" in attention and "tiny (float32)" in attention and "tiny (bfloat16)" in attention
    assert "3.0e-07" in attention and "q_proj.weight" in attention  # attention weights, its gradients
    assert "matmul accumulation order" in attention  # the tolerance's reason
    index = (site / "index.html").read_text()
    for c in COMPONENTS:
        assert f"href='{c.slug}.html'" in index, c.slug


def test_nothing_external_and_no_script(site):
    for page in list(site.glob("*.html")) + [site / "style.css"]:
        assert_self_contained(page)


def test_cli_explain_writes_the_site_with_a_report(tmp_path, capsys):
    path = _report().write_json(tmp_path / "r.json")
    assert main(["explain", "--out", str(tmp_path / "site"), "--report", str(path)]) == 0
    out = capsys.readouterr().out
    assert str((tmp_path / "site" / "index.html").resolve()) in out
    assert "id='measured'" in (tmp_path / "site" / "attention.html").read_text()


def test_cli_explain_refuses_a_file_that_is_not_a_report(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"a": 1}')
    assert main(["explain", "--out", str(tmp_path / "site"), "--report", str(bad)]) == 2
    assert "not a twinlm check/demo JSON report" in capsys.readouterr().err
