"""Checks on the HTML the explain site and the parity report write: nothing scripted, nothing
fetched from elsewhere."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

__all__ = ["assert_self_contained"]


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


def assert_self_contained(page: Path) -> None:
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
