"""The parity report as one self-contained HTML file (`twinlm check --html`, `compare --html`,
`twinlm demo`).

Top to bottom: a sticky navigation; a summary with one row per model x dtype (pass/fail, the
worst figure as a share of its tolerance, the first divergence), failing checks first; the
failing rows, each linked to the `twinlm explain` page of its component; then per model the
inputs, a per-layer plot (chained and isolated errors when the check measured both) and every
row; last the environment (whatever each report's `meta` records). No script, no external file:
CSS inline, plots as inline SVG.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

from ..report import format_timings
from .components import BY_SLUG, component_of_row
from .html import esc, log_plot_svg, page, ratio_class, share

__all__ = ["render_report", "write_html"]


def _ratio(c: Any) -> float:
    if c.tolerance > 0:
        return c.rel / c.tolerance
    return 0.0 if c.rel == 0 else math.inf


def _fig(x: float) -> str:
    if x == 0:
        return "0"
    return f"{x:.1e}" if math.isfinite(x) else str(x)


def _model_of(rep: Any) -> str:
    return rep.title.rsplit(" (", 1)[0] if rep.title.endswith(")") else rep.title


def _id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "report"


def _worst_member(rep: Any, row: Any) -> Any:
    """For a folded gradient row (a parameter group), the member it shows; else the row."""
    from parity.report import parameter_group

    if row.section != "gradients":
        return row
    members = [r for r in rep.rows if r.section == "gradients" and parameter_group(r.name) == row.name]
    return max(members, key=lambda r: _ratio(r.comparison), default=row)


def _explain_link(explain: str | None, rep: Any, row: Any) -> str:
    row = _worst_member(rep, row)
    slug = component_of_row(row.section, row.name, rep.head)
    title = BY_SLUG[slug].title
    if explain is None:
        return f"<span title='run twinlm explain for this page'>{esc(title)}</span>"
    return f"<a href='{esc(explain)}/{slug}.html#measured'>{esc(title)}</a>"


def _plot(reps: Sequence[Any]) -> str:
    """Hidden-state error per layer for one model: a line per dtype (isolated dashed, when measured)."""
    series, hlines, n = [], [], 0
    dtypes = list(dict.fromkeys(r.dtype for r in reps))
    for rep in reps:
        pts, iso = [], []
        for r in rep.rows:
            hidden = r.name.endswith(("(output)", "(embeddings)")) or r.name.startswith("hidden_states.")
            if r.section == "forward" and hidden and r.status != "n/a":
                x = -1 if r.layer is None else r.layer
                pts.append((x, r.comparison.rel))
                if getattr(r, "isolated", None) is not None:
                    iso.append((x, r.isolated.rel))
        if not pts:
            continue
        n = max(n, max(x for x, _ in pts) + 1)
        c = dtypes.index(rep.dtype)
        series.append((f"{rep.dtype}" + (" chained" if iso else ""), pts, c, 0))
        if iso:
            series.append((f"{rep.dtype} isolated", iso, c, 1))
        tol = next((r.comparison.tolerance for r in rep.rows if r.section == "forward"), None)
        if tol:
            hlines.append((f"{rep.dtype} tolerance", tol, c))
    if not series:
        return ""
    labels = ["embed"] + [str(i) for i in range(n)]
    return log_plot_svg(series, hlines, labels, width=820, height=260,
                        ylabel="relative error (log)")


def _row_cells(rep: Any, r: Any, explain: str | None) -> str:
    c = r.comparison
    shape = "x".join(map(str, c.shape)) if c.shape else ""
    status = "<td class='fail'>✗ fail" if r.status == "fail" else "<td class='pass'>✓ pass"
    if r.status == "n/a":
        figs = "<td class='num na'>-</td><td class='num na'>-</td><td class='num na'>-</td><td class='na'>n/a</td>"
    elif r.quantity == "tokens":  # counted, not measured: how many generated tokens differ
        what = "exact" if c.max_abs == 0 else f"{100 * c.rel:.3g}% differ" if math.isfinite(c.rel) else "-"
        figs = (f"<td class='num'>{_fig(c.max_abs)}</td><td class='num {'r0' if c.max_abs == 0 else 'r2'}'>{what}</td>"
                f"<td class='num'>-</td>{status}</td>")
    else:
        ratio = _ratio(c)
        iso = getattr(r, "isolated", None)
        rel = _fig(c.rel) + (f" <span class='muted'>/ {_fig(iso.rel)}</span>" if iso is not None else "")
        figs = (f"<td class='num'>{_fig(c.max_abs)}</td><td class='num {ratio_class(ratio)}'>{rel}</td>"
                f"<td class='num'>{c.tolerance:.0e}</td>{status} <span class='small muted'>{share(ratio)}</span></td>")
    note = getattr(r, "full_note", r.note)  # with the non-finite note, where the report has one
    return (f"<td class='mono'>{esc(c.name)}</td><td class='mono small'>{esc(shape)}</td>{figs}"
            f"<td class='small'>{_explain_link(explain, rep, r)}</td><td class='small'>{esc(note)}</td>")


def _skipped(rep: Any) -> dict:
    """Sections the check did not run, and why (`Report.skipped`, where the report has it)."""
    skipped = getattr(rep, "skipped", None)
    return dict(skipped) if isinstance(skipped, dict) else {}


_ROW_HEAD = ("<colgroup><col style='width:27%'><col style='width:8%'><col style='width:7%'><col style='width:9%'>"
             "<col style='width:5%'><col style='width:11%'><col style='width:14%'><col></colgroup><tr><th>tensor</th><th>shape</th><th>max abs</th><th>relative error</th><th>tol</th><th>status</th>"
             "<th>component</th><th>note</th></tr>")


def _meta_table(meta: dict) -> str:
    rows = []
    for k, v in meta.items():
        if k == "describe":
            continue
        if isinstance(v, dict):
            v = "; ".join(f"{a}: {b}" for a, b in v.items())
        elif isinstance(v, (list, tuple)):
            v = ", ".join(map(str, v))
        rows.append(f"<tr><td>{esc(k)}</td><td class='mono small'>{esc(v)}</td></tr>")
    return "<table class='data'>" + "".join(rows) + "</table>" if rows else ""


def _versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("twinlm", "numpy", "torch", "jax", "jaxlib", "flax", "safetensors", "ml_dtypes"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def render_report(reports: Sequence[Any], title: str = "twinlm parity report", explain: str | None = None) -> str:
    """The whole page as a string. `explain`: href of a `twinlm explain` site (relative to the
    page), for the links from each row to its component's page."""
    reports = list(reports)
    failing = [r for r in reports if not r.passed]
    order = failing + [r for r in reports if r.passed]
    ids = {id(rep): _id(rep.title) for rep in reports}
    models = list(dict.fromkeys(_model_of(r) for r in reports))
    nav = ["<a href='#summary'>Summary</a>"]
    if failing:
        nav.append(f"<a href='#failures' class='fail'>Failures ({len(failing)})</a>")
    model_links = [f"<a href='#m-{_id(m)}'>{esc(m)}</a>" for m in models]
    if len(models) <= 4:
        nav += model_links
    else:  # a menu that opens without script
        nav.append(f"<details class='menu'><summary>Models ({len(models)})</summary><div>{''.join(model_links)}</div>"
                   "</details>")
    nav.append("<a href='#environment'>Environment</a>")
    if explain:
        nav.append(f"<a href='{esc(explain)}/index.html'>Explain the code ↗</a>")
    header = f"<header class='top'><span class='brand'>twinlm parity</span>{''.join(nav)}</header>"

    verdict = (f"<p class='lead'><span class='fail'>FAIL</span>: {len(failing)} of {len(reports)} checks have a "
               "tensor out of tolerance. They are listed first.</p>" if failing else
               f"<p class='lead'><span class='pass'>PASS</span>: all {len(reports)} checks within tolerance.</p>")
    parts = [f"<h1>{esc(title)}</h1>", verdict]
    # summary
    parts.append("<h2 id='summary'>Summary</h2><table class='data'><tr><th>model</th><th>dtype</th><th>head</th>"
                 "<th>status</th><th>worst (share of tolerance)</th><th>first divergence</th><th>rows</th></tr>")
    for rep in order:
        w = rep.worst()
        ratio = _ratio(w.comparison) if w else 0.0
        first = rep.first_failure()
        worst = (f"<td class='num {ratio_class(ratio)}'>{share(ratio)} <span class='small muted'>"
                 f"{_fig(w.comparison.rel)} · {esc(w.name)}</span></td>" if w else "<td>-</td>")
        diverge = (f"<td class='small'>{esc(first.name)} → {_explain_link(explain, rep, first)}</td>"
                   if first else "<td class='muted small'>none</td>")
        status = "<td class='fail'>✗ FAIL</td>" if not rep.passed else "<td class='pass'>✓ pass</td>"
        if _skipped(rep):
            status = status[:-5] + f" <span class='small muted'>(incomplete)</span></td>"
        n_fail = len(rep.failures())
        parts.append(f"<tr{' class=failrow' if not rep.passed else ''}><td><a href='#{ids[id(rep)]}'>"
                     f"{esc(_model_of(rep))}</a></td><td>{esc(rep.dtype)}</td><td>{esc(rep.head)}</td>{status}"
                     f"{worst}{diverge}<td class='num'>{len(rep.rows)}{f' ({n_fail} fail)' if n_fail else ''}</td></tr>")
    parts.append("</table><p class='small muted'>Relative error: max |flax - torch| / max(floor, max |torch|) (floor per dtype: tolerance table), the "
                 "torch twin as reference. Colours: green &le; 1% of the tolerance, yellow &le; 50%, orange &le; "
                 "100%, red fails.</p>")
    # failures
    if failing:
        parts.append("<h2 id='failures'>Failures</h2><p>Each failing row links to the explain page of its "
                     "component; the first row of each check is where the twins first part ways.</p>")
        for rep in failing:
            parts.append(f"<h3><a href='#{ids[id(rep)]}'>{esc(rep.title)}</a></h3><table class='data rows'>{_ROW_HEAD}")
            parts += [f"<tr class='failrow'>{_row_cells(rep, r, explain)}</tr>" for r in rep.failures()]
            parts.append("</table>")
    # per model
    for m in models:
        reps = [r for r in reports if _model_of(r) == m]
        parts.append(f"<h2 id='m-{_id(m)}'>{esc(m)}</h2>")
        plot = _plot(reps)
        if plot:
            parts.append(f"<div>{plot}</div><p class='small muted'>Hidden-state error per layer (the embedding "
                         "first, the last layer with the final norm); dashed lines: each dtype's tolerance"
                         + ("; dashed series: isolated (each layer fed the reference's input)"
                            if any(getattr(r, "isolated", None) is not None for rep in reps for r in rep.rows)
                            else "") + ". Zeros are drawn at the bottom.</p>")
        for rep in reps:
            parts.append(f"<h3 id='{ids[id(rep)]}'>{esc(rep.title)} "
                         f"{'<span class=fail>✗ FAIL</span>' if not rep.passed else '<span class=pass>✓ pass</span>'}"
                         "</h3>")
            if _skipped(rep):
                parts.append("<p class='note'>incomplete: not checked: " + "; ".join(
                    f"{esc(k)} ({esc(v)})" for k, v in _skipped(rep).items()) + "</p>")
            describe = rep.meta.get("describe", {})
            if describe:
                parts.append("<p class='small'>" + "<br>".join(f"<b>{esc(k)}</b>: {esc(v)}" for k, v in describe.items())
                             + "</p>")
            if rep.meta.get("timings"):  # the wall time of each phase, as the text table's footer
                parts.append(f"<p class='small'>{esc(format_timings(rep.meta['timings']))}</p>")
            parts.append(f"<table class='data rows'>{_ROW_HEAD}")
            section = None
            for r in rep.summary_rows():
                if r.section != section:
                    section = r.section
                    parts.append(f"<tr><th colspan='8'>{esc(section)}</th></tr>")
                parts.append(f"<tr{' class=failrow' if r.status == 'fail' else ''}>{_row_cells(rep, r, explain)}</tr>")
            parts.append("</table>")
    # environment
    parts.append("<h2 id='environment'>Environment</h2>")
    metas = [(rep.title, {k: v for k, v in rep.meta.items() if k != "describe"}) for rep in reports]
    common = {k: v for k, v in (metas[0][1].items() if metas else []) if all(m.get(k) == v for _, m in metas)}
    if common:
        parts.append("<p>Recorded by every check:</p>" + _meta_table(common))
    for t, m in metas:
        own = {k: v for k, v in m.items() if k not in common}
        if own:
            parts.append(f"<p class='small'><b>{esc(t)}</b></p>" + _meta_table(own))
    parts.append("<p>Software that rendered this page:</p>" + _meta_table(_versions()))
    return page(title, "\n".join(parts), header)


def write_html(reports: Sequence[Any], path: str | os.PathLike, title: str = "twinlm parity report",
               explain: str | os.PathLike | None = None) -> Path:
    """Write `render_report` to `path`; `explain` is the directory of a `twinlm explain` site,
    linked relative to the page."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    href = None
    if explain is not None:
        href = os.path.relpath(Path(explain).resolve(), path.parent.resolve()).replace(os.sep, "/")
    path.write_text(render_report(reports, title, href), encoding="utf-8")
    return path
