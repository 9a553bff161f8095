"""The measured error of one component, read from `twinlm check` / `twinlm demo` JSON.

Rows of a report are assigned to pages by `components.component_of_row`: attention weights to
attention, each gradient to the page owning its parameter, KV-cache rows to attention, and so on.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

from .components import component_of_row
from .html import esc, ratio_class, share

__all__ = ["load_reports", "measured_html", "worst_by_dtype"]


def load_reports(path: str | os.PathLike) -> list[Any]:
    """Reports from a JSON file: one report (`check --json`) or a list of them (`demo`'s parity.json)."""
    from parity.report import Report

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    items = data if isinstance(data, list) else [data]
    if not all(isinstance(d, dict) and "rows" in d for d in items):
        raise ValueError(f"{path}: not a twinlm check/demo JSON report (expected objects with 'rows')")
    try:
        return [Report.from_dict(d) for d in items]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a twinlm check/demo JSON report (a row lacks {e})") from None


def _ratio(c: Any) -> float:
    if c.tolerance > 0:
        return c.rel / c.tolerance
    return 0.0 if c.rel == 0 else math.inf


def _fig(x: float) -> str:
    if x == 0:
        return "0"
    return f"{x:.1e}" if math.isfinite(x) else str(x)


def _rows_of(reports: Sequence[Any], slug: str) -> list[tuple[Any, Any]]:
    """The rows of `slug`'s component; the model page also gets every hidden state (the whole
    stack, layer by layer)."""
    out = []
    for rep in reports:
        for row in rep.rows:
            if row.status == "n/a":
                continue
            mine = component_of_row(row.section, row.name, rep.head) == slug
            if slug == "model" and row.section == "forward" and not row.name.endswith("(attention weights)"):
                mine = True
            if mine:
                out.append((rep, row))
    return out


def worst_by_dtype(reports: Sequence[Any], slug: str) -> dict[str, tuple[Any, Any]]:
    """dtype -> (report, row) of the component's largest error relative to its tolerance (KV-cache
    rows, whole-model logits, are left out: they say how the cache behaves, not the layer)."""
    out: dict[str, tuple[Any, Any]] = {}
    for rep, row in _rows_of(reports, slug):
        if row.section == "kv cache" or row.quantity == "tokens":
            continue
        best = out.get(rep.dtype)
        if best is None or _ratio(row.comparison) > _ratio(best[1].comparison):
            out[rep.dtype] = (rep, row)
    return out


def _model(rep: Any) -> str:
    return rep.title.rsplit(" (", 1)[0]


def _cell(c: Any, who: str, isolated: Any = None) -> str:
    if c.tolerance == 0:  # counted, not measured: generated tokens
        text = "identical" if c.max_abs == 0 else f"{c.max_abs:g} differ"
        return f"<td class='num {'r0' if c.passed else 'r4'}' title='{esc(who)}'>{text}</td>"
    r = _ratio(c)
    title = f"{who}: {c.rel:.3e} relative, {share(r)} of the tolerance {c.tolerance:.0e}"
    text = _fig(c.rel)
    if isolated is not None:
        title += f"; isolated {isolated.rel:.3e}"
        text += f" <span class='muted'>/ {_fig(isolated.rel)}</span>"
    return f"<td class='num {ratio_class(r)}' title='{esc(title)}'>{text}</td>"


def _what(row: Any) -> str:
    """The measured quantity without its layer: `model.layers.3.self_attn (attention weights)` ->
    `attention weights`; a parameter's gradient -> its pattern."""
    from .params import pattern_of

    if row.section == "gradients":
        return "∇ " + pattern_of(row.name)
    if row.section == "forward" and "(" in row.name:
        return row.name[row.name.rindex("(") + 1:-1]
    return row.name


def measured_html(reports: Sequence[Any], slug: str) -> str:
    """The page's "Measured" section (empty string when the report has no row for it)."""
    from parity.tolerances import TOLERANCES

    rows = _rows_of(reports, slug)
    if not rows:
        return ""
    parts = []
    worst = worst_by_dtype(reports, slug)
    parts.append("<div class='cards'>")
    for dtype, (rep, row) in worst.items():
        r = _ratio(row.comparison)
        parts.append(f"<div class='card {ratio_class(r)}'>{esc(dtype)}: worst <b>{_fig(row.comparison.rel)}</b> "
                     f"= {share(r)} of the tolerance {row.comparison.tolerance:.0e}<br>"
                     f"<span class='small'>{esc(row.name)} in {esc(_model(rep))}</span></div>")
    parts.append("</div>")
    has_isolated = any(getattr(row, "isolated", None) is not None for _, row in rows)
    if has_isolated:
        parts.append("<p class='small muted'>Each cell: chained / <span class='muted'>isolated</span> "
                     "(isolated: both twins fed the reference's input to that layer).</p>")
    # per quantity: a table of models x layers
    by_what: dict[str, list[tuple[Any, Any]]] = {}
    for rep, row in rows:
        by_what.setdefault(_what(row), []).append((rep, row))
    layered = {w: rs for w, rs in by_what.items() if any(r.layer is not None for _, r in rs)}
    flat = {w: rs for w, rs in by_what.items() if w not in layered}
    grads = {w: rs for w, rs in layered.items() if w.startswith("∇")}
    forward = {w: rs for w, rs in layered.items() if w not in grads}
    for what, rs in forward.items():
        n = max(r.layer for _, r in rs if r.layer is not None) + 1
        parts.append(f"<h3 class='plain'>{esc(what)}, per layer</h3>")
        parts.append("<table class='data'><tr><th>model (dtype)</th>" +
                     "".join(f"<th>layer {i}</th>" for i in range(n)) + "</tr>")
        by_rep: dict[str, dict[int, Any]] = {}
        for rep, r in rs:
            by_rep.setdefault(rep.title, {})[r.layer] = r
        for title, cells in by_rep.items():
            parts.append(f"<tr><td>{esc(title)}</td>" + "".join(
                _cell(cells[i].comparison, title, getattr(cells[i], "isolated", None)) if i in cells else "<td></td>"
                for i in range(n)) + "</tr>")
        parts.append("</table>")
    if grads:
        n = max(r.layer for rs in grads.values() for _, r in rs if r.layer is not None) + 1
        dtypes = list(dict.fromkeys(rep.dtype for rs in grads.values() for rep, _ in rs))
        parts.append("<h3 class='plain'>gradients of this component's parameters, worst over the models</h3>")
        parts.append("<table class='data'><tr><th>parameter</th><th>dtype</th>" +
                     "".join(f"<th>layer {i}</th>" for i in range(n)) + "</tr>")
        for what, rs in grads.items():
            for dtype in dtypes:
                cells: dict[int, tuple[Any, Any]] = {}
                for rep, r in rs:
                    if rep.dtype == dtype and (r.layer not in cells or
                                               _ratio(r.comparison) > _ratio(cells[r.layer][1].comparison)):
                        cells[r.layer] = (rep, r)
                if not cells:
                    continue
                parts.append(f"<tr><td class='mono'>{esc(what[2:])}</td><td>{esc(dtype)}</td>" + "".join(
                    _cell(cells[i][1].comparison, _model(cells[i][0]), getattr(cells[i][1], "isolated", None))
                    if i in cells else "<td></td>" for i in range(n)) + "</tr>")
        parts.append("</table>")
    if flat:
        # one row per report, one column per measured quantity (`... (logits)` and `... (last hidden
        # state)` share a column: the note under the table says which the heads use)
        columns = list(dict.fromkeys(re.sub(r" \([^)]*\)$", "", w) for w in flat))
        cells: dict[str, dict[str, Any]] = {}
        notes: dict[str, str] = {}
        for what, rs in flat.items():
            column = re.sub(r" \([^)]*\)$", "", what)
            for rep, r in rs:
                cells.setdefault(rep.title, {})[column] = r
                if r.note:
                    notes.setdefault(r.note, rep.title)
        parts.append("<h3 class='plain'>whole-model figures</h3><table class='data'><tr><th>model (dtype)</th>"
                     + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>")
        for title, row in cells.items():
            parts.append(f"<tr><td>{esc(title)}</td>" + "".join(
                _cell(row[c].comparison, f"{title}, {row[c].name}") if c in row else "<td></td>" for c in columns)
                + "</tr>")
        parts.append("</table>")
        if notes:
            parts.append("<p class='small muted'>" + "; ".join(esc(n) for n in list(notes)[:4]) + ".</p>")
    dtypes = list(dict.fromkeys(rep.dtype for rep, _ in rows))
    parts.append("<table class='data'><tr><th>dtype</th><th>tolerance (activations / logits / loss / gradients; floor)</th>"
                 "<th>why it is what it is</th></tr>")
    for dtype in dtypes:
        t = TOLERANCES.get(dtype)
        if t is None:
            continue
        parts.append(f"<tr><td>{esc(dtype)}</td><td class='num'>{t.activations:.0e} / {t.logits:.0e} / "
                     f"{t.loss:.0e} / {t.gradients:.0e}; {t.floor:g}</td><td class='small'>{esc(t.reason)}</td></tr>")
    parts.append("</table><p class='small muted'>Relative error: max |flax - torch| / max(floor, max |torch|), floor per dtype (tolerance table); "
                 "colours: green &le; 1% of the tolerance, yellow &le; 50%, orange &le; 100%, red: fails.</p>")
    return "\n".join(parts)
