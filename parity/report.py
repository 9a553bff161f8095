"""The parity report: every measured difference, and its text and JSON renderings (the HTML one
is `parity.explain.report_html.write_html`).

A `Report` is a list of `Row`s in reading order: per layer (embeddings, then each layer's
attention weights and output), then the head's outputs and loss, then gradients (one row per
parameter; the text table summarises them per group), then KV-cache decoding and generation.
The first failing row in that order is where the twins first part ways.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .compare import Comparison

__all__ = ["Report", "Row", "SECTIONS", "format_figure", "format_timings", "parameter_group"]

SECTIONS = ("forward", "head", "gradients", "kv cache", "generation")


@dataclass
class Row:
    """One measured tensor (or one check that could not run, with `status` "n/a")."""

    section: str  # one of SECTIONS
    quantity: str  # activations / logits / loss / gradients / tokens: picks the tolerance
    comparison: Comparison
    layer: int | None = None  # the decoder layer the tensor belongs to, when it has one
    note: str = ""
    status: str = ""  # "pass" / "fail" / "n/a"; derived from the comparison when empty
    # Streamed checks: the same tensor when the Flax twin is fed the torch twin's input to this
    # layer (or its incoming gradient), i.e. the error this layer adds. `comparison` is the chained
    # (end-to-end) figure and alone decides `status`.
    isolated: Comparison | None = None

    def __post_init__(self) -> None:
        if not self.status:
            self.status = "pass" if self.comparison.passed else "fail"

    @property
    def name(self) -> str:
        """The tensor's name (HF parameter name for gradients)."""
        return self.comparison.name

    @property
    def full_note(self) -> str:
        """The note as the table shows it: what the non-finite values were, then `note`."""
        return "; ".join(n for n in (self.comparison.nonfinite_note, self.note) if n)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures (non-finite numbers as strings, since JSON has none)."""
        d = {"section": self.section, "quantity": self.quantity, "layer": self.layer,
             "status": self.status, "note": self.note, **self.comparison.as_dict()}
        d["worst_index"] = list(d["worst_index"])
        d["shape"] = list(d["shape"])
        d = {k: (_json_number(v) if isinstance(v, float) else v) for k, v in d.items()}
        d["isolated"] = None if self.isolated is None else _comparison_dict(self.isolated)
        return d


def _comparison_dict(c: Comparison) -> dict[str, Any]:
    d = c.as_dict()
    d["worst_index"], d["shape"] = list(d["worst_index"]), list(d["shape"])
    return {k: (_json_number(v) if isinstance(v, float) else v) for k, v in d.items()}


def _json_number(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def format_figure(x: float) -> str:
    """A figure as the table prints it: `0`, `3.1e-07`, `inf`."""
    if x == 0:
        return "0"
    return f"{x:.1e}" if math.isfinite(x) else str(x)


def _isolated_cell(c: Comparison | None) -> str:
    if c is None:
        return ""
    return format_figure(c.rel) + ("" if c.passed else " FAIL")


def format_timings(timings: dict[str, float]) -> str:
    """Wall time per phase, the footer of the table: `wall time: load 1.2 s, forward 3.4 s, ...`."""
    return "wall time: " + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in timings.items())


def parameter_group(hf_name: str) -> str:
    """A parameter's group in the gradient summary: its decoder layer, or its top module
    (`model.layers.3.mlp.up_proj.weight` -> `model.layers.3`, `lm_head.weight` -> `lm_head`)."""
    m = re.match(r"^(.*?layers\.\d+)\.", hf_name)
    return m.group(1) if m else hf_name.rsplit(".", 1)[0]


@dataclass
class Report:
    """All rows of one check, with what was checked (the header of every rendering)."""

    title: str
    dtype: str
    head: str
    rows: list[Row] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # inputs, versions, paths, notes
    skipped: dict[str, str] = field(default_factory=dict)  # section left out -> why (e.g. "--skip gradients")

    @property
    def complete(self) -> bool:
        """True when no section was left out (a PASS of an incomplete check says so)."""
        return not self.skipped

    @property
    def passed(self) -> bool:
        """True when no row failed (rows that could not run, "n/a", do not fail the check)."""
        return all(r.status != "fail" for r in self.rows)

    def failures(self) -> list[Row]:
        """Failing rows in reading order."""
        return [r for r in self.rows if r.status == "fail"]

    def first_failure(self) -> Row | None:
        """Where the twins first part ways (reading order), or None."""
        fails = self.failures()
        return fails[0] if fails else None

    def nonfinite(self) -> list[Row]:
        """Rows where both twins produced NaN or infinity (each also a failure)."""
        return [r for r in self.rows if r.comparison.nonfinite == "both"]

    def verdict(self) -> str:
        """The last line of the table: PASS, or FAIL with the count and the first divergence;
        non-finite outputs of both twins get their own clause."""
        n_fail = len(self.failures())
        n_na = sum(r.status == "n/a" for r in self.rows)
        verdict = "PASS" if self.passed else f"FAIL: {n_fail} of {len(self.rows)} tensors out of tolerance"
        if self.skipped:
            verdict += " (incomplete: not checked: " + ", ".join(f"{s} ({why})" for s, why in self.skipped.items()) + ")"
        first = self.first_failure()
        if first is not None:
            verdict += f"; first divergence: {first.name}"
        first_isolated = next((r for r in self.rows if r.isolated is not None and not r.isolated.passed), None)
        if first_isolated is not None:
            verdict += f"; first isolated failure (the error this tensor adds on its own): {first_isolated.name}"
        both = self.nonfinite()
        if both:
            at = ",".join(map(str, both[0].comparison.worst_index)) or "-"
            verdict += (f"; both twins produced non-finite values at {both[0].name} [{at}]"
                        + (f" and {len(both) - 1} more tensor(s)" if len(both) > 1 else ""))
        if n_na:
            verdict += f" ({n_na} check(s) not available)"
        return verdict

    def worst(self, section: str | None = None, quantity: str | None = None) -> Row | None:
        """The row with the largest error relative to its tolerance, optionally within a
        section and/or quantity (generated tokens, counted not measured, only when asked for)."""
        rows = [r for r in self.rows if r.status != "n/a" and (section is None or r.section == section)
                and (r.quantity == quantity if quantity is not None else r.quantity != "tokens")]
        return max(rows, key=lambda r: _ratio(r.comparison), default=None)

    # ---- text ---------------------------------------------------------------------------
    def summary_rows(self) -> list[Row]:
        """Rows as the table shows them: gradients (and parameters after training steps) folded
        into one row per parameter group and section, which keeps the group's worst tensor (named
        in the note)."""
        order: list[Row | tuple[str, str]] = []
        groups: dict[tuple[str, str], list[Row]] = {}
        for r in self.rows:
            if r.section != "gradients" and r.quantity != "parameters":
                order.append(r)
                continue
            key = (r.section, parameter_group(r.name))
            if key not in groups:
                groups[key] = []
                order.append(key)  # the group's row goes where its first member was
            groups[key].append(r)
        return [_group_row(x[1], groups[x]) if isinstance(x, tuple) else x for x in order]

    def format_table(self) -> str:
        """The readable table `twinlm check` prints."""
        lines = [f"== {self.title} ==", f"dtype {self.dtype}, head {self.head}"]
        lines += [f"{k}: {v}" for k, v in self.meta.get("describe", {}).items()]
        isolated = any(r.isolated is not None for r in self.rows)
        header = ("tensor", "shape", "max abs", "rel err", "worst at", "tol", "status") \
            + (("isolated",) if isolated else ()) + ("",)
        current = None
        table: list[tuple[str, ...]] = []
        for r in self.summary_rows():
            if r.section != current:
                current = r.section
                table.append(("",) * len(header))
                table.append((f"[{r.section}]",) + ("",) * (len(header) - 1))
            c = r.comparison
            shape = "x".join(map(str, c.shape)) if c.shape else "-"
            at = ",".join(map(str, c.worst_index)) if c.worst_index else "-"
            figures = _figures(r, at)
            iso = (_isolated_cell(r.isolated),) if isolated else ()
            table.append((c.name, shape) + figures + (r.status.upper() if r.status == "fail" else r.status,)
                         + iso + (r.full_note,))
        widths = [max(len(row[i]) for row in [header] + table) for i in range(len(header))]
        fmt = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
        lines.append(fmt(header))
        lines += [fmt(row) for row in table]
        lines.append("")
        lines.append(self.verdict())
        if self.meta.get("timings"):
            lines.append(format_timings(self.meta["timings"]))
        return "\n".join(lines)

    # ---- JSON ---------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        """Every figure, machine-readably."""
        first = self.first_failure()
        return {"title": self.title, "dtype": self.dtype, "head": self.head, "passed": self.passed,
                "complete": self.complete, "skipped": dict(self.skipped),
                "first_failure": first.name if first else None,
                "nonfinite": [r.name for r in self.nonfinite()],
                "meta": self.meta, "rows": [r.as_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        """The inverse of `as_dict` (e.g. to re-render a report read from `--json` output)."""
        num = lambda v: float(v) if isinstance(v, str) else v  # "inf" / "nan" back to floats
        comparison = lambda c: Comparison(c["name"], num(c["max_abs"]), num(c["rel"]), tuple(c["worst_index"]),
                                          num(c["tolerance"]), c["passed"], tuple(c["shape"]),
                                          c.get("nonfinite", ""), c.get("floor", 1.0))
        rows = [Row(r["section"], r["quantity"], comparison(r), r["layer"], r["note"], r["status"],
                    comparison(r["isolated"]) if r.get("isolated") else None) for r in d["rows"]]
        return cls(d["title"], d["dtype"], d["head"], rows, d.get("meta", {}), dict(d.get("skipped", {})))

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write `as_dict()` to `path`."""
        from .paths import write_text_atomic

        return write_text_atomic(path, json.dumps(self.as_dict(), indent=1, default=str) + "\n")


def _figures(r: Row, at: str) -> tuple[str, str, str, str]:
    """The max abs, rel err, worst at and tol cells of a row. Generated tokens are counted, not
    measured: no magnitude, the share of new tokens that differ as their error, tolerance exact."""
    c = r.comparison
    if r.status == "n/a":
        return ("-", "-", "-", "-")
    if r.quantity == "tokens":
        return ("-", f"{c.rel:.0%} differ" if c.rel else "0", at or "-", "exact")
    return (format_figure(c.max_abs), format_figure(c.rel), at, f"{c.tolerance:.0e}")


def _group_row(group: str, members: list[Row]) -> Row:
    # A member with non-finite values stands for the group: its NaN is the news, not a ratio.
    worst = max(members, key=lambda m: (bool(m.comparison.nonfinite), _ratio(m.comparison)))
    c = worst.comparison
    status = "fail" if any(m.status == "fail" for m in members) else "pass"
    summary = Comparison(group, c.max_abs, c.rel, c.worst_index, c.tolerance, status == "pass", c.shape,
                         c.nonfinite, c.floor)
    note = f"{len(members)} tensors, worst {worst.name[len(group) + 1:] or worst.name}"
    flagged = [m.note for m in members if m.note]
    if flagged:
        note += f"; {len(flagged)} with notes (see JSON)"
    isolated = [m.isolated for m in members if m.isolated is not None]
    iso = max(isolated, key=_ratio) if isolated else None
    if iso is not None:
        iso = Comparison(group, iso.max_abs, iso.rel, iso.worst_index, iso.tolerance, iso.passed, iso.shape,
                         iso.nonfinite, iso.floor)
    return Row(members[0].section, members[0].quantity, summary, worst.layer, note=note, status=status, isolated=iso)


def _ratio(c: Comparison) -> float:
    if c.tolerance > 0:
        return c.rel / c.tolerance
    return 0.0 if c.rel == 0 else math.inf
