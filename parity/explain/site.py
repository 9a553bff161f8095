"""`twinlm explain`: the static site — one page per component, the index with the data-flow
diagram, the idiom table, the alignment figures of every mirrored pair.

Source comes from the installed twin packages (`inspect`), so a page always shows the code that
runs. With a report (`twinlm check --json` / `twinlm demo`'s parity.json) each page also shows
that component's measured error. No script, no network: HTML, one CSS file, inline SVG.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import os
import re
from pathlib import Path
from typing import Any, Sequence

from . import align as alignment
from .allowances import ALLOWANCES
from .components import BY_SLUG, COMPONENTS, Code, Component
from .html import CSS, diff_marks, esc, highlight, page, share
from .idioms import IDIOMS
from .measured import measured_html, worst_by_dtype

__all__ = ["PAGES", "anchor", "page_pairs", "pair_html", "write_site"]

PAGES = [c.slug for c in COMPONENTS]
_EXTRA = [("idioms", "Idioms"), ("alignment", "Alignment"), ("other", "Other pairs")]


# ---- navigation -------------------------------------------------------------------------------
def _nav(here: str) -> str:
    links = [("index", "Index")]
    i = PAGES.index(here) if here in PAGES else None
    if i is not None:
        if i > 0:
            links.append((PAGES[i - 1], "← " + BY_SLUG[PAGES[i - 1]].title))
        if i + 1 < len(PAGES):
            links.append((PAGES[i + 1], BY_SLUG[PAGES[i + 1]].title + " →"))
    links += _EXTRA
    items = "".join(f"<a href='{slug}.html'{' class=here' if slug == here else ''}>{esc(label)}</a>"
                    for slug, label in links)
    return f"<header class='top'><span class='brand'>twinlm explain</span>{items}</header>"


def anchor(pair: alignment.Pair) -> str:
    return "pair-" + re.sub(r"[^A-Za-z0-9]+", "-", f"{pair.module[:-3]}-{pair.qualname}").strip("-").lower()


# ---- one pair, side by side ----------------------------------------------------------------------
def _tags(row: alignment.Row) -> str:
    tags = []
    for i in row.idioms:
        idiom = IDIOMS[i]
        tags.append(f"<a class='tag' href='idioms.html#{esc(i)}' title='{esc(idiom.why)}'>"
                    f"{esc(_short(idiom))}</a>")
    if row.counts:
        label = {"differs": "differs: no known idiom", "torch": "torch only", "flax": "Flax only"}[row.status]
        tags.append(f"<span class='tag warn'>{label}</span>")
    return " ".join(tags)


def _short(idiom: Any) -> str:
    return {"forward": "forward / __call__", "super-init": "super().__init__", "rngs": "NNX init args",
            "kernel": "weight / kernel", "param": "Parameter / Param", "var-read": "v[...] read",
            "to-astype": ".to / .astype", "view-reshape": ".view / .reshape",
            "transpose-swapaxes": "transpose / swapaxes", "masked-fill": "masked_fill / where",
            "unsqueeze": "unsqueeze / None", "no-grad": "no_grad / stop_gradient", "detach": ".detach()",
            "device": "device=", "inplace-write": "in-place / functional update",
            "values-indices": ".values / .indices", "gather": "gather / take_along_axis",
            "clamp": "clamp / clip", "chunk-split": "chunk / split", "int-dtype": "int64 / int32", "pad": "F.pad / jnp.pad",
            "split-sizes": "split sizes / indices", "rng": "generator / key", "autograd": "backward / grad",
            "traced": "traced under jit", "train-mode": "train / eval flag",
            "dtype-object": "jnp.dtype(x)", "one-hot": "one_hot dtype", "tensor-array": "tensor / asarray",
            "dataclass": "dataclass / struct", "dynamic-slice": "slice / dynamic_slice"}.get(idiom.id, idiom.id)


def _pane(stmt: alignment.Stmt | None, marks: set[int], other_present: bool) -> str:
    if stmt is None:
        return "<td class='ln'></td><td class='pane gap'></td>"
    return (f"<td class='ln'>{stmt.first}</td><td class='pane'><pre>{highlight(stmt.text, marks)}</pre></td>")


def _row_html(row: alignment.Row) -> str:
    t, f = row.torch, row.flax
    mt: set[int] = set()
    mf: set[int] = set()
    if t is not None and f is not None and row.status != "doc" and _strip(t.text) != _strip(f.text):
        mt, mf = diff_marks(t.text, f.text)
    status = row.status
    if status in ("torch", "flax") and not row.counts:
        status = "ok"
    return (f"<tr class='s-{status}'>{_pane(t, mt, f is not None)}{_pane(f, mf, t is not None)}"
            f"<td class='why'>{_tags(row)}</td></tr>")


def _strip(text: str) -> str:
    return "\n".join(line.split("#")[0].rstrip() for line in text.splitlines())


def pair_html(pair: alignment.Pair, focus: str | None = None, elsewhere: str | None = None) -> str:
    """One mirrored pair: a heading, its figures, and the rows side by side (only the statements
    matching `focus`, when given; the rest fold into 'alike' rows pointing at `elsewhere`)."""
    t = pair.tally()
    allow = ALLOWANCES.get(pair.id)
    allowed = allow.rows if allow else 0
    counted = pair.drift
    verdict = ("<span class='pass'>within its allowance</span>" if counted <= allowed
               else "<span class='fail'>past its allowance</span>")
    names = pair.qualname if pair.torch_name == pair.qualname else f"{pair.torch_name} / {pair.qualname}"
    head = (f"<h4 id='{anchor(pair)}'>{esc(names)}</h4>"
            f"<p class='pairmeta'>torch_impl/{esc(pair.module)}:{pair.torch_lines[0]} &nbsp;·&nbsp; "
            f"flax_impl/{esc(pair.module)}:{pair.flax_lines[0]} &nbsp;·&nbsp; <b>{len(pair.rows)}</b> rows: "
            f"{t.get('same', 0)} alike, {t.get('idiom', 0)} by a known idiom, "
            f"<b>{counted}</b> unexplained (allowance {allowed}: {verdict})"
            + (f"<br><span class='small'>allowance: {esc(allow.reason)}</span>" if allow else "") + "</p>")
    body = []
    skipped = 0
    for row in pair.rows:
        text = (row.torch.text if row.torch else "") + "\n" + (row.flax.text if row.flax else "")
        if focus and row.status != "doc" and not re.search(focus, text) and (row.torch or row.flax).kind != "def":
            skipped += 1
            continue
        if focus and row.status == "doc":
            skipped += 1
            continue
        if skipped:
            body.append(_skip_row(skipped, elsewhere))
            skipped = 0
        body.append(_row_html(row))
    if skipped:
        body.append(_skip_row(skipped, elsewhere))
    table = ("<table class='sbs'><colgroup><col class='ln'><col class='pane'><col class='ln'><col class='pane'>"
             "<col class='why'></colgroup><tr><th></th><th>PyTorch &nbsp;<span class='muted'>torch_impl/"
             f"{esc(pair.module)}</span></th><th></th><th>Flax NNX &nbsp;<span class='muted'>flax_impl/"
             f"{esc(pair.module)}</span></th><th>why they differ</th></tr>" + "".join(body) + "</table>")
    return head + table


def _skip_row(n: int, elsewhere: str | None) -> str:
    """A fold: `n` statements not shown here; `elsewhere` is `page.html#anchor` of the full pair."""
    where = ""
    if elsewhere:
        slug = elsewhere.split(".html", 1)[0]
        where = f", all of them on the <a href='{esc(elsewhere)}'>{esc(BY_SLUG[slug].title)}</a> page"
    return f"<tr class='skip'><td colspan='5'>⋯ {n} more statement{'s' if n > 1 else ''}{where}</td></tr>"


def _single_html(title: str, where: str, text: str, first: int, note: str) -> str:
    return (f"<h4>{esc(title)}</h4><p class='pairmeta'>{esc(where)}:{first} &nbsp;·&nbsp; {esc(note)}</p>"
            "<table class='sbs'><colgroup><col class='ln'><col></colgroup>"
            f"<tr><td class='ln'>{first}</td><td class='pane'><pre>{highlight(text)}</pre></td></tr></table>")


def _shared_html(dotted: str) -> str:
    module_name, name = dotted.rsplit(".", 1)
    obj = getattr(importlib.import_module(module_name), name)
    obj = inspect.unwrap(obj)
    lines, first = inspect.getsourcelines(obj)
    where = inspect.getsourcefile(obj)
    rel = module_name.replace(".", "/") + ".py"
    return _single_html(name, rel, "".join(lines).rstrip(), first,
                        "shared numpy code: both twins call this one function (one pane)") if where else ""


def _one_sided_html(module: str, side: str, qualname: str) -> str:
    twin = "torch_impl" if side == "torch" else "flax_impl"
    text, first = alignment.source_of(twin, module, qualname)
    return _single_html(qualname, f"{twin}/{module}", text, first,
                        f"only in the {'PyTorch' if side == 'torch' else 'Flax'} twin "
                        "(a framework difference the mirror test lists)")


def _select(code: Code, done: set[str]) -> list[alignment.Pair]:
    pairs = alignment.mirrored_pairs(code.module)
    if not code.names:
        return [p for p in pairs if p.id not in done]
    out = []
    for pattern in code.names:
        out += [p for p in pairs if fnmatch.fnmatchcase(p.qualname, pattern) and p not in out]
    return out


def _code_html(component: Component) -> tuple[str, list[alignment.Pair]]:
    parts, pairs, done = [], [], set()
    for code in component.code:
        chosen = _select(code, done)
        sides = alignment.one_sided(code.module) if not code.names else {}
        if not chosen and not any(sides.values()):
            continue
        if code.title:
            parts.append(f"<h3 class='group'>{esc(code.title)}</h3>")
        for p in chosen:
            elsewhere = None
            if code.focus:
                owner = _owner_page(p, exclude=component.slug)
                elsewhere = f"{owner}.html#{anchor(p)}" if owner else None
            parts.append(pair_html(p, code.focus, elsewhere))
            if not code.focus:
                done.add(p.id)
                pairs.append(p)
        for side, names in sides.items():
            for q in names:
                parts.append(_one_sided_html(code.module, side, q))
    for dotted in component.shared:
        parts.append(_shared_html(dotted))
    return "\n".join(parts), pairs


def _owner_page(pair: alignment.Pair, exclude: str) -> str | None:
    for c in COMPONENTS:
        if c.slug == exclude:
            continue
        if any(p.id == pair.id for p in page_pairs(c)):
            return c.slug
    return None


def page_pairs(component: Component) -> list[alignment.Pair]:
    """The pairs a page shows in full (not the focused excerpts), in page order."""
    done: set[str] = set()
    out = []
    for code in component.code:
        for p in _select(code, done):
            if not code.focus:
                done.add(p.id)
                out.append(p)
    return out


# ---- figures computed from the shared code ------------------------------------------------------
def _rope_figure() -> str:
    """Wavelength of each rotary channel pair under each scaling, from `weights.shared.rope` itself."""
    import dataclasses
    import math

    from weights.config import ModelConfig, RopeScaling
    from weights.shared.rope import rope_frequencies

    from .html import log_plot_svg

    base = ModelConfig(vocab_size=32, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=4096, rope_theta=500000.0)
    variants = [("default", None, None),
                ("linear, factor 8", RopeScaling("linear", factor=8.0), None),
                ("dynamic NTK, factor 8, at 32k tokens", RopeScaling("dynamic", factor=8.0), 32768),
                ("llama3, factor 8", RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_position_embeddings=4096), None)]
    series = []
    for k, (label, scaling, seq) in enumerate(variants):
        inv, _ = rope_frequencies(dataclasses.replace(base, rope_scaling=scaling), seq)
        series.append((label, [(i, 2 * math.pi / f) for i, f in enumerate(inv)], k, 0 if k == 0 else k % 4))
    hlines = [("4096: pre-training context", 4096.0, 7)]
    svg = log_plot_svg(series, hlines, [str(i) for i in range(len(inv))], width=860, height=280,
                       ylabel="wavelength (tokens, log)", xlabel="channel pair i (head dim 64)", x0=0, floor=1.0)
    return ("<h2 id='figure'>Each scaling, computed by the shared code</h2><div>" + svg + "</div>"
            "<p class='small muted'>2π / inv_freq per channel pair, from <code>weights.shared.rope.rope_frequencies</code> "
            "(theta 500000, head dim 64). Linear slows every pair by the factor; dynamic NTK raises theta once the "
            "sequence outgrows the context; llama3 slows only the long wavelengths and keeps the short ones.</p>")


def _converter_figure() -> str:
    """The rule, one example per kind of parameter, computed by `weights.names` itself."""
    from weights.names import flax_path, is_transposed

    examples = [("a linear layer's weight", "model.layers.0.self_attn.q_proj.weight"),
                ("a linear layer's bias", "model.layers.0.self_attn.q_proj.bias"),
                ("the embedding table", "model.embed_tokens.weight"),
                ("a norm's weight", "model.layers.0.input_layernorm.weight"),
                ("an expert's weight", "model.layers.0.block_sparse_moe.experts.3.w1.weight")]
    rows = "".join(
        f"<tr><td>{esc(what)}</td><td class='mono'>{esc(name)}</td><td class='mono'>{esc(flax_path(name))}</td>"
        f"<td>{'transposed: [out, in] → [in, out]' if is_transposed(name) else 'as is'}</td></tr>"
        for what, name in examples)
    return ("<h2 id='figure'>The rule</h2><table class='data'><tr><th>kind</th><th>HF name (torch state_dict key)</th>"
            f"<th>NNX path</th><th>array</th></tr>{rows}</table><p class='small muted'>Computed by "
            "<code>weights.names.flax_path</code> and <code>is_transposed</code> (their source is at the end of this "
            "page); every page's parameter table applies the same functions. Each twin's <code>checkpoint.py</code> "
            "below is where the rule meets the framework's parameter container.</p>")


_FIGURES = {"rope": _rope_figure, "converter": _converter_figure}
_FIGURE_TITLES = {"rope": "Each scaling", "converter": "The rule"}


# ---- a component page ------------------------------------------------------------------------------
def _shapes_html(component: Component) -> str:
    if not component.shapes:
        return ""
    cells = "".join(f"<tr><td>{esc(v)}</td><td class='mono'>{esc(s)}</td></tr>" for v, s in component.shapes)
    return ("<h2 id='shapes'>Shapes</h2><table class='data'><tr><th>value</th><th>shape</th></tr>" + cells +
            "</table><p class='small muted'>Axis legend (one for the whole project): B batch, T query length, "
            "S key length, H query heads, K kv heads, D head dim, E model width, I MLP width, V vocab, "
            "X experts, C classes.</p>")


def _params_html(component: Component, rows: Sequence[Any]) -> str:
    mine = [r for r in rows if r.component == component.slug]
    if not component.params:
        return ""
    if not mine:
        return "<h2 id='parameters'>Parameters</h2><p>No family has a parameter here.</p>"
    body = "".join(
        f"<tr data-pattern='{esc(r.pattern)}'><td class='mono'>{esc(r.pattern)}</td><td class='mono'>{esc(r.torch_attr)}</td>"
        f"<td class='mono'>{esc(r.nnx_path)}</td><td class='mono'>{esc(r.shape)}</td>"
        f"<td>{'transposed: [in, out]' if r.transposed else 'as is'}</td><td class='small'>{esc(r.dtype_rule)}</td>"
        f"<td class='small'>{esc(', '.join(r.models) if len(r.models) < 4 else f'{len(r.models)} examples')}</td></tr>"
        for r in mine)
    return ("<h2 id='parameters'>Parameters</h2><table class='data params'><tr><th>HF name</th><th>torch attribute</th>"
            "<th>NNX path</th><th>shape (HF)</th><th>Flax array</th><th>dtype rule</th><th>families</th></tr>" + body +
            "</table><p class='small muted'>Names, shapes and layout from <code>weights.names</code> "
            "(<code>hf_shapes</code>, the table both twins' parameters are tested against, and the converter's "
            "rule), shapes in the axis legend; "
            "<code>{i}</code> is the layer, <code>{j}</code> the expert. Every parameter is stored in the "
            "checkpoint's dtype and loaded in the model's <code>param_dtype</code>; the dtype rule says what "
            "happens at use, in the activation <code>dtype</code>.</p>")


def _component_page(component: Component, reports: Sequence[Any], param_rows: Sequence[Any]) -> str:
    code, pairs = _code_html(component)
    n_rows = sum(len(p.rows) for p in pairs)
    n_alike = sum(p.tally().get("same", 0) + p.tally().get("idiom", 0) for p in pairs)
    n_drift = sum(p.drift for p in pairs)
    measured = measured_html(reports, component.slug) if reports else ""
    toc = ["<a href='#code'>Code side by side</a>"]
    if component.figure:
        toc.insert(0, f"<a href='#figure'>{_FIGURE_TITLES[component.figure]}</a>")
    if component.shapes:
        toc.insert(0, "<a href='#shapes'>Shapes</a>")
    if component.params:
        toc.append("<a href='#parameters'>Parameters</a>")
    if measured:
        toc.append("<a href='#measured'>Measured</a>")
    toc.append("<a href='#idioms'>Idioms on this page</a>")
    summary = (f"<div class='cards'><div class='card'>{len(pairs)} mirrored function pairs, <b>{n_rows}</b> rows: "
               f"<b>{n_alike}</b> alike or by a known idiom, <b>{n_drift}</b> unexplained</div>")
    if reports:
        for dtype, (rep, row) in worst_by_dtype(reports, component.slug).items():
            c = row.comparison
            ratio = c.rel / c.tolerance if c.tolerance else 0.0
            summary += (f"<div class='card'><a href='#measured'>{esc(dtype)}</a>: worst <b>{c.rel:.1e}</b>, "
                        f"{share(ratio)} of its tolerance</div>")
    summary += "</div>"
    legend = ("<p class='legend'><span><i style='background:#fff'></i>alike (words that differ by a known idiom "
              "<mark style='background:#dbe8ff'>marked</mark>)</span><span><i style='background:#eaf2ff'></i>"
              "different words, a known framework idiom</span><span><i style='background:#fff4e0'></i>"
              "differs with no known idiom <mark>marked</mark></span><span><i class='gap' "
              "style='background:repeating-linear-gradient(135deg,#fafbfc 0 4px,#e6e9ee 4px 8px)'></i>"
              "nothing on this side</span></p>")
    used = sorted({i for p in pairs for r in p.rows for i in r.idioms})
    idioms = "".join(f"<tr id='{esc(i)}'><td><a href='idioms.html#{esc(i)}'>{esc(_short(IDIOMS[i]))}</a></td>"
                     f"<td class='mono'>{esc(IDIOMS[i].torch)}</td><td class='mono'>{esc(IDIOMS[i].flax)}</td>"
                     f"<td class='small'>{esc(IDIOMS[i].why)}</td></tr>" for i in used)
    body = (f"<h1>{esc(component.title)}</h1><p class='lead'>{_md(component.lead)}</p>"
            f"<nav class='toc'>On this page: {' '.join(toc)}</nav>{summary}"
            f"{_shapes_html(component)}"
            f"{_FIGURES[component.figure]() if component.figure else ''}"
            f"<h2 id='code'>Code side by side</h2>{legend}{code}"
            f"{_params_html(component, param_rows)}"
            + (f"<h2 id='measured'>Measured</h2>{measured}" if measured else
               ("<h2 id='measured'>Measured</h2><p>The report has no row for this component: its error shows "
                "in the components downstream of it.</p>" if reports else ""))
            + (f"<h2 id='idioms'>Idioms on this page</h2><table class='data'><tr><th>idiom</th><th>PyTorch</th>"
               f"<th>Flax NNX</th><th>why</th></tr>{idioms}</table>" if used else "")
            + _footer())
    return page(f"{component.title} — twinlm explain", body, _nav(component.slug), "style.css")


def _md(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(text))


def _footer() -> str:
    return ("<footer>Generated by <code>twinlm explain</code> from the installed <code>torch_impl</code> and "
            "<code>flax_impl</code> sources: the panes are the code that runs.</footer>")


# ---- index ------------------------------------------------------------------------------------------
def _diagram() -> str:
    def box(slug: str, x: int, y: int, w: int, h: int, label: str, sub: str = "", fill: str = "#eef4ff") -> str:
        text = (f"<text x='{x + w / 2}' y='{y + h / 2 + (0 if sub else 5)}' font-size='13.5' text-anchor='middle' "
                f"fill='#17202c' font-weight='600'>{esc(label)}</text>")
        if sub:
            text += (f"<text x='{x + w / 2}' y='{y + h / 2 + 15}' font-size='11' text-anchor='middle' "
                     f"fill='#5f6b7a'>{esc(sub)}</text>")
        return (f"<a href='{slug}.html'><rect x='{x}' y='{y}' width='{w}' height='{h}' rx='7' fill='{fill}' "
                f"stroke='#7f9cc9' stroke-width='1.4'/>{text}</a>")

    def arrow(x1: float, y1: float, x2: float, y2: float, dash: bool = False) -> str:
        return (f"<line x1='{x1}' y1='{y1}' x2='{x2}' y2='{y2}' stroke='#5f6b7a' stroke-width='1.5' "
                f"marker-end='url(#ah)'{' stroke-dasharray=' + chr(39) + '5 4' + chr(39) if dash else ''}/>")

    def plus(x: int, y: int) -> str:
        return (f"<circle cx='{x}' cy='{y}' r='10' fill='#fff' stroke='#5f6b7a' stroke-width='1.4'/>"
                f"<text x='{x}' y='{y + 5}' font-size='15' text-anchor='middle' fill='#5f6b7a'>+</text>")

    p = ["<svg class='flow' width='1300' height='490' viewBox='0 0 1300 490' role='img' "
         "aria-label='data flow through the model; each box links to its page'>",
         "<defs><marker id='ah' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' markerHeight='7' orient='auto'>"
         "<path d='M0,0 L10,5 L0,10 z' fill='#5f6b7a'/></marker></defs>"]
    # the model container and the decoder layer container
    p.append("<a href='model.html'><rect x='118' y='44' width='836' height='252' rx='10' fill='#fafbfd' "
             "stroke='#9aa5b1' stroke-dasharray='6 4'/><text x='132' y='64' font-size='13' fill='#2f5fb3' "
             "font-weight='600'>decoder model</text></a>")
    p.append("<a href='decoder-layer.html'><rect x='268' y='76' width='544' height='204' rx='10' fill='#f4f7fb' "
             "stroke='#7f9cc9'/><text x='282' y='96' font-size='13' fill='#2f5fb3' font-weight='600'>"
             "decoder layer (× N)</text></a>")
    p.append("<text x='28' y='176' font-size='13' fill='#17202c'>token ids</text>")
    p.append(arrow(88, 172, 138, 172))
    p.append(box("embedding", 140, 152, 104, 40, "embedding"))
    p.append(arrow(244, 172, 286, 172))
    p.append(box("rmsnorm", 288, 152, 84, 40, "RMSNorm"))
    p.append(arrow(372, 172, 394, 172))
    p.append(box("rotary", 396, 106, 100, 30, "rotary", fill="#f3efff"))
    p.append(arrow(446, 136, 446, 150))
    p.append(box("attention", 396, 152, 100, 40, "attention", "GQA · cache"))
    p.append(arrow(496, 172, 512, 172))
    p.append(plus(524, 172))
    p.append(arrow(534, 172, 552, 172))
    p.append(box("rmsnorm", 554, 152, 84, 40, "RMSNorm"))
    p.append(arrow(638, 166, 656, 150))
    p.append(arrow(638, 178, 656, 198))
    p.append(box("mlp", 658, 124, 90, 32, "MLP", "", "#eef4ff"))
    p.append(box("moe", 658, 188, 90, 32, "MoE", "", "#eef4ff"))
    p.append("<text x='703' y='177' font-size='11' text-anchor='middle' fill='#5f6b7a'>or</text>")
    p.append(arrow(748, 142, 768, 164))
    p.append(arrow(748, 204, 768, 180))
    p.append(plus(780, 172))
    # residual paths
    p.append("<path d='M266,172 L266,258 L524,258 L524,184' fill='none' stroke='#9aa5b1' stroke-width='1.3' "
             "marker-end='url(#ah)'/><text x='395' y='252' font-size='11' text-anchor='middle' fill='#5f6b7a'>"
             "residual</text>")
    p.append("<path d='M544,172 L544,268 L780,268 L780,184' fill='none' stroke='#9aa5b1' stroke-width='1.3' "
             "marker-end='url(#ah)'/>")
    p.append(arrow(790, 172, 832, 172))
    p.append(box("rmsnorm", 834, 152, 108, 40, "final norm", "RMSNorm"))
    # heads
    p.append(arrow(942, 172, 990, 100))
    p.append(arrow(942, 172, 990, 172))
    p.append(arrow(942, 172, 990, 244))
    p.append(box("causal-lm", 992, 80, 136, 40, "causal LM", "logits · loss"))
    p.append(box("sequence-classification", 992, 152, 136, 40, "classification", "pooled · loss"))
    p.append(box("question-answering", 992, 224, 136, 40, "QA", "start/end · loss"))
    p.append(arrow(1128, 100, 1160, 100))
    p.append(box("generate", 1162, 80, 130, 40, "generate", "greedy · sample · beam"))
    p.append("<path d='M1221,80 L1221,24 L60,24 L60,158' fill='none' stroke='#5f6b7a' stroke-width='1.3' "
             "stroke-dasharray='5 4' marker-end='url(#ah)'/><text x='640' y='18' font-size='11.5' "
             "text-anchor='middle' fill='#5f6b7a'>next token, through the KV cache</text>")
    # weights
    p.append("<rect x='20' y='336' width='96' height='46' rx='7' fill='#fff' stroke='#9aa5b1'/>"
             "<text x='68' y='356' font-size='12' text-anchor='middle'>HF checkpoint</text>"
             "<text x='68' y='372' font-size='11' text-anchor='middle' fill='#5f6b7a'>safetensors</text>")
    p.append(arrow(116, 359, 146, 359))
    p.append(box("converter", 148, 336, 262, 46, "converter", "weight [out, in] → kernel [in, out]", "#fff6e5"))
    p.append(arrow(279, 336, 279, 298, dash=True))
    p.append("<text x='288' y='322' font-size='11' fill='#5f6b7a'>weights into both twins</text>")
    # VQ
    p.append("<rect x='640' y='318' width='640' height='86' rx='10' fill='#fbfaf6' stroke='#c8b88a' "
             "stroke-dasharray='6 4'/><text x='654' y='338' font-size='13' fill='#7a5c00' font-weight='600'>"
             "Transformer-VQ (another model family)</text>")
    p.append(box("vq-attention", 660, 348, 180, 44, "VQ attention", "linear-time, compressed cache", "#fff8e1"))
    p.append(box("vq-quantizer", 860, 348, 180, 44, "VQ quantizer", "codebook · straight-through", "#fff8e1"))
    # around the model: the same model served, trained and cut across devices
    p.append("<text x='20' y='448' font-size='13' fill='#17202c'>around the model</text>")
    p.append(box("serving", 148, 424, 176, 44, "serving", "slots · continuous batching", "#eefaf1"))
    p.append(box("training", 336, 424, 196, 44, "training", "AdamW · accumulation · dropout", "#eefaf1"))
    p.append(box("sharding", 544, 424, 176, 44, "sharding", "one table · mesh / DTensor", "#eefaf1"))
    p.append("</svg>")
    return "".join(p)


def _index_page(reports: Sequence[Any], stats: dict[str, tuple[int, int, int, int]]) -> str:
    rows = []
    for n, c in enumerate(COMPONENTS, 1):
        pairs, total, alike, drift = stats[c.slug]
        measured = ""
        if reports:
            cells = []
            for dtype, (rep, row) in worst_by_dtype(reports, c.slug).items():
                cmp = row.comparison
                ratio = cmp.rel / cmp.tolerance if cmp.tolerance else 0.0
                cells.append(f"{esc(dtype)} {cmp.rel:.1e} ({share(ratio)})")
            measured = f"<td class='small'>{'<br>'.join(cells) or '—'}</td>"
        rows.append(f"<tr><td class='num'>{n}</td><td><a href='{c.slug}.html'>{esc(c.title)}</a></td>"
                    f"<td class='small'>{_md(c.lead.split('. ')[0].rstrip('.'))}.</td>"
                    f"<td class='num'>{pairs}</td><td class='num'>{alike} / {total}</td><td class='num'>{drift}</td>"
                    f"{measured}</tr>")
    head = ("<tr><th>#</th><th>page</th><th>what it is</th><th>pairs</th><th>rows alike</th><th>unexplained</th>"
            + ("<th>measured worst (share of tolerance)</th>" if reports else "") + "</tr>")
    intro = ("The same LLaMA-family model written twice, in PyTorch and in Flax NNX, shown side by side "
             "statement by statement, with what is measured between them. Click a box to open its page; "
             "pages follow the data as it flows.")
    body = (f"<h1>twinlm explain</h1><p class='lead'>{intro}</p>{_diagram()}"
            f"<h2>Pages</h2><table class='data'>{head}{''.join(rows)}</table>"
            "<p class='small muted'>Rows alike: statements that line up with the same meaning (identical, or "
            "different only by a <a href='idioms.html'>known framework idiom</a>). Unexplained: statements that "
            "differ or stand alone with no known idiom; each pair's bound is in <a href='alignment.html'>"
            "the alignment table</a>, checked by the test suite.</p>"
            + (f"<p class='small'>Measured figures from: {esc(', '.join(sorted({r.title for r in reports}))[:400])}</p>"
               if reports else "<p class='small muted'>Run <code>twinlm explain --report parity.json</code> "
                               "with a <code>twinlm check --json</code> or <code>twinlm demo</code> file to add "
                               "measured errors to every page.</p>")
            + _footer())
    return page("twinlm explain", body, _nav("index"), "style.css")


# ---- idioms, alignment, other ---------------------------------------------------------------------
def _idioms_page(pairs: Sequence[alignment.Pair], where: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    example: dict[str, str] = {}
    for p in pairs:
        for r in p.rows:
            for i in set(r.idioms) | (r.torch.idioms if r.torch else set()) | (r.flax.idioms if r.flax else set()):
                counts[i] = counts.get(i, 0) + 1
                if i not in example and p.id in where:
                    example[i] = f"{where[p.id]}.html#{anchor(p)}"
    rows = "".join(
        f"<tr id='{esc(i.id)}'><td><b>{esc(_short(i))}</b></td><td class='mono'>{esc(i.torch)}</td>"
        f"<td class='mono'>{esc(i.flax)}</td><td class='small'>{esc(i.why)}</td><td class='num'>{counts.get(i.id, 0)}</td>"
        f"<td>{f'<a href={chr(39)}{example[i.id]}{chr(39)}>example</a>' if i.id in example else ''}</td></tr>"
        for i in IDIOMS.values())
    body = ("<h1>Known framework idioms</h1><p class='lead'>The honest differences between the two twins. The "
            "alignment rewrites each of these into one canonical form before comparing statements, so a "
            "statement that differs only by them counts as alike; the page still marks the words and names "
            "the idiom.</p><table class='data'><tr><th>idiom</th><th>PyTorch</th><th>Flax NNX</th><th>why</th>"
            f"<th>rows</th><th></th></tr>{rows}</table>" + _footer())
    return page("Idioms — twinlm explain", body, _nav("idioms"), "style.css")


def _alignment_page(pairs: Sequence[alignment.Pair], where: dict[str, str]) -> str:
    rows = []
    for p in sorted(pairs, key=lambda p: (-p.drift, p.id)):
        allow = ALLOWANCES.get(p.id)
        t = p.tally()
        link = f"{where.get(p.id, 'other')}.html#{anchor(p)}"
        status = "pass" if p.drift <= (allow.rows if allow else 0) else "fail"
        rows.append(f"<tr><td class='mono'><a href='{link}'>{esc(p.id)}</a></td><td class='num'>{len(p.rows)}</td>"
                    f"<td class='num'>{t.get('same', 0)}</td><td class='num'>{t.get('idiom', 0)}</td>"
                    f"<td class='num'><b>{p.drift}</b></td><td class='num'>{allow.rows if allow else 0}</td>"
                    f"<td class='{status}'>{'ok' if status == 'pass' else 'PAST'}</td>"
                    f"<td class='small'>{esc(allow.reason) if allow else ''}</td></tr>")
    total = sum(len(p.rows) for p in pairs)
    drift = sum(p.drift for p in pairs)
    body = (f"<h1>Alignment of every mirrored pair</h1><p class='lead'>{len(pairs)} functions and methods exist in "
            f"both twins. Aligned statement by statement they make {total} rows, {drift} of them unexplained. Each "
            "pair's unexplained rows are bounded by an allowance with a one-line framework reason "
            "(<code>parity/explain/allowances.py</code>); the test suite fails when a pair drifts past it.</p>"
            "<table class='data'><tr><th>pair</th><th>rows</th><th>alike</th><th>by an idiom</th><th>unexplained</th>"
            f"<th>allowance</th><th></th><th>reason</th></tr>{''.join(rows)}</table>" + _footer())
    return page("Alignment — twinlm explain", body, _nav("alignment"), "style.css")


def _other_page(pairs: Sequence[alignment.Pair]) -> str:
    by_module: dict[str, list[alignment.Pair]] = {}
    for p in pairs:
        by_module.setdefault(p.module, []).append(p)
    parts = ["<h1>Other mirrored pairs</h1><p class='lead'>Every pair not shown on a component page: checkpoint "
             "helpers, the rest of Transformer-VQ, precision. Same view, same figures.</p>"]
    for module, ps in by_module.items():
        parts.append(f"<h2>{esc(module)}</h2>")
        parts += [pair_html(p) for p in ps]
    return page("Other pairs — twinlm explain", "".join(parts) + _footer(), _nav("other"), "style.css")


# ---- the site ---------------------------------------------------------------------------------------
def write_site(out: str | os.PathLike = "reports/explain", reports: Sequence[Any] | None = None) -> Path:
    """Write the site into `out` (created; existing pages replaced) and return index.html's path."""
    from .params import parameter_rows

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reports = list(reports or [])
    params = parameter_rows()
    where: dict[str, str] = {}
    stats = {}
    for c in COMPONENTS:
        html_text = _component_page(c, reports, params)
        (out / f"{c.slug}.html").write_text(html_text, encoding="utf-8")
        pairs = page_pairs(c)
        for p in pairs:
            where.setdefault(p.id, c.slug)
        stats[c.slug] = (len(pairs), sum(len(p.rows) for p in pairs),
                         sum(p.tally().get("same", 0) + p.tally().get("idiom", 0) for p in pairs),
                         sum(p.drift for p in pairs))
    everything = alignment.mirrored_pairs()
    rest = [p for p in everything if p.id not in where]
    for p in rest:
        where[p.id] = "other"
    (out / "other.html").write_text(_other_page(rest), encoding="utf-8")
    (out / "idioms.html").write_text(_idioms_page(everything, where), encoding="utf-8")
    (out / "alignment.html").write_text(_alignment_page(everything, where), encoding="utf-8")
    (out / "style.css").write_text(CSS, encoding="utf-8")
    index = out / "index.html"
    index.write_text(_index_page(reports, stats), encoding="utf-8")
    return index
