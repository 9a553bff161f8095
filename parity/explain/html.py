"""HTML building blocks shared by the explain site and the parity report: escaping, the one
stylesheet, Python source highlighting, the side-by-side rows, small SVG charts.

Everything is static: no script, no external font or URL. Colours are chosen to stay readable
when printed in grey (status is also said in words or symbols, never by colour alone).
"""

from __future__ import annotations

import difflib
import html
import keyword
import math
import re
from typing import Iterable, Sequence

__all__ = ["CSS", "diff_marks", "esc", "highlight", "log_plot_svg", "page", "ratio_class", "share"]


def esc(x: object) -> str:
    """HTML-escaped text."""
    return html.escape(str(x), quote=True)


CSS = """
:root{--ink:#1d232b;--muted:#5f6b7a;--line:#dde3ea;--bg:#fbfcfd;--panel:#fff;--accent:#2f5fb3;
--same:#fff;--idiom:#eaf2ff;--idiom-ink:#1f4f9c;--differs:#fff4e0;--differs-ink:#8a5300;--one:#fdf0f0;
--pass:#1e7a3c;--fail:#b3261e;--na:#6b7280;--mark:#ffe38a;--code:12.5px}
*{box-sizing:border-box}
html{scroll-padding-top:56px}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--ink);background:var(--bg)}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
header.top{position:sticky;top:0;z-index:10;background:#17202c;color:#e8edf3;padding:0 20px;
display:flex;align-items:center;gap:18px;height:44px;font-size:13.5px;white-space:nowrap}
header.top a{color:#cfe0ff}header.top a.here{color:#fff;font-weight:600;border-bottom:2px solid #8fb6ff}
header.top .brand{font-weight:700;color:#fff;margin-right:6px}
header.top{overflow:visible}
details.menu{position:relative}details.menu summary{cursor:pointer;color:#cfe0ff;list-style:none}
details.menu summary::after{content:" ▾"}
details.menu div{position:absolute;top:30px;left:0;background:#17202c;padding:6px 12px;border-radius:0 0 6px 6px;
display:flex;flex-direction:column;gap:4px;min-width:240px;box-shadow:0 4px 12px rgba(0,0,0,.25)}
table.data.rows{width:100%;table-layout:fixed}table.data.rows td{overflow-wrap:anywhere}
main{max-width:1360px;margin:0 auto;padding:18px 20px 60px}
h1{font-size:26px;margin:10px 0 4px}h2{font-size:19px;margin:34px 0 8px;padding-bottom:4px;border-bottom:1px solid var(--line)}
h3{font-size:16.5px;margin:28px 0 6px}
h3.group{color:#2f5fb3;margin-top:34px}
h4{font-size:15px;margin:20px 0 3px;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
p.lead{font-size:16px;color:#2b3542;max-width:980px;margin:4px 0 12px}
.muted{color:var(--muted)}.small{font-size:12.5px}
nav.toc{font-size:13.5px;margin:8px 0 14px;color:var(--muted)}nav.toc a{margin-right:14px}
table.data{border-collapse:collapse;font-size:13px;background:var(--panel);margin:6px 0 10px}
table.data th,table.data td{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
table.data th{background:#f1f4f8;font-weight:600}
table.data td.num{white-space:nowrap;text-align:right;font-variant-numeric:tabular-nums;font-family:ui-monospace,Menlo,Consolas,monospace}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.pass{color:var(--pass);font-weight:600}.fail{color:var(--fail);font-weight:700}.na{color:var(--na)}
tr.failrow td{background:#fdecea}
.r0{background:#e7f5ea}.r1{background:#f3f8d9}.r2{background:#fff3cd}.r3{background:#fde2c8}.r4{background:#f9c9c4}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{background:var(--panel);border:1px solid var(--line);border-radius:6px;padding:8px 12px;font-size:13px;min-width:180px}
.card b{font-size:15px}
/* side by side */
table.sbs{width:100%;border-collapse:collapse;table-layout:fixed;background:var(--panel);border:1px solid var(--line);margin:4px 0 8px}
table.sbs col.pane{width:43%}table.sbs col.ln{width:38px}table.sbs col.why{width:14%}
table.sbs th{font-size:12px;text-align:left;background:#f1f4f8;padding:4px 8px;border-bottom:1px solid var(--line);font-weight:600}
table.sbs td{vertical-align:top;padding:1px 6px;border-bottom:1px solid #f0f2f5}
table.sbs td.ln{color:#9aa5b1;font:11px/1.55 ui-monospace,Menlo,Consolas,monospace;text-align:right;padding-right:4px;user-select:none}
table.sbs pre{margin:0;white-space:pre-wrap;overflow-wrap:anywhere;font:var(--code)/1.5 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;tab-size:4}
table.sbs td.why{font-size:11.5px;line-height:1.35;color:var(--muted);padding-top:3px}
tr.s-idiom td.pane{background:var(--idiom)}
tr.s-differs td.pane{background:var(--differs)}
tr.s-torch td.pane,tr.s-flax td.pane{background:var(--differs)}
tr.s-ok td.pane{background:var(--idiom)}
td.gap{background:repeating-linear-gradient(135deg,#fafbfc 0 6px,#f0f2f5 6px 12px)!important}
tr.s-doc pre{color:#6b7a8c}
tr.skip td{background:#f6f7f9;color:var(--muted);font-size:12px;text-align:center;padding:2px}
mark{background:var(--mark);color:inherit;border-radius:2px;padding:0 1px}
tr.s-same mark{background:#dbe8ff}
.tag{display:inline-block;border:1px solid #b8cdf0;background:#f3f7ff;color:var(--idiom-ink);border-radius:3px;
padding:0 4px;margin:1px 2px 1px 0;font-size:11px;white-space:nowrap}
.tag.warn{border-color:#e8c48a;background:#fff8ec;color:var(--differs-ink)}
.k{color:#7a2e9c;font-weight:600}.s{color:#1f7a4d}.c{color:#7c8794;font-style:italic}.n{color:#a35200}.f{color:#1f4f9c}
.legend span{display:inline-block;margin-right:14px;font-size:12.5px}
.legend i{display:inline-block;width:14px;height:12px;border:1px solid var(--line);vertical-align:-2px;margin-right:4px}
.pairmeta{font-size:12.5px;color:var(--muted);margin:0 0 4px}
.pairmeta b{color:var(--ink)}
svg text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif}
.flow a rect{transition:none}.flow a:hover rect{stroke:#2f5fb3;stroke-width:2.5}
.note{background:#f6f8fb;border-left:3px solid #9db7e3;padding:6px 10px;font-size:13.5px;margin:8px 0;max-width:1000px}
.bad{background:#fdecea;border-left:3px solid var(--fail)}
footer{color:var(--muted);font-size:12px;margin-top:40px;border-top:1px solid var(--line);padding-top:8px}
@media print{header.top{position:static}}
"""


def page(title: str, body: str, nav: str = "", css_href: str | None = None) -> str:
    """A whole HTML document: the stylesheet linked (a site) or inlined (one self-contained file)."""
    style = f"<link rel='stylesheet' href='{esc(css_href)}'>" if css_href else f"<style>{CSS}</style>"
    return (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{esc(title)}</title>{style}</head>\n<body>{nav}<main>\n{body}\n</main></body></html>\n")


# ---- Python highlighting -----------------------------------------------------------------------
_TOKEN = re.compile(
    r"(?P<c>#[^\n]*)"
    r"|(?P<s>(?:[rRbBuUfF]{1,2})?(?:\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'))"
    r"|(?P<w>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<n>\d[\d_]*(?:\.\d*)?(?:[eE][+-]?\d+)?)"
    r"|(?P<sp>\s+)"
    r"|(?P<o>.)", re.S)
_KEYWORDS = set(keyword.kwlist) | {"self", "cls"}


def _lex(text: str) -> list[tuple[str, str]]:
    out = []
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        tok = m.group()
        if kind == "w" and tok in _KEYWORDS:
            kind = "k"
        out.append((kind, tok))
    return out


def diff_marks(a: str, b: str) -> tuple[set[int], set[int]]:
    """Indices of the lexed tokens of `a` and of `b` that differ (whitespace and comments ignored)."""
    la, lb = _lex(a), _lex(b)
    ia = [i for i, (k, _) in enumerate(la) if k not in ("sp", "c")]
    ib = [i for i, (k, _) in enumerate(lb) if k not in ("sp", "c")]
    sm = difflib.SequenceMatcher(None, [la[i][1] for i in ia], [lb[i][1] for i in ib], autojunk=False)
    ma, mb = set(), set()
    for op, a0, a1, b0, b1 in sm.get_opcodes():
        if op != "equal":
            ma.update(ia[a0:a1])
            mb.update(ib[b0:b1])
    return ma, mb


def highlight(text: str, marks: Iterable[int] = ()) -> str:
    """Python source as highlighted HTML; tokens whose index is in `marks` are wrapped in <mark>."""
    marks = set(marks)
    out = []
    toks = _lex(text)
    for i, (kind, tok) in enumerate(toks):
        cls = {"k": "k", "s": "s", "c": "c", "n": "n"}.get(kind)
        if kind == "w" and i + 1 < len(toks) and toks[i + 1][1] == "(":
            cls = "f"
        piece = esc(tok)
        if cls:
            piece = f"<span class='{cls}'>{piece}</span>"
        if i in marks:
            piece = f"<mark>{piece}</mark>"
        out.append(piece)
    return "".join(out)


def share(ratio: float) -> str:
    """An error as a share of its tolerance: `<0.01%`, `12%`, or `540×` once far past it."""
    if not math.isfinite(ratio):
        return "∞"
    if ratio < 1e-4:
        return "<0.01%" if ratio > 0 else "0%"
    return f"{100 * ratio:.2g}%" if ratio < 10 else f"{ratio:.3g}×"


# ---- figures -----------------------------------------------------------------------------------
def ratio_class(ratio: float) -> str:
    """A cell class for an error as a share of its tolerance (r0 <= 1%, r1 <= 10%, r2 <= 50%,
    r3 <= 100%, r4 above: a failure)."""
    if not math.isfinite(ratio) or ratio > 1:
        return "r4"
    return "r0" if ratio <= 0.01 else "r1" if ratio <= 0.1 else "r2" if ratio <= 0.5 else "r3"


_PALETTE = ["#2f5fb3", "#d9730d", "#2e8b57", "#b3261e", "#7a2e9c", "#00838f", "#8d6e63", "#5f6b7a"]
_DASHES = ["", "6 3", "2 3", "8 3 2 3"]


def log_plot_svg(series: Sequence[tuple[str, Sequence[tuple[float, float]], int, int]],
                 hlines: Sequence[tuple[str, float, int]], xlabels: Sequence[str], *,
                 width: int = 760, height: int = 300, ylabel: str = "", floor: float = 1e-18,
                 xlabel: str = "decoder layer (the last point includes the final norm)", x0: int = -1) -> str:
    """A line chart on a log y axis as inline SVG.

    `series`: (label, [(x, y)], colour index, dash index); `hlines`: (label, y, colour index),
    drawn dashed; `xlabels[i]` labels x = i + x0 (by default x = -1 is the embedding). Zeros are
    drawn at `floor`.
    """
    ys = [max(y, floor) for _, pts, _, _ in series for _, y in pts if math.isfinite(y)] + [y for _, y, _ in hlines]
    if not ys:
        return ""
    lo = math.floor(math.log10(min(ys))) - (1 if min(ys) == floor else 0)
    hi = math.ceil(math.log10(max(ys)))
    hi = max(hi, lo + 1)
    legend_w = 250
    left, right, top, bottom = 62, width - legend_w, 14, height - 40
    nx = max(len(xlabels), 2)

    def px(x: float) -> float:
        return left + (x - x0) / (nx - 1) * (right - left)

    def py(y: float) -> float:
        v = math.log10(max(y, floor)) if math.isfinite(y) else hi
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    parts = [f"<svg width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
             f"role='img' aria-label='{esc(ylabel)}'>",
             f"<rect x='{left}' y='{top}' width='{right - left}' height='{bottom - top}' fill='#fff' stroke='#cfd6de'/>"]
    step = max(1, (hi - lo) // 8)
    for e in range(lo, hi + 1, step):
        y = py(10.0 ** e)
        parts.append(f"<line x1='{left}' x2='{right}' y1='{y:.1f}' y2='{y:.1f}' stroke='#eef1f4'/>"
                     f"<text x='{left - 6}' y='{y + 4:.1f}' font-size='11' text-anchor='end' fill='#5f6b7a'>1e{e}</text>")
    every = max(1, math.ceil(len(xlabels) / 24))
    for i, lab in enumerate(xlabels):
        if i % every == 0 or i == len(xlabels) - 1:
            parts.append(f"<text x='{px(i + x0):.1f}' y='{bottom + 15}' font-size='11' text-anchor='middle' "
                         f"fill='#5f6b7a'>{esc(lab)}</text>")
    parts.append(f"<text x='{(left + right) / 2:.0f}' y='{height - 6}' font-size='11.5' text-anchor='middle' "
                 f"fill='#2b3542'>{esc(xlabel)}</text>")
    parts.append(f"<text transform='translate(13,{(top + bottom) / 2:.0f}) rotate(-90)' font-size='11.5' "
                 f"text-anchor='middle' fill='#2b3542'>{esc(ylabel)}</text>")
    legend = []
    for label, y, c in hlines:
        yy = py(y)
        col = _PALETTE[c % len(_PALETTE)]
        parts.append(f"<line x1='{left}' x2='{right}' y1='{yy:.1f}' y2='{yy:.1f}' stroke='{col}' stroke-width='1.2' "
                     f"stroke-dasharray='7 4' opacity='0.8'/>")
        legend.append((label, col, "7 4", False))
    for label, pts, c, d in series:
        col, dash = _PALETTE[c % len(_PALETTE)], _DASHES[d % len(_DASHES)]
        pts = [(x, y) for x, y in pts]
        path = " ".join(f"{'M' if i == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for i, (x, y) in enumerate(pts))
        parts.append(f"<path d='{path}' fill='none' stroke='{col}' stroke-width='1.8' "
                     f"{f'stroke-dasharray={chr(39)}{dash}{chr(39)}' if dash else ''}/>")
        for x, y in pts:
            bad = not math.isfinite(y)
            parts.append(f"<circle cx='{px(x):.1f}' cy='{py(y):.1f}' r='{3.2 if not bad else 4.5}' "
                         f"fill='{col if not bad else '#b3261e'}'><title>{esc(label)}: {esc(xlabels[int(x - x0)] if 0 <= int(x - x0) < len(xlabels) else x)} "
                         f"{y:.2e}</title></circle>")
        legend.append((label, col, dash, True))
    for i, (label, col, dash, solid) in enumerate(legend[:16]):
        y = top + 8 + i * 17
        parts.append(f"<line x1='{right + 14}' x2='{right + 40}' y1='{y}' y2='{y}' stroke='{col}' stroke-width='2' "
                     f"{f'stroke-dasharray={chr(39)}{dash}{chr(39)}' if dash else ''}/>"
                     f"<text x='{right + 46}' y='{y + 4}' font-size='11.5' fill='#2b3542'>{esc(label[:44])}</text>")
    parts.append("</svg>")
    return "".join(parts)
