"""`twinlm explain` and the HTML parity report, structurally: every component page holds both
panes from the current source, every demo parameter sits in exactly one parameter table, the
measured figures reach their pages, and nothing is fetched from elsewhere or scripted."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import pytest

from parity.cli import main
from parity.explain.align import mirrored_pairs
from parity.explain.components import COMPONENTS, component_of_parameter
from parity.explain.params import pattern_of
from parity.explain.site import anchor, page_pairs, write_site
from tests.helpers.reports import tiny_report as _report


class _Refs(HTMLParser):
    """Every script, event handler, reference and inline style of a page."""

    def __init__(self):
        super().__init__()
        self.scripts, self.refs, self.styles = [], [], []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts.append("<script>")
        self._in_style = tag == "style"
        for name, value in attrs:
            if name.startswith("on") or (value or "").strip().lower().startswith("javascript:"):
                self.scripts.append(f"{tag} {name}={value}")
            if name in ("href", "src", "xlink:href", "action", "data", "poster", "srcset"):
                self.refs.append(value or "")
            if name == "style":
                self.styles.append(value or "")

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


# A stylesheet may fetch with url(...) or @import; only data: URIs and fragments stay local.
CSS_FETCH = re.compile(r"@import|url\((?!\s*['\"]?(?:data:|#))", re.I)


def _check_self_contained(page):
    """No script of any kind; every reference a local file that exists, or a fragment."""
    text = page.read_text()
    if page.suffix == ".css":
        assert not CSS_FETCH.search(text), f"{page.name}: {CSS_FETCH.search(text).group()}"
        return
    refs = _Refs()
    refs.feed(text)
    assert not refs.scripts, f"{page.name}: {refs.scripts[:3]}"
    for style in refs.styles:
        assert not CSS_FETCH.search(style), f"{page.name}: {style[:80]}"
    for ref in refs.refs:
        assert not re.match(r"[a-z][a-z0-9+.-]*:|//", ref, re.I) or ref.startswith("data:"), f"{page.name} -> {ref}"
        target = ref.split("#")[0]
        if target:
            assert (page.parent / target).resolve().is_file(), f"{page.name} links to missing {ref}"


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
        _check_self_contained(page)


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
