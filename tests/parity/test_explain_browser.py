"""In a real browser, when one is installed: headless Chromium renders the explain index, the
attention page and a failing report to PNG, and each page fits a 1400 px wide window.

Skipped (with a message) when no `chromium` is on PATH: CI does not depend on a browser.
Debian: `apt-get install chromium`.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from parity.explain.site import write_site
from parity.explain.report_html import write_html

from tests.helpers.reports import tiny_report as _report

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: the browser rendering check is skipped")
WIDTH = 1400


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--hide-scrollbars"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=90)


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_pages_render_and_fit_1400px(tmp_path):
    site = tmp_path / "explain"
    write_site(site, [_report("float32"), _report("bfloat16", title="tiny (bfloat16)")])
    report = write_html([_report(broken_layer=1, title="broken (float32)")], tmp_path / "report.html", explain=site)
    pages = [site / "index.html", site / "attention.html", report]
    for page in pages:
        png = tmp_path / f"{page.stem}.png"
        proc = _chromium(tmp_path, f"--window-size={WIDTH},1200", f"--screenshot={png}", page.as_uri())
        assert png.is_file(), f"chromium wrote no screenshot of {page.name}: {proc.stderr[-2000:]}"
        assert _png_size(png) == (WIDTH, 1200) and png.stat().st_size > 20_000, page.name
    # Widths, measured by the browser: a harness page (the only script here, not part of the
    # product) loads each page in a 1400 px frame and writes the frame's scroll width into its DOM.
    frames = "".join(f"<iframe width='{WIDTH}' height='900' src='{p.as_uri()}'></iframe>" for p in pages)
    harness = tmp_path / "harness.html"
    harness.write_text(
        f"<html><body style='margin:0'>{frames}<pre id='out'></pre><script>"
        "window.addEventListener('load', () => { const out = [];"
        " for (const f of document.querySelectorAll('iframe')) {"
        "  const d = f.contentDocument.documentElement; out.push(f.src.split('/').pop() + ' ' + d.scrollWidth); }"
        " document.getElementById('out').textContent = 'WIDTHS ' + out.join(';'); });"
        "</script></body></html>")
    proc = _chromium(tmp_path, "--allow-file-access-from-files", "--virtual-time-budget=10000",
                     f"--window-size={WIDTH + 40},1000", "--dump-dom", harness.as_uri())
    found = re.search(r'<pre id="out">WIDTHS ([^<]*)</pre>', proc.stdout)
    assert found, f"the harness reported no widths: {proc.stdout[-500:]} {proc.stderr[-1000:]}"
    widths = dict(item.rsplit(" ", 1) for item in found.group(1).split(";"))
    assert len(widths) == len(pages)
    for name, width in widths.items():
        assert int(width) <= WIDTH, f"{name} is {width} px wide, more than a {WIDTH} px window"
